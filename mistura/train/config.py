"""A training run's configuration: the YAML file `mistura train` reads.

    model:  a preset and overrides (see mistura.config.ModelConfig)
    data:   which corpus, where its prepared tokens live, the tokenizer size
    train:  optimisation, schedule, evaluation, checkpoints, logging
    sample: prompts written after training
    parallel: how several processes share the run (data-parallel under torchrun)

Every section is a validated dataclass: an unknown key or a wrong type is an error
that names it. `--set section.key=value` overrides any field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mistura.config import ModelConfig
from mistura.errors import ConfigError
from mistura.fields import from_dict, merge, read_yaml
from mistura.infer.sampling import Sampling


@dataclass
class DataConfig:
    source: str = "machado"  # "machado" (embedded corpus), a folder of .txt files, or one .txt file
    dir: str = "data/machado"  # where `mistura prepare` writes tokenizer.json, train.bin, val.bin
    vocab_size: int = 8192
    val_fraction: float = 0.1
    seed: int = 1337


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 1337
    device: str = "auto"  # auto: cuda, then mps, then cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA when supported
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None  # a training-time budget: stop at it or at max_steps (see train.trainer)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # e.g. 0.999; evaluation then uses the averaged weights
    activation_checkpointing: bool = False
    compile: bool = False
    retain_cpu_memory: bool = True  # on the CPU, glibc keeps freed memory for reuse (see train.allocator)
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    loggers: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise ConfigError(f"train.max_minutes: must be a positive number of minutes, got {self.max_minutes}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(
                f"train.warmup_steps: must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas: expected two values in [0, 1), got {list(self.betas)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in (0, 1), got {self.ema_decay}")


@dataclass
class SampleConfig(Sampling):
    """Text written by the trained model at the end of the run."""

    prompts: tuple[str, ...] = ("Capitu", "O amor é", "Naquele tempo, a cidade")


@dataclass
class ParallelConfig:
    """How the processes torchrun starts share a run (see mistura.parallel.distributed).

    none: one process; under torchrun (WORLD_SIZE > 1) that is an error, not N copies of the run.
    ddp: each process trains on its rows of every global batch (train.batch_size, divisible by the
    number of processes) and DistributedDataParallel averages the gradients; run alone, one process.
    fsdp: the same rows, but each process holds only its shard of every parameter, gradient and
    optimizer moment (FSDP2's fully_shard, ZeRO-3), and checkpoints are distributed: each process
    writes its shards (see mistura.parallel.fsdp and dcp). mixed_precision bf16 runs the forward and
    backward on bf16 copies of the gathered parameters and reduces the gradients in fp32;
    cpu_offload keeps the shards, their gradients and the optimizer state in CPU memory.
    expert_parallel ep (with ddp or fsdp): each process holds n_experts / ep of every MoE layer's
    routed experts, and tokens travel to their experts by all_to_all (see mistura.parallel.expert);
    ep divides the number of processes, and checkpoints are distributed. With fsdp, each process's
    experts are sharded further over the processes that hold the same ones.
    tensor_parallel tp: every layer split Megatron-style over groups of tp processes (see
    mistura.parallel.tensor), which train on the same rows; alone, tp is the number of processes;
    with ddp or fsdp, the processes form a (world / tp, tp) mesh, and FSDP shards (DDP replicates) each tp slice
    over the data-parallel dimension, whose processes train on their own rows; with expert_parallel ep too, the
    experts are split over ep of those data-parallel groups (a (world / (ep * tp), ep, tp) mesh), each group's tp
    processes running the same experts on the same rows. Checkpoints are distributed.
    """

    data_parallel: Literal["none", "ddp", "fsdp"] = "none"
    mixed_precision: Literal["none", "bf16"] = "none"  # fsdp: the dtype of gathered parameters
    cpu_offload: bool = False  # fsdp: shards, gradients and optimizer state in CPU memory
    expert_parallel: int = 1  # each MoE layer's routed experts split over groups of this many processes
    tensor_parallel: int = 1  # heads, hidden channels and vocabulary split over groups of this many processes
    timeout_s: float = 300.0  # how long a collective waits for the other processes: a dead one fails the run

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s < math.inf:
            raise ConfigError(f"parallel.timeout_s: must be a positive number of seconds, got {self.timeout_s}")
        if self.expert_parallel < 1:
            raise ConfigError(f"parallel.expert_parallel: must be >= 1, got {self.expert_parallel}")
        if self.expert_parallel > 1 and self.data_parallel == "none":
            raise ConfigError(
                "parallel.expert_parallel runs beside parallel.data_parallel: ddp or fsdp (each process trains on "
                "its own rows)"
            )
        if self.tensor_parallel < 1:
            raise ConfigError(f"parallel.tensor_parallel: must be >= 1, got {self.tensor_parallel}")
        if self.data_parallel != "fsdp" and (self.mixed_precision != "none" or self.cpu_offload):
            raise ConfigError(
                "parallel.mixed_precision and parallel.cpu_offload are FSDP's: set parallel.data_parallel: fsdp "
                "(train.precision sets the autocast dtype of a ddp or single-process run)"
            )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        unknown = set(data) - {"model", "data", "train", "sample", "parallel"}
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)}; expected model, data, train, sample, parallel")
        data_config = from_dict(DataConfig, data.get("data") or {}, "data")
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model: expected a mapping of fields, got {type(model).__name__} {model!r}")
        model = dict(model)
        if model.setdefault("vocab_size", data_config.vocab_size) != data_config.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({model['vocab_size']}) differs from data.vocab_size ({data_config.vocab_size}): "
                "the model's vocabulary is the tokenizer's, so set data.vocab_size only"
            )
        return cls(
            model=ModelConfig.from_dict(model),
            data=data_config,
            train=from_dict(TrainConfig, data.get("train") or {}, "train"),
            sample=from_dict(SampleConfig, data.get("sample") or {}, "sample"),
            parallel=from_dict(ParallelConfig, data.get("parallel") or {}, "parallel"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Read a run config; `overrides` (nested, from `--set`) win over the file."""
        data = read_yaml(path, "sections model, data, train, sample, parallel")
        return cls.from_dict(merge(data, overrides or {}))
