"""`mistura compare`: train every run of a suite, each in a fresh process, then plots and a report.

    <out>/runs/<run>/                          the run's training directory (checkpoints/,
                                               metrics.jsonl) and compare_run.json, what it
                                               was asked to train
    <out>/generations/<run>_generations.json   its samples: prompts x seeds, with the settings
    <out>/metrics/<run>_metrics.json           written last: a run with this file is finished
                                               (fields in mistura/compare/metrics.py)
    <out>/evals/<run>_eval.json                its scores on the suite's eval: block, if it has one
                                               (mistura/compare/evaluate.py)
    <out>/plots/*.png, <out>/report.md         drawn again from every metrics file at the end

Each run trains in its own Python process (mistura.compare.worker), so the peak memory it
reports is its own, and nothing a model leaves behind (allocator caches, threads) slows the
next one. Before any training the parameters and FLOPs per token of every
model are printed; then each run shows an overall line (run i of n, ETA) and its own bar.

Interrupted? Run the same command again: finished runs are skipped, the unfinished one
resumes from its latest checkpoint (its loss curve continues as if never stopped), and a run
whose configuration changed since is refused instead of silently mixed with the old one.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mistura.atomic import write_json
from mistura.compare.counts import counts_table, match_configs
from mistura.compare.evaluate import check_evaluation, evaluate_runs
from mistura.compare.plots import write_plots
from mistura.compare.report import write_report
from mistura.compare.suite import GenerationConfig, Run, Suite
from mistura.compare.worker import SPEC_FILE, metrics_path, read_json, run_directory
from mistura.errors import ConfigError, MisturaError
from mistura.train.trainer import prepared_data, run_to_dict


def compare(
    suite: Suite,
    out: str | Path,
    match: str | None = None,
    progress: bool = True,
    command: str = "mistura compare",
    log=print,
) -> list[dict[str, Any]]:
    """Train (or skip, or resume) every run of the suite, then write plots and report; returns the runs' metrics."""
    out = Path(out)
    if suite.evaluation:
        check_evaluation(suite.evaluation)  # a typo in a task name is found now, not after the training
    meta = prepared_data(suite.runs[0].config.data, log)  # once, before the runs start
    runs = sized_runs(suite.runs, meta["vocab_size"], match, log)
    first = runs[0].config
    log(
        f"every run: {first.train.max_steps} steps x {first.train.batch_size * first.train.grad_accum} x "
        f"{first.model.max_seq_len} tokens, seed {first.train.seed}, results in {out}"
    )
    results, durations, started = [], [], time.perf_counter()
    for i, run in enumerate(runs, 1):
        spec = run_spec(run, suite.generation)
        result = finished(out, run.name, spec)
        if result is not None:
            log(f"run {i}/{len(runs)}: {run.name}: finished earlier, skipped")
        else:
            log(overall_line(i, len(runs), run.name, durations, time.perf_counter() - started))
            run_started = time.perf_counter()
            result = train_in_subprocess(out, run.name, spec, progress)
            durations.append(time.perf_counter() - run_started)
        results.append(result)
    scores = evaluate_runs(results, out, suite.evaluation, log) if suite.evaluation else None
    write_plots(results, out / "plots")
    report = write_report(results, out, suite.name, command, scores)
    log(f"all {len(runs)} runs done in {duration(time.perf_counter() - started)}; report: {report}")
    return results


def sized_runs(runs: list[Run], vocab_size: int, match: str | None, log) -> list[Run]:
    """The runs with their models matched (if asked), after printing every model's counts.

    Counting uses the tokenizer's real vocabulary, which the trainer gives the model (a
    small corpus may yield fewer tokens than data.vocab_size asks for); the configs keep
    data.vocab_size, as RunConfig requires.
    """
    named = [(run.name, dataclasses.replace(run.config.model, vocab_size=vocab_size)) for run in runs]
    models = match_configs(named, match) if match else [model for _, model in named]
    log(counts_table([(run.name, model) for run, model in zip(runs, models)]))
    return [
        dataclasses.replace(
            run,
            config=dataclasses.replace(
                run.config, model=dataclasses.replace(model, vocab_size=run.config.model.vocab_size)
            ),
        )
        for run, model in zip(runs, models)
    ]


def run_spec(run: Run, generation: GenerationConfig) -> dict[str, Any]:
    """What a run trains and samples, as JSON; without its place (train.out_dir), so a moved folder still matches."""
    config = run_to_dict(run.config)
    del config["train"]["out_dir"]
    return json.loads(json.dumps({"name": run.name, "run": config, "generation": dataclasses.asdict(generation)}))


def finished(out: Path, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a run finished earlier with this spec, None if it has not finished; a changed spec is an error."""
    path, spec_path = metrics_path(out, name), run_directory(out, name) / SPEC_FILE
    result = read_json(path) if path.is_file() else None
    previous = result["spec"] if result is not None else read_json(spec_path) if spec_path.is_file() else None
    if previous is not None and previous != spec:
        raise ConfigError(
            f"run '{name}' in {out} was made with another configuration (model, data, schedule or samples): "
            f"delete {run_directory(out, name)} and {path}, or choose another --out"
        )
    return result


def overall_line(i: int, n: int, name: str, durations: list[float], elapsed: float) -> str:
    """E.g. "run 3/6: qwen-moe-8e-top2 | 10 min 02 s so far | ETA 20 min 05 s" (mean run time x runs left)."""
    eta = duration(sum(durations) / len(durations) * (n - i + 1)) if durations else "after the first run"
    return f"run {i}/{n}: {name} | {duration(elapsed)} so far | ETA {eta}"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def train_in_subprocess(out: Path, name: str, spec: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Train, sample and measure one run in a fresh Python process; returns its metrics."""
    run_directory(out, name).mkdir(parents=True, exist_ok=True)
    write_json(run_directory(out, name) / SPEC_FILE, spec)
    command = [sys.executable, "-m", "mistura.compare.worker", str(out), name] + ([] if progress else ["--no-progress"])
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # the child got the same Ctrl-C: let it save its checkpoint
        raise
    path = metrics_path(out, name)
    if code != 0 or not path.is_file():
        raise MisturaError(
            f"run '{name}' failed (exit code {code}; its output above says why); run compare again to resume it"
        )
    return read_json(path)
