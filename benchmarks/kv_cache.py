"""KV-cache size per token of multi-head, grouped-query and latent attention, and MLA decode speed.

Part 1, sizes: for a model shape (default: dragao-671b, DeepSeek-V3's), the bytes each
token adds to the cache over all layers with
- MHA: every head caches its key and value (n_head x head width each);
- GQA: n_kv_head key/value heads (8 by default, Llama-3-70B's count);
- MLA: only the latent and the shared rotary key, kv_lora_rank + qk_rope_head_dim values.
The figures come from `ModelConfig.kv_cache_bytes_per_token` and are checked against the
buffers that `Transformer.new_cache` really allocates for the CPU-scale preset.

Part 2, speed: greedy decoding of a CPU-scale MLA model (dragao-tiny) with the latent cache
(absorbed path) against the expanded per-head cache (naive path), same weights, same
tokens, interleaved rounds, median tokens/s.

    python benchmarks/kv_cache.py
    python benchmarks/kv_cache.py --preset dragao-16b --kv-heads 16 --batch 8 --context 512
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from mistura.config import ModelConfig
from mistura.model import Transformer


def shapes(preset: str, kv_heads: int) -> dict[str, ModelConfig]:
    """The preset (MLA) and the same stack with MHA and GQA heads as wide as its per-head
    key/value part (d_h = qk_nope_head_dim, DeepSeek-V2's comparison: MHA caches 2 n_h d_h
    values per layer, MLA kv_lora_rank + qk_rope_head_dim = 4.5 d_h)."""
    mla = ModelConfig.from_name(preset)
    width = mla.mla.qk_nope_head_dim
    plain = dataclasses.replace(mla, mla=None, yarn=None, head_dim=None, n_kv_head=None)
    mha = dataclasses.replace(plain, head_dim=width, n_kv_head=mla.n_head)
    gqa = dataclasses.replace(plain, head_dim=width, n_kv_head=kv_heads)
    return {f"MHA ({mla.n_head} heads x {width})": mha, f"GQA ({kv_heads} kv heads x {width})": gqa, "MLA": mla}


def allocated_bytes_per_token(config: ModelConfig, latent: bool) -> int:
    """Bytes per token of the cache buffers a real model allocates (bf16), from their sizes."""
    model = Transformer(config).to(torch.bfloat16)
    cache = model.new_cache(1, 64, latent=latent) if config.mla else model.new_cache(1, 64)
    buffers = [cache.latent] if latent else [cache.k, cache.v]
    return sum(b.numel() * b.element_size() for b in buffers) // 64


def decode_speed(config: ModelConfig, batch: int, context: int, new_tokens: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt = torch.randint(3, config.vocab_size, (batch, context))
    times: dict[str, list[float]] = {"latent (absorbed)": [], "expanded (naive)": []}
    outputs = {}
    for _ in range(rounds):
        for name, latent in (("latent (absorbed)", True), ("expanded (naive)", False)):
            cache = model.new_cache(batch, context + new_tokens, latent=latent)
            with torch.no_grad():
                logits = model(prompt, cache)[:, -1]
                token = logits.argmax(-1)
                generated = [token]
                start = time.perf_counter()
                for _ in range(new_tokens - 1):
                    token = model(token[:, None], cache)[:, -1].argmax(-1)
                    generated.append(token)
                times[name].append(time.perf_counter() - start)
            outputs[name] = torch.stack(generated, 1)
    same = torch.equal(*outputs.values())
    print(f"greedy tokens identical on both paths: {same}")
    return {name: batch * (new_tokens - 1) / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dragao-671b")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(f"## KV cache per token, {args.preset} shape, bf16\n")
    print("| attention | bytes per token | vs MHA |\n|---|---|---|")
    sizes = {name: config.kv_cache_bytes_per_token(2) for name, config in shapes(args.preset, args.kv_heads).items()}
    mha = next(iter(sizes.values()))
    for name, size in sizes.items():
        print(f"| {name} | {size:,} | {size / mha:.2%} (saves {1 - size / mha:.2%}) |")

    tiny = ModelConfig.from_name("dragao-tiny", max_seq_len=args.context + args.new_tokens)
    print("\nallocated by dragao-tiny (bf16), bytes per token:")
    for name, latent in (("latent cache", True), ("expanded cache", False)):
        formula = tiny.kv_cache_bytes_per_token(2) if latent else None
        print(f"  {name}: {allocated_bytes_per_token(tiny, latent):,}" + (f" (formula {formula:,})" if latent else ""))

    print(f"\n## Greedy decode, dragao-tiny, batch {args.batch}, context {args.context}, fp32\n")
    speeds = decode_speed(tiny, args.batch, args.context, args.new_tokens, args.rounds)
    for name, speed in speeds.items():
        print(f"  {name}: {speed:,.0f} tokens/s")
    latent, naive = speeds.values()
    print(f"  latent / expanded: {latent / naive:.2f}x")


if __name__ == "__main__":
    main()
