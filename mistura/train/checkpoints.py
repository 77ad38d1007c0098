"""A training run's checkpoints: how the loop saves them and resumes from one (see mistura.train.loop).

Two formats, by how the run holds its weights (mistura.checkpoint describes both):
- whole, when every process holds all of them (one process, or ddp): rank 0 writes the native
  checkpoint, model files and the training state (mistura.train.state), atomically;
- distributed, when each process holds only part of them (fsdp, expert or tensor parallelism): every
  process writes its shards, rank 0 the rest (mistura.parallel.dcp).

A distributed checkpoint resumes whatever the layout, one process included; a whole one resumes in a
run that holds whole weights. Only the newest train.keep_checkpoints are kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from mistura.checkpoint import (
    STEP_PREFIX,
    checkpoint_directory,
    complete_weights,
    is_distributed,
    latest_checkpoint,
    verify,
    weights_of,
)
from mistura.errors import CheckpointError
from mistura.parallel import dcp
from mistura.train import state as train_state


class Checkpoints:
    """TrainLoop's saving and resuming; the attributes and hooks it reads are TrainLoop's."""

    def save(self) -> Path:
        """Write checkpoints/step-XXXXXXX atomically and keep only the newest keep_checkpoints: rank 0 alone,
        or each process its shards of a distributed checkpoint."""
        final = self.out_dir / "checkpoints" / f"{STEP_PREFIX}{self.step:07d}"
        if self.layout.splits_weights:
            experts = self.layout.expert_mesh
            tensors, param_groups = dcp.training_state(self.model, self.optimizer, self.averaged, experts)
            dcp.save(final, tensors, lambda tmp: self._save_beside_shards(tmp, param_groups))
        elif self.main:
            with checkpoint_directory(final) as tmp:
                self.save_model_files(tmp, self.eval_model)
                raw = {} if self.ema is None else {f"raw.{k}": v for k, v in weights_of(self.model).items()}
                self._save_state(tmp, self.optimizer, raw)  # with EMA, the raw weights to resume from
        if self.main:
            old = sorted((self.out_dir / "checkpoints").glob(f"{STEP_PREFIX}*"))[: -self.cfg.keep_checkpoints]
            for path in old:
                shutil.rmtree(path, ignore_errors=True)
        return final

    def _save_beside_shards(self, directory: Path, param_groups: list[dict[str, Any]]) -> None:
        """Rank 0's files of a distributed checkpoint: the model's config and tokenizer, the training state."""
        self.save_model_info(directory)
        self._save_state(directory, param_groups)

    def _save_state(
        self,
        directory: Path,
        optimizer: torch.optim.Optimizer | list[dict[str, Any]],
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        extra = dict(tensors or {})
        if self.ema is not None:
            extra["ema.n_averaged"] = self.ema.n_averaged
        train_state.save_state(
            directory,
            step=self.step,
            train_seconds=self.train_seconds,
            optimizer=optimizer,
            loader_state=self.loader.state_dict(),
            run_config=self.config_dict(),
            extra_tensors=extra,
            extra_state=self.extra_state(),
        )

    def resume(self) -> None:
        """Restore the latest checkpoint of out_dir; with none, the run starts from step 0."""
        directory = latest_checkpoint(self.out_dir)
        if directory is None:
            self.log(f"no checkpoint in {self.out_dir}: starting from step 0")
            return
        verify(directory)
        meta, tensors = train_state.load_state(directory)
        if is_distributed(directory):
            groups = meta["optimizer"]["param_groups"]
            dcp.restore(directory, groups, self.model, self.optimizer, self.averaged, self.layout.expert_mesh)
        elif self.layout.splits_weights:
            raise CheckpointError(
                f"{directory} is a single-process checkpoint, and a run that splits its weights (parallel."
                "data_parallel: fsdp, expert_parallel or tensor_parallel) resumes distributed checkpoints only: "
                "resume it with parallel.data_parallel ddp or none, and neither expert nor tensor parallelism"
            )
        else:
            self._load_full(directory, meta, tensors)
        if self.ema is not None:
            self.ema.n_averaged.copy_(tensors["ema.n_averaged"])
        train_state.restore_rng(tensors)
        self.loader.load_state_dict(meta["loader"])
        self.load_extra_state(meta.get("extra", {}))
        self.step = meta["step"]
        self.train_seconds = train_state.train_seconds(meta)
        self.log(f"resumed from {directory} at step {self.step} ({self.train_seconds:.0f} s of training)")

    def _load_full(self, directory: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """The weights and optimizer of a checkpoint one process wrote."""
        if self.ema is not None:
            self.load_model_files(directory, self.averaged)
            raw = {k[len("raw.") :]: v for k, v in tensors.items() if k.startswith("raw.")}
            self.model.load_state_dict(complete_weights(raw, self.model, f"{directory} (raw weights)"))
        else:
            self.load_model_files(directory, self.model)
        train_state.restore_optimizer(self.optimizer, meta, tensors)
