"""`<out>/evals/<run>_eval.json`: every trained model of a suite scored on the suite's `eval:` block.

    {"spec":  the eval block it was scored on,
     "text":  mistura eval --text's figures (perplexity, bits_per_byte, ...), or null,
     "tasks": {task: lm_eval's metrics, e.g. {"acc,none": 0.63, "acc_stderr,none": 0.024}}}

Scoring comes after training and is kept apart from it: the runs' specs leave the eval block out,
so a suite whose `eval:` changes scores its finished models again without training them again,
and a file made with the same block is reused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mistura.atomic import write_json
from mistura.compare.suite import EvalConfig
from mistura.compare.worker import read_json, run_directory
from mistura.eval import require_harness
from mistura.train.device import resolve_device


def eval_path(out: Path, name: str) -> Path:
    return out / "evals" / f"{name}_eval.json"


def check_evaluation(config: EvalConfig) -> None:
    """Before any training: the text reads, and the harness is installed and knows every task."""
    if config.text:
        from mistura.eval.perplexity import read_texts

        read_texts(config.text)
    if config.tasks:
        require_harness("the suite's eval.tasks")
        from mistura.eval.harness import task_manager

        task_manager(list(config.tasks), config.include_path)


def evaluate_runs(results: list[dict[str, Any]], out: Path, config: EvalConfig, log=print) -> list[dict[str, Any]]:
    """Each run's scores, computed or read back from a file made with the same eval block."""
    spec = json.loads(json.dumps(dataclasses.asdict(config)))
    scores = []
    for i, result in enumerate(results, 1):
        path = eval_path(out, result["run"])
        previous = read_json(path) if path.is_file() else None
        if previous is not None and previous["spec"] == spec:
            log(f"eval {i}/{len(results)}: {result['run']}: scored earlier, reused")
            scores.append(previous)
            continue
        log(f"eval {i}/{len(results)}: {result['run']}")
        device = resolve_device(result["spec"]["run"]["train"]["device"])
        score = {"spec": spec} | evaluate_checkpoint(run_directory(out, result["run"]), config, device)
        write_json(path, score)
        scores.append(score)
    return scores


def evaluate_checkpoint(checkpoint: Path, config: EvalConfig, device) -> dict[str, Any]:
    """The text's figures and the tasks' metrics of one checkpoint (its run directory: the latest one)."""
    text = None
    if config.text:
        from mistura.eval.perplexity import score_checkpoint

        text = score_checkpoint(checkpoint, config.text, config.ctx, config.stride, device)
    tasks = {}
    if config.tasks:
        harness = run_harness(checkpoint, config, device)
        tasks = {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in harness.items()}
    return {"text": text, "tasks": tasks}


def run_harness(checkpoint: Path, config: EvalConfig, device) -> dict[str, dict[str, Any]]:
    """lm_eval's results of the suite's tasks (check_evaluation has found the harness and the tasks)."""
    from mistura.eval.harness import evaluate_tasks

    return evaluate_tasks(
        checkpoint,
        list(config.tasks),
        config.limit,
        config.num_fewshot,
        config.batch_size,
        config.include_path,
        device,
    )["results"]
