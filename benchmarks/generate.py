"""Greedy decoding speed of mistura's engine against Hugging Face `generate`, same weights.

A ~15M-parameter Llama (RoPE, RMSNorm, GQA, SwiGLU) is built with random weights, written
as a mistura checkpoint and exported with `mistura convert to-hf`, so both sides run the
very same tensors. Each round decodes the same prompts greedily to exactly
--new-tokens tokens (no EOS) on both sides, interleaved, and checks that the tokens are
identical; the figure is the median over rounds of generated tokens per second
(batch x new tokens / wall time, prefill included).

The "weights floor" column is what no fp32 implementation can beat at this size: the
tokens per second of a loop that does nothing but multiply one step's inputs by every
weight matrix of the model (each read once from memory per step, as decoding must).

    python benchmarks/generate.py
    python benchmarks/generate.py --batch 1 8 --prompt-len 32 --new-tokens 128 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mistura.checkpoint import save_model
from mistura.config import ModelConfig
from mistura.convert.hf import to_hf
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.model import Transformer

LLAMA_15M = dict(
    vocab_size=8192, d_model=384, n_layer=6, n_head=6, n_kv_head=2, d_ff=1024, max_seq_len=512, tie_embeddings=False
)


def models(folder: Path):
    """The mistura model and the Hugging Face model read back from its export."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("llama-tiny", **LLAMA_15M)).eval()
    hf_dir = to_hf(save_model(folder / "ckpt", model), folder / "hf", progress=False)
    return model, AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def timed(run) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def compare(model, hf_model, batch: int, prompt_len: int, new_tokens: int, rounds: int) -> dict[str, float]:
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    greedy = Sampling(max_new_tokens=new_tokens, temperature=0)

    def ours() -> torch.Tensor:
        return torch.tensor(generate(model, prompt, greedy))

    @torch.no_grad()
    def theirs() -> torch.Tensor:
        out = hf_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return out[:, prompt_len:]

    def floor() -> None:
        weights_only_steps(model, batch, new_tokens)

    times: dict[str, list[float]] = {"mistura": [], "transformers": [], "weights floor": []}
    for _ in range(rounds):
        (t_ours, a), (t_theirs, b), (t_floor, _) = timed(ours), timed(theirs), timed(floor)
        if not torch.equal(a, b):
            raise SystemExit(f"batch {batch}: greedy outputs differ between mistura and transformers")
        times["mistura"].append(t_ours)
        times["transformers"].append(t_theirs)
        times["weights floor"].append(t_floor)
    return {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def weights_only_steps(model: Transformer, batch: int, steps: int) -> None:
    """`steps` passes of a (batch, in) input through every weight matrix (embedding and lm_head included)."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    inputs = {m.shape[1]: torch.randn(batch, m.shape[1]) for m in matrices}
    for _ in range(steps):
        for m in matrices:
            torch.nn.functional.linear(inputs[m.shape[1]], m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model, hf_model = models(Path(folder))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Llama {params / 1e6:.1f}M parameters, fp32, {args.threads} threads, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, median of {args.rounds} rounds; greedy outputs identical"
    )
    print(f"{'batch':>5} | {'mistura tok/s':>13} | {'transformers tok/s':>18} | ratio | weights floor tok/s")
    for batch in args.batch:
        speed = compare(model, hf_model, batch, args.prompt_len, args.new_tokens, args.rounds)
        ratio = speed["mistura"] / speed["transformers"]
        print(
            f"{batch:>5} | {speed['mistura']:>13.1f} | {speed['transformers']:>18.1f} | {ratio:.2f}x "
            f"| {speed['weights floor']:.1f}"
        )


if __name__ == "__main__":
    main()
