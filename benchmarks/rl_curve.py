"""The reward and the KL of an RL run (`mistura rl`) along its steps, from its metrics.jsonl.

    .venv/bin/python benchmarks/rl_curve.py runs/grpo-casa [runs/ppo-casa ...] [--windows 5]

For each run: the step time, then a Markdown table of the training reward, the KL to the reference
per reply, the entropy and the share of replies that drew the end of turn, averaged over equal
windows of steps, with the held-out reward and KL of the evaluation that closes each window.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mistura.train.loggers import read_metrics


def windows(records: list[dict], count: int) -> list[list[dict]]:
    size = max(1, -(-len(records) // count))  # ceil
    return [records[start : start + size] for start in range(0, len(records), size)]


def report(run: Path, count: int) -> None:
    records = read_metrics(run)
    steps = [r for r in records if "reward" in r]
    evals = {r["step"]: r for r in records if "val_reward" in r}
    if not steps:
        raise SystemExit(f"error: {run} has no RL step in metrics.jsonl")
    print(f"\n{run}: {len(steps)} steps, {steps[-1]['train_s'] / len(steps):.2f} s per step of training")
    start = evals.get(0)
    if start is not None:
        print(f"before the first step: held-out reward {start['val_reward']:.3f}")
    print("| steps | reward | KL/reply (nats) | entropy | ended | held-out reward | held-out KL |")
    print("|---|---|---|---|---|---|---|")
    for window in windows(steps, count):
        mean = {key: statistics.fmean(r[key] for r in window) for key in ("reward", "kl", "entropy", "ended")}
        last = max((s for s in evals if s <= window[-1]["step"]), default=None)
        held = "- | -" if last is None else f"{evals[last]['val_reward']:.3f} | {evals[last]['val_kl']:.2f}"
        print(
            f"| {window[0]['step']}-{window[-1]['step']} | {mean['reward']:.3f} | {mean['kl']:.2f} | "
            f"{mean['entropy']:.2f} | {mean['ended']:.2f} | {held} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of mistura rl")
    parser.add_argument("--windows", type=int, default=5, help="how many windows of steps (default: 5)")
    args = parser.parse_args()
    for run in args.runs:
        report(run, args.windows)


if __name__ == "__main__":
    main()
