"""A fine-tuning run's configuration: the YAML file `mistura finetune --config` reads.

    base:    the checkpoint to fine-tune (a checkpoint or a run folder; CKPT on the command line)
    method:  full (every weight trains) or lora (adapters on the frozen base, see mistura.lora)
    data:    train and val JSONL files (see mistura.tune.data); without val, val_fraction of
             train's examples, drawn with seed, are held out for validation
    lora:    the adapters (mistura.lora.LoRAConfig: rank, alpha, dropout, rslora, targets),
             read when method is lora
    train:   mistura.train.config.TrainConfig (lr, batch_size in examples, max_steps,
             max_minutes, eval_interval, checkpoint_interval, out_dir, ...), whose unset
             fields take FINETUNE_DEFAULTS first: a fine-tune is short and gentle

Every section is validated as `mistura train`'s are: an unknown key or a wrong type is an
error that names it; `--set section.key=value` overrides any field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mistura.errors import ConfigError
from mistura.fields import convert, from_dict, merge, read_yaml
from mistura.lora.config import LoRAConfig
from mistura.train.config import TrainConfig

SECTIONS = ("base", "method", "data", "lora", "train")
FINETUNE_DEFAULTS = {
    "out_dir": "runs/finetune",
    "max_steps": 200,
    "lr": 1e-4,
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "eval_interval": 50,
    "checkpoint_interval": 100,
    "log_interval": 5,
}


@dataclass
class FinetuneData:
    train: str | None = None  # a JSONL file of conversations
    val: str | None = None  # a JSONL file; None holds out val_fraction of train
    val_fraction: float = 0.1
    seed: int = 1337


@dataclass
class FinetuneConfig:
    base: str
    method: Literal["full", "lora"] = "full"
    data: FinetuneData = field(default_factory=FinetuneData)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: from_dict(TrainConfig, FINETUNE_DEFAULTS, "train"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)}; expected {', '.join(SECTIONS)}")
        if data.get("base") is None:
            raise ConfigError("no base checkpoint: give one (mistura finetune CKPT) or set base: in the config")
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError(f"train: expected a mapping of fields, got {type(train).__name__} {train!r}")
        run = cls(
            base=convert(data["base"], str, "base"),
            method=convert(data.get("method", "full"), Literal["full", "lora"], "method"),
            data=from_dict(FinetuneData, data.get("data") or {}, "data"),
            lora=from_dict(LoRAConfig, data.get("lora") or {}, "lora"),
            train=from_dict(TrainConfig, merge(FINETUNE_DEFAULTS, train), "train"),
        )
        if run.data.train is None:
            raise ConfigError("no training data: give --data FILE.jsonl or set data.train in the config")
        return run

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
        """Read a fine-tuning config (or only `overrides` without a file); `overrides` win over the file."""
        data = read_yaml(path, f"sections {', '.join(SECTIONS)}") if path is not None else {}
        return cls.from_dict(merge(data, overrides or {}))
