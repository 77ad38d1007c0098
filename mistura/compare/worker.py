"""One run of a comparison, in its own process: `python -m mistura.compare.worker OUT RUN`.

The parent (mistura.compare.runner) writes what to train, `<OUT>/runs/<RUN>/compare_run.json`
(the run's resolved config without its place, and the generation settings), then starts
this module. It trains the run, resuming from the latest checkpoint when the run directory
already holds a log, writes the samples, and writes the metrics file last, which marks the
run finished. A process of its own makes the peak memory it measures the run's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mistura._entry import run_command
from mistura.atomic import write_json
from mistura.compare.counts import model_counts
from mistura.compare.metrics import peak_memory, run_metrics
from mistura.compare.suite import GenerationConfig
from mistura.errors import CheckpointError
from mistura.fields import from_dict, merge
from mistura.infer.generate import generate_text
from mistura.loading import load, load_tokenizer
from mistura.train.config import RunConfig
from mistura.train.loggers import read_metrics
from mistura.train.trainer import Trainer

SPEC_FILE = "compare_run.json"


def run_directory(out: Path, name: str) -> Path:
    return out / "runs" / name


def metrics_path(out: Path, name: str) -> Path:
    return out / "metrics" / f"{name}_metrics.json"


def train_run(out: Path, name: str, progress: bool = True) -> None:
    """The child process's work: train (or resume) the run, write its samples, then its metrics."""
    directory = run_directory(out, name)
    spec = read_json(directory / SPEC_FILE)
    run = RunConfig.from_dict(merge(spec["run"], {"train": {"out_dir": str(directory)}}))
    trainer = Trainer(run)
    summary = trainer.fit(resume=(directory / "metrics.jsonl").exists(), progress=progress)
    generation = from_dict(GenerationConfig, spec["generation"], "generation")
    samples = {
        "run": name,
        "checkpoint": summary["checkpoint"],
        "generation": spec["generation"],
        "samples": sample(summary["checkpoint"], generation, trainer.device),
    }
    write_json(out / "generations" / f"{name}_generations.json", samples)
    metrics = run_metrics(
        name,
        trainer.run.model.name,
        read_metrics(directory),
        summary,
        model_counts(trainer.run.model),
        trainer.tokens_per_step,
        run.train.max_steps,
        peak_memory(trainer.device),
    )
    write_json(metrics_path(out, name), {**metrics, "spec": spec})  # last: the run is finished


def sample(checkpoint: str, generation: GenerationConfig, device) -> list[dict[str, Any]]:
    """Every prompt continued once per seed of generation.seeds."""
    model, tokenizer = load(checkpoint, device=device), load_tokenizer(checkpoint)
    return [
        {
            "prompt": prompt,
            "seed": seed,
            "completion": generate_text(model, tokenizer, [prompt], dataclasses.replace(generation, seed=seed))[0],
        }
        for prompt in generation.prompts
        for seed in generation.seeds
    ]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8 or not JSON
        raise CheckpointError(f"cannot read {path} ({err}): delete it to redo that run") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one run of a comparison (started by mistura compare).")
    parser.add_argument("out", help="the comparison's output folder")
    parser.add_argument("name", help="the run, whose spec is <out>/runs/<name>/" + SPEC_FILE)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return run_command(train_run, Path(args.out), args.name, not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
