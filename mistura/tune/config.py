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
`dpo`, RLConfig's `rl`) and its train defaults.
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


@dataclass
class RLSettings:
    """Reinforcement learning on prompts and a reward (mistura.tune.rl): PPO or GRPO, with their coefficients.

    Every step samples group_size replies to each of train.batch_size prompts with the policy (the
    batched engine and its KV cache), scores them with the reward, and makes epochs passes over them in
    mini_batches optimizer steps. TRL's names where they differ: group_size is num_generations,
    kl_coef is PPO's kl_coef and GRPO's beta, clip is cliprange / epsilon, clip_high is epsilon_high.
    """

    algorithm: Literal["ppo", "grpo"] = "ppo"
    reward: str | None = None  # a reward spec of mistura.tune.rewards, e.g. ends_sentence or model:runs/rm
    group_size: int = 4  # replies sampled per prompt: GRPO compares them, PPO learns from each
    max_new_tokens: int = 32  # per reply; a reply that has not ended by then is cut there
    temperature: float = 1.0  # of the sampling, and of the log-probs the losses read (as TRL)
    epochs: int = 1  # passes over each step's replies (PPO's K epochs)
    mini_batches: int = 1  # optimizer steps per pass, over a shuffled split of the replies
    clip: float = 0.2  # the probability ratio's clip range (PPO's epsilon; GRPO's lower one)
    clip_high: float | None = None  # GRPO's upper clip range (DAPO's clip-higher); None: clip
    kl_coef: float = 0.05  # PPO: the KL penalty in the reward; GRPO: beta, the KL term of the loss
    kl_target: float | None = None  # PPO: steer kl_coef so the KL per reply nears this many nats (adaptive)
    kl_horizon: int = 10000  # PPO: the adaptive controller's horizon, in replies
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # PPO: the per-token KL of the reward's penalty
    gamma: float = 1.0  # PPO: GAE's discount
    lam: float = 0.95  # PPO: GAE's lambda
    vf_coef: float = 0.1  # PPO: the value loss's weight
    value_clip: float | None = 0.2  # PPO: the value update's clip range; None: unclipped
    entropy_coef: float = 0.0  # PPO: the entropy bonus's weight
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"  # GRPO: how the per-token loss is averaged
    scale_rewards: bool = True  # GRPO: divide by the group's std (False: Dr. GRPO)

    def __post_init__(self):
        positive = ("group_size", "max_new_tokens", "epochs", "mini_batches", "kl_horizon")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ConfigError("rl.group_size must be >= 2 for GRPO, which compares a prompt's replies, got 1")
        if not self.temperature > 0:
            raise ConfigError(f"rl.temperature must be > 0 (the policy samples its replies), got {self.temperature}")
        for name in ("clip", "clip_high", "value_clip"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"rl.{name} must be > 0, got {value}")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.entropy_coef < 0:
            raise ConfigError("rl.kl_coef, rl.vf_coef and rl.entropy_coef must be >= 0")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ConfigError(f"rl.kl_target must be > 0 nats, got {self.kl_target}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"rl.gamma and rl.lam must be in [0, 1], got {self.gamma} and {self.lam}")


@dataclass
class RLConfig(TunedConfig):
    """PPO or GRPO (mistura.tune.rl) on a JSONL file of prompts, data.train (data.val or a share held out)."""

    rl: RLSettings = field(default_factory=RLSettings)

    command: ClassVar[str] = "rl"
    train_defaults: ClassVar[dict[str, Any]] = FINETUNE_DEFAULTS | {
        "out_dir": "runs/rl",
        "batch_size": 8,
        "lr": 1e-5,
        "eval_interval": 10,
        "eval_batches": 4,
        "log_interval": 1,
        "checkpoint_interval": 50,
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RLConfig:
        run = super().from_dict(data)
        if run.rl.reward is None:
            raise ConfigError(
                "no reward: give --reward SPEC or set rl.reward (ends_sentence, contains:WORD, length:MIN-MAX, "
                "module:function, model:PATH, critic:PATH)"
            )
        replies = run.train.batch_size * run.rl.group_size
        if replies % run.rl.mini_batches:
            raise ConfigError(
                f"rl.mini_batches ({run.rl.mini_batches}) must divide the {replies} replies of a step "
                f"(train.batch_size {run.train.batch_size} x rl.group_size {run.rl.group_size})"
            )
        if run.train.grad_accum != 1:
            raise ConfigError("train.grad_accum must be 1 in RL: split a step's replies with rl.mini_batches instead")
        return run
