"""Speculative decoding against plain decoding of the target, same prompts, in one run.

For a trained target and draft sharing a tokenizer (configs/speculative/), the script

1. times a decode step of each model: the target on 1 token and on gamma + 1 tokens (what
   a verification pass feeds), and the draft on 1 token;
2. decodes every prompt greedily to exactly --new-tokens tokens (no EOS) with the engine
   (plain) and speculatively for each gamma, in interleaved rounds, checks that the tokens
   are identical and prints tokens/s, the speedup, the acceptance rate and the tokens per
   target pass (the median round's time);
3. does the same with sampling (--temperature, --top-k), where outputs differ from plain
   sampling by design but the acceptance rate and the speedup still tell.

    python benchmarks/speculative.py runs/speculative-target runs/speculative-draft
    python benchmarks/speculative.py TARGET DRAFT --gamma 2 4 6 --prompts 4 --new-tokens 128 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import mistura
from mistura.infer.engine import generate
from mistura.infer.generate import encode_prompt
from mistura.infer.sampling import Sampling
from mistura.infer.speculative import SpeculativeStats, check_tokenizers, speculative_generate
from mistura.model import Transformer

PROMPTS = [
    "Capitu",
    "O amor é",
    "Naquele tempo, a cidade do Rio de Janeiro",
    "Quando cheguei à casa de meu tio",
    "A vida é",
    "Era uma noite de chuva",
    "D. Carmo olhou para a janela",
    "O Conselheiro Aires",
]


@torch.no_grad()
def step_ms(model: Transformer, tokens: int, context: int = 32, repeats: int = 30) -> float:
    """Median milliseconds of a forward pass of `tokens` new tokens after `context` cached ones."""
    cache = model.new_cache(1, context + tokens)
    model(torch.randint(3, model.config.vocab_size, (1, context)), cache)
    step = torch.randint(3, model.config.vocab_size, (1, tokens))
    times = []
    for _ in range(repeats + 5):  # the first 5 warm up
        start = time.perf_counter()
        model(step, cache)
        times.append(time.perf_counter() - start)
        cache.rewind(context)
    return 1e3 * statistics.median(times[5:])


def timed(run: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def compare(target, draft, prompts, sampling: Sampling, gammas: list[int], rounds: int) -> list[dict]:
    """Per contender (plain, then each gamma): median round time and, for speculative ones, summed stats."""
    times: dict[str, list[float]] = {"plain": []} | {f"gamma={g}": [] for g in gammas}
    outputs: dict[str, list[list[int]]] = {}
    stats = {g: SpeculativeStats() for g in gammas}
    for round_ in range(rounds):
        seconds, outputs["plain"] = timed(lambda: [generate(target, [p], sampling)[0] for p in prompts])
        times["plain"].append(seconds)
        for g in gammas:
            seconds, runs = timed(lambda g=g: [speculative_generate(target, draft, p, sampling, g) for p in prompts])
            times[f"gamma={g}"].append(seconds)
            outputs[f"gamma={g}"] = [new for new, _ in runs]
            if round_ == 0:
                for _, s in runs:
                    for field in ("proposed", "accepted", "target_passes", "new_tokens"):
                        setattr(stats[g], field, getattr(stats[g], field) + getattr(s, field))
    tokens = sum(len(new) for new in outputs["plain"])
    plain = statistics.median(times["plain"])
    rows = [dict(name="plain", tok_s=tokens / plain, speedup=1.0, same=True, stats=None)]
    for g in gammas:
        median = statistics.median(times[f"gamma={g}"])
        same = outputs[f"gamma={g}"] == outputs["plain"]
        rows.append(dict(name=f"gamma={g}", tok_s=tokens / median, speedup=plain / median, same=same, stats=stats[g]))
    return rows


def print_table(title: str, rows: list[dict], greedy: bool) -> None:
    print(f"\n{title}")
    print(
        "| decoding | tokens/s | speedup | acceptance | tokens per target pass |" + (" identical |" if greedy else "")
    )
    print("|---|---|---|---|---|" + ("---|" if greedy else ""))
    for row in rows:
        s = row["stats"]
        accept = f"{s.acceptance_rate:.2f}" if s else "-"
        per_pass = f"{s.tokens_per_target_pass:.2f}" if s else "1.00"
        same = (" yes |" if row["same"] else " NO |") if greedy else ""
        print(f"| {row['name']} | {row['tok_s']:.1f} | {row['speedup']:.2f}x | {accept} | {per_pass} |{same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="the target's checkpoint or run directory")
    parser.add_argument("draft", help="the draft's checkpoint or run directory")
    parser.add_argument("--gamma", type=int, nargs="+", default=[2, 3, 4, 6], help="draft tokens per round")
    parser.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} built-in prompts")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the median counts")
    parser.add_argument("--temperature", type=float, default=0.8, help="for the sampling table")
    parser.add_argument("--top-k", type=int, default=40, help="for the sampling table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target, draft = mistura.load(args.target), mistura.load(args.draft)
    tokenizer = mistura.load_tokenizer(args.target)
    check_tokenizers(tokenizer, mistura.load_tokenizer(args.draft))
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS[: args.prompts]]
    sizes = {name: m.parameter_counts()["total"] / 1e6 for name, m in (("target", target), ("draft", draft))}
    print(
        f"target {sizes['target']:.1f}M parameters, draft {sizes['draft']:.1f}M; torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    target_ms, draft_ms = step_ms(target, 1), step_ms(draft, 1)
    print(f"decode step: target {target_ms:.2f} ms, draft {draft_ms:.2f} ms (ratio {target_ms / draft_ms:.1f})")
    for g in args.gamma:
        print(f"target pass over gamma + 1 = {g + 1} tokens: {step_ms(target, g + 1):.2f} ms")

    greedy = Sampling(max_new_tokens=args.new_tokens, temperature=0)
    sampled = Sampling(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k)
    n = len(prompts)
    print_table(
        f"greedy, {n} prompts x {args.new_tokens} tokens, batch 1:",
        compare(target, draft, prompts, greedy, args.gamma, args.rounds),
        greedy=True,
    )
    print_table(
        f"sampling (temperature {args.temperature}, top-k {args.top_k}), {n} prompts x {args.new_tokens} "
        "tokens, batch 1:",
        compare(target, draft, prompts, sampled, args.gamma, args.rounds),
        greedy=False,
    )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
