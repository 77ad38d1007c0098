"""A comparison suite: several models trained on the same tokens, budget and schedule.

A suite YAML names the shared sections once, then each run's model:

    name: seed004                     # optional; default: the file's stem
    data:  {source: machado, dir: data/machado-4k, vocab_size: 4096}
    model: {max_seq_len: 128}         # optional: fields every run's model shares
    train: {batch_size: 16, max_steps: 400, lr: 3e-3, ...}   # no out_dir: compare places the runs
    generation: {prompts: [...], samples_per_prompt: 2, max_new_tokens: 40, temperature: 0.8}
    eval: {tasks: [machado_cloze], limit: 200, text: texts/}   # optional: scores beside the perplexity
    runs:
      - {name: dense, model: {preset: seed004-baseline}}
      - {model: {preset: qwen-moe-4e-top1, moe: {capacity_factor: 1.25}}}   # name: the preset

`mistura compare a.yaml b.yaml` takes ordinary run configs (those of `mistura train`)
instead, one run each, named after its file, with the default generation settings; their
data and train sections must then agree (train.out_dir aside: compare places every run).

Either way every run reads the same prepared tokens in the same order (train.seed), for
the same steps x batch x max_seq_len tokens under the same schedule: only the model differs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistura.errors import ConfigError
from mistura.fields import from_dict, merge, read_yaml
from mistura.train.config import RunConfig, SampleConfig

SUITE_KEYS = {"name", "data", "model", "train", "generation", "eval", "runs"}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # run names become file names


@dataclass
class GenerationConfig(SampleConfig):
    """Samples every trained model writes: each prompt continued with seeds seed .. seed + samples_per_prompt - 1."""

    prompts: tuple[str, ...] = (
        "O amor é",
        "Era uma vez",
        "A cidade do Rio de Janeiro",
        "Capitu olhou para mim e disse",
        "Naquele tempo, a política",
    )
    max_new_tokens: int = 40
    samples_per_prompt: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ConfigError("generation.prompts: give at least one prompt, none of them empty")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"generation.samples_per_prompt: must be >= 1, got {self.samples_per_prompt}")

    @property
    def seeds(self) -> range:
        return range(self.seed, self.seed + self.samples_per_prompt)


@dataclass
class EvalConfig:
    """What every trained model is scored on beside its validation perplexity (mistura.compare.evaluate).

    tasks: lm-evaluation-harness tasks (the eval extra), mistura's own (machado_cloze) included, with
    limit, num_fewshot, batch_size and include_path as `mistura eval --tasks` takes them; text: a UTF-8
    file or folder scored as `mistura eval --text` does (perplexity, bits per byte), with ctx and stride.
    """

    tasks: tuple[str, ...] = ()
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    include_path: str | None = None
    text: str | None = None
    ctx: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if not self.tasks and not self.text:
            raise ConfigError("eval: name tasks (lm-evaluation-harness tasks), a text, or both")
        if not all(isinstance(task, str) and task.strip() for task in self.tasks):
            raise ConfigError(f"eval.tasks: task names, none of them empty, got {list(self.tasks)}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit: a number of examples (or a fraction), above 0, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size: must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Run:
    name: str  # names its files: <out>/runs/<name>/, metrics/<name>_metrics.json, ...
    config: RunConfig


@dataclass(frozen=True)
class Suite:
    name: str
    runs: list[Run]
    generation: GenerationConfig
    evaluation: EvalConfig | None = None


def load_suite(paths: list[str | Path], overrides: dict[str, Any] | None = None) -> Suite:
    """One suite YAML (it has `runs`), or run configs of one run each; `overrides` (from --set) apply to all."""
    overrides = overrides or {}
    if not paths:
        raise ConfigError("give a suite YAML or at least one run config")
    if len(paths) == 1:
        data = read_yaml(paths[0])
        if "runs" in data:
            return suite_from_dict(merge(data, overrides), Path(paths[0]).stem)
    runs = [Run(Path(path).stem, RunConfig.from_yaml(path, overrides)) for path in paths]
    name = runs[0].name if len(runs) == 1 else "comparison"
    return Suite(name, check_runs(runs), GenerationConfig())


def suite_from_dict(data: dict[str, Any], default_name: str) -> Suite:
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"unknown suite key(s) {sorted(unknown)}; expected {', '.join(sorted(SUITE_KEYS))}")
    if not isinstance(data["runs"], list) or not data["runs"]:
        raise ConfigError("runs: expected a non-empty list of runs, each {name, model}")
    train = data.get("train") or {}
    if "out_dir" in train:
        raise ConfigError("train.out_dir: compare places every run in <out>/runs/<name>; remove it from the suite")
    runs = []
    for i, entry in enumerate(data["runs"]):
        if not isinstance(entry, dict) or set(entry) - {"name", "model"} or not isinstance(entry.get("model"), dict):
            raise ConfigError(f"runs[{i}]: expected {{name, model: {{preset, ...}}}}, got {entry!r}")
        model = merge(data.get("model") or {}, entry["model"])
        name = str(entry.get("name") or model.get("preset") or f"run{i}")
        try:
            config = RunConfig.from_dict({"data": data.get("data") or {}, "train": train, "model": model})
        except ConfigError as err:
            raise ConfigError(f"run '{name}': {err}") from err
        runs.append(Run(name, config))
    generation = from_dict(GenerationConfig, data.get("generation") or {}, "generation")
    evaluation = from_dict(EvalConfig, data["eval"], "eval") if data.get("eval") is not None else None
    return Suite(str(data.get("name") or default_name), check_runs(runs), generation, evaluation)


def check_runs(runs: list[Run]) -> list[Run]:
    """Unique, file-safe names; one data section, one schedule and one sequence length for all."""
    names = set()
    for run in runs:
        if not RUN_NAME.fullmatch(run.name):
            raise ConfigError(f"run name '{run.name}': use letters, digits, '.', '_' and '-' (it names files)")
        if run.name in names:
            raise ConfigError(f"two runs are named '{run.name}': run names must be unique (they name the result files)")
        names.add(run.name)
    first = runs[0]
    for run in runs[1:]:
        for section in ("data", "train"):
            ours, theirs = (dataclasses.asdict(getattr(r.config, section)) for r in (run, first))
            for key in ours.keys() - {"out_dir"}:
                if ours[key] != theirs[key]:
                    raise ConfigError(
                        f"run '{run.name}': {section}.{key} is {ours[key]!r} but run '{first.name}' has "
                        f"{theirs[key]!r}; every run of a comparison shares the data and the training schedule"
                    )
        if run.config.model.max_seq_len != first.config.model.max_seq_len:
            raise ConfigError(
                f"run '{run.name}': model.max_seq_len {run.config.model.max_seq_len} differs from run "
                f"'{first.name}' ({first.config.model.max_seq_len}); the token budget is steps x batch x max_seq_len"
            )
    return runs
