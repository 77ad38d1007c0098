"""Pretraining, the loop behind `mistura train`: next-token prediction on a prepared corpus.

A step's batches are random windows of (batch_size, max_seq_len) tokens of train.bin (see
mistura.data.bins); validation averages the loss over eval_batches windows of val.bin, the
same ones at every evaluation. The loop itself, with its logging, evaluation, checkpoints,
time budget and exact resume, is mistura.train.loop's; a checkpoint's model files are the
native checkpoint's with the data's tokenizer.

With parallel.data_parallel: ddp or fsdp under torchrun (see mistura.parallel.distributed), every
process draws the same global batch and trains on its rows of it; rank 0 prepares the data
first, the others then read it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mistura.checkpoint import write_model, write_model_info
from mistura.data.bins import BatchLoader, open_tokens
from mistura.data.prepare import load_meta, prepare
from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.parallel import distributed
from mistura.train.allocator import retain_freed_memory
from mistura.train.config import DataConfig, ParallelConfig, RunConfig
from mistura.train.loop import TrainLoop


class Trainer(TrainLoop):
    def __init__(self, run: RunConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        parallel = run.parallel
        layout = (parallel.data_parallel, run.train.batch_size, None)
        distributed.check_layout(*layout, parallel.expert_parallel, parallel.tensor_parallel)
        several = distributed.launched_world_size() > 1
        super().__init__(run.train, log, clock, parallel=parallel if several else None)
        if self.device.type == "cpu" and self.cfg.retain_cpu_memory:
            retain_freed_memory()
        with distributed.main_first():  # rank 0 prepares the data, if it must, before the others read it
            self.meta = prepared_data(run.data, self.log)
        self.data_dir = Path(run.data.dir)
        # A small corpus can give a tokenizer smaller than asked for: the model follows the tokenizer.
        self.run = run = dataclasses.replace(
            run, model=dataclasses.replace(run.model, vocab_size=self.meta["vocab_size"])
        )
        if several:
            distributed.check_same_config(run_to_dict(run))
        torch.manual_seed(self.cfg.seed)
        self.use_model(Transformer(run.model))
        tokens = open_tokens(self.data_dir / "train.bin", self.meta["dtype"])
        rows = self.layout.batch_rows(self.cfg.batch_size)  # every process draws the same batch, reads its rows
        cfg = self.cfg
        self.loader = BatchLoader(tokens, cfg.batch_size, run.model.max_seq_len, cfg.seed, self.device, rows=rows)
        self.val_tokens = open_tokens(self.data_dir / "val.bin", self.meta["dtype"])
        self.tokens_per_step = self.cfg.batch_size * self.cfg.grad_accum * run.model.max_seq_len

    def validation_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """eval_batches windows of val.bin, drawn with the seed after the training seed."""
        cfg = self.cfg
        loader = BatchLoader(self.val_tokens, cfg.batch_size, self.run.model.max_seq_len, cfg.seed + 1, self.device)
        return (loader.next_batch() for _ in range(cfg.eval_batches))

    def save_model_files(self, directory: Path, model: Transformer) -> None:
        write_model(directory, model, self.data_dir / "tokenizer.json")

    def save_model_info(self, directory: Path) -> None:
        write_model_info(directory, self.run.model, self.data_dir / "tokenizer.json")

    def tokens_done(self) -> int:
        return self.step * self.tokens_per_step

    def config_dict(self) -> dict[str, Any]:
        return run_to_dict(self.run)

    def describe(self) -> str:
        with torch.device("meta"):  # the whole model's count, though a process may hold only part of it
            n_params = sum(p.numel() for p in Transformer(self.run.model).parameters())
        amp = "bf16 autocast" if self.amp_dtype else "fp32"
        cfg = self.cfg
        budget = "" if cfg.max_minutes is None else f" (or {cfg.max_minutes:g} min of training)"
        ddp = ""
        if self.layout.tensor_mesh is not None:
            ddp = f" | tensor-parallel over {self.layout.tensor_mesh.size()} processes"
            if self.layout.data_mesh.size() > 1:
                ddp += f", data-parallel ({self.parallel.data_parallel}) over {self.layout.data_mesh.size()} groups"
        elif self.data_parallel:
            ddp = f" | data-parallel ({self.parallel.data_parallel}) over {distributed.world_size()} processes"
        if self.layout.expert_mesh is not None:
            ddp += f", experts split over {self.parallel.expert_parallel}"
        return (
            f"model {self.run.model.name}: {n_params / 1e6:.2f}M parameters | device {self.device} ({amp}) | "
            f"{cfg.max_steps} steps{budget} of {cfg.batch_size * cfg.grad_accum} x {self.run.model.max_seq_len} tokens"
            f"{ddp}"
        )

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        """Train (see TrainLoop.fit); the summary adds the corpus's unigram loss, a baseline to beat."""
        return {**super().fit(resume, progress), "unigram_loss": self.meta.get("unigram_loss")}


def prepared_data(data: DataConfig, log=print) -> dict[str, Any]:
    """The prepared data's meta, preparing it first if `data.dir` does not hold it yet."""
    directory = Path(data.dir)
    if not (directory / "meta.json").exists():
        log(f"preparing {data.source} into {directory} (once)")
        prepare(
            data.source, directory, vocab_size=data.vocab_size, val_fraction=data.val_fraction, seed=data.seed, log=log
        )
    meta = load_meta(directory)
    if meta["requested_vocab_size"] != data.vocab_size:
        raise ConfigError(
            f"data.dir {directory} was prepared with vocab_size={meta['requested_vocab_size']}, the config asks for "
            f"{data.vocab_size}: choose another data.dir or delete it to prepare again"
        )
    return meta


def run_to_dict(run: RunConfig) -> dict[str, Any]:
    """The run's config as plain data; the parallel section only when it is not the default (one process),
    so a single-process run records what it always did."""
    data = dataclasses.asdict(run)
    data["model"] = run.model.to_dict()
    if run.parallel == ParallelConfig():
        del data["parallel"]
    return data
