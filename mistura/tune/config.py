"""A post-training run's configuration: the YAML file `mistura finetune --config` reads (and, with a
section of their own, `mistura reward-model`, `mistura dpo` and `mistura rl`).

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
error that names it; `--set section.key=value` overrides any field. TunedConfig holds the
sections every run has; a subclass adds its own (RewardModelConfig's `reward`, DPOConfig's
`dpo`, mistura.tune.rl_config.RLConfig's `rl`) and its train defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from mistura.errors import ConfigError
from mistura.fields import convert, from_dict, merge, read_yaml
from mistura.lora.config import LoRAConfig
from mistura.train.config import TrainConfig

BASE_SECTIONS = ("base", "method", "data", "lora", "train")
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
    train: str | None = None  # a JSONL file of conversations (of pairs, of prompts)
    val: str | None = None  # a JSONL file; None holds out val_fraction of train
    val_fraction: float = 0.1
    seed: int = 1337


@dataclass
class TunedConfig:
    base: str
    method: Literal["full", "lora"] = "full"
    data: FinetuneData = field(default_factory=FinetuneData)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: from_dict(TrainConfig, FINETUNE_DEFAULTS, "train"))

    command: ClassVar[str] = "finetune"  # the CLI subcommand, for error messages
    train_defaults: ClassVar[dict[str, Any]] = FINETUNE_DEFAULTS

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunedConfig:
        sections = [f.name for f in dataclasses.fields(cls)]
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)}; expected {', '.join(sections)}")
        if data.get("base") is None:
            raise ConfigError(f"no base checkpoint: give one (mistura {cls.command} CKPT) or set base: in the config")
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError(f"train: expected a mapping of fields, got {type(train).__name__} {train!r}")
        hints = typing.get_type_hints(cls)
        own = {name: from_dict(hints[name], data.get(name) or {}, name) for name in sections[len(BASE_SECTIONS) :]}
        run = cls(
            base=convert(data["base"], str, "base"),
            method=convert(data.get("method", "full"), Literal["full", "lora"], "method"),
            data=from_dict(FinetuneData, data.get("data") or {}, "data"),
            lora=from_dict(LoRAConfig, data.get("lora") or {}, "lora"),
            train=from_dict(TrainConfig, merge(cls.train_defaults, train), "train"),
            **own,
        )
        if run.data.train is None:
            raise ConfigError("no training data: give --data FILE.jsonl or set data.train in the config")
        return run

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> TunedConfig:
        """Read a run's config (or only `overrides` without a file); `overrides` win over the file."""
        sections = ", ".join(f.name for f in dataclasses.fields(cls))
        data = read_yaml(path, f"sections {sections}") if path is not None else {}
        return cls.from_dict(merge(data, overrides or {}))


@dataclass
class FinetuneConfig(TunedConfig):
    """Supervised fine-tuning (mistura.tune.sft): the sections every run has, nothing more."""


@dataclass
class RewardSettings:
    """The reward model's Bradley-Terry loss (mistura.tune.losses.reward_model_loss)."""

    center_coef: float | None = None  # weight of mean((r_c + r_r)^2), which keeps rewards near 0


@dataclass
class RewardModelConfig(TunedConfig):
    """A reward model (mistura.tune.preference.RewardModelTrainer) on preference pairs."""

    reward: RewardSettings = field(default_factory=RewardSettings)

    command: ClassVar[str] = "reward-model"
    train_defaults: ClassVar[dict[str, Any]] = FINETUNE_DEFAULTS | {"out_dir": "runs/reward-model", "lr": 5e-4}


@dataclass
class DPOSettings:
    """DPO and its variants (mistura.tune.losses): sigmoid (DPO, cDPO with label_smoothing), ipo, simpo."""

    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    beta: float = 0.1  # SimPO's recipes use 2 to 10
    label_smoothing: float = 0.0
    gamma: float = 0.5  # SimPO's target margin

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class DPOConfig(TunedConfig):
    """Direct preference optimisation (mistura.tune.preference.DPOTrainer) on preference pairs."""

    dpo: DPOSettings = field(default_factory=DPOSettings)

    command: ClassVar[str] = "dpo"
    train_defaults: ClassVar[dict[str, Any]] = FINETUNE_DEFAULTS | {"out_dir": "runs/dpo", "lr": 5e-5}
