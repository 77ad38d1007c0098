"""The training loop behind `mistura train`.

One optimizer step = grad_accum micro-batches of (batch_size, max_seq_len) tokens.
Every log_interval steps a record (loss, lr, gradient norm, tokens/s) goes to
metrics.jsonl and the trackers; every eval_interval steps the validation loss and
perplexity; every checkpoint_interval steps an atomic checkpoint that `--resume`
continues from exactly: weights, optimizer moments, RNG, data position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from mistura.checkpoint import (
    STEP_PREFIX,
    checkpoint_directory,
    complete_weights,
    latest_checkpoint,
    read_weights,
    verify,
    weights_of,
    write_model,
)
from mistura.data.bins import BatchLoader, open_tokens
from mistura.data.prepare import load_meta, prepare
from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.train import state as train_state
from mistura.train.allocator import retain_freed_memory
from mistura.train.config import DataConfig, RunConfig
from mistura.train.loggers import MetricsLog
from mistura.train.moe_metrics import MoEMonitor
from mistura.train.optim import build_optimizer, lr_at, set_lr


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on request, or by default on CUDA devices that support it; else fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


class Trainer:
    def __init__(self, run: RunConfig, log=print):
        self.cfg, self.log = run.train, log
        self.out_dir = Path(self.cfg.out_dir)
        self.device = resolve_device(self.cfg.device)
        self.amp_dtype = autocast_dtype(self.cfg.precision, self.device)
        if self.device.type == "cpu" and self.cfg.retain_cpu_memory:
            retain_freed_memory()
        self.meta = prepared_data(run.data, log)
        self.data_dir = Path(run.data.dir)
        # A small corpus can give a tokenizer smaller than asked for: the model follows the tokenizer.
        self.run = run = dataclasses.replace(
            run, model=dataclasses.replace(run.model, vocab_size=self.meta["vocab_size"])
        )

        torch.manual_seed(self.cfg.seed)
        self.model = Transformer(run.model).to(self.device)
        self.model.activation_checkpointing = self.cfg.activation_checkpointing
        self.forward = torch.compile(self.model) if self.cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay), use_buffers=False)
            if self.cfg.ema_decay is not None
            else None
        )
        tokens = open_tokens(self.data_dir / "train.bin", self.meta["dtype"])
        self.loader = BatchLoader(tokens, self.cfg.batch_size, run.model.max_seq_len, self.cfg.seed, self.device)
        self.val_tokens = open_tokens(self.data_dir / "val.bin", self.meta["dtype"])
        moe_layers = [i for i, kind in enumerate(run.model.layer_mlp) if kind != "dense"]
        self.moe_monitor = MoEMonitor(moe_layers)
        self.step = 0

    @property
    def eval_model(self) -> Transformer:
        """The weights evaluation and checkpoints use: the EMA average when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def loss(self, model: torch.nn.Module, x, y, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The language-model loss (cross-entropy) and the experts' auxiliary loss (0 in a dense model)."""
        with self._autocast():
            logits, auxes = model(x, return_aux=True)  # (B, T, V)
        main = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), label_smoothing=smoothing)
        self.moe_monitor.update(auxes)
        return main, sum((aux.loss for aux in auxes), torch.zeros((), device=main.device))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step; returns the mean main and auxiliary losses and the gradient norm before clipping."""
        set_lr(self.optimizer, lr_at(self.step, self.cfg))
        main_total = aux_total = 0.0
        for _ in range(self.cfg.grad_accum):
            x, y = self.loader.next_batch()
            main, aux = self.loss(self.forward, x, y, self.cfg.label_smoothing)
            ((main + aux) / self.cfg.grad_accum).backward()
            main_total, aux_total = main_total + main.item(), aux_total + aux.item()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.balance_step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return main_total / self.cfg.grad_accum, aux_total / self.cfg.grad_accum, float(grad_norm)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (main loss only) and perplexity over a fixed set of eval_batches batches,
        with the expert-usage metrics of those batches."""
        model = self.eval_model
        was_training = model.training
        model.eval()
        train_window = self.moe_monitor
        self.moe_monitor = MoEMonitor(train_window.layers)
        loader = BatchLoader(
            self.val_tokens, self.cfg.batch_size, self.run.model.max_seq_len, self.cfg.seed + 1, self.device
        )
        losses = [self.loss(model, *loader.next_batch(), 0.0)[0].item() for _ in range(self.cfg.eval_batches)]
        model.train(was_training)
        val_loss = sum(losses) / len(losses)
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
        metrics.update({f"val_{k}": v for k, v in self.moe_monitor.summary().items()})
        self.moe_monitor = train_window
        return metrics

    def save(self) -> Path:
        """Write checkpoints/step-XXXXXXX atomically and keep only the newest keep_checkpoints."""
        final = self.out_dir / "checkpoints" / f"{STEP_PREFIX}{self.step:07d}"
        with checkpoint_directory(final) as tmp:
            write_model(tmp, self.eval_model, self.data_dir / "tokenizer.json")
            extra = {}
            if self.ema is not None:  # model.safetensors holds the average; keep the raw weights to resume
                extra = {f"raw.{k}": v for k, v in weights_of(self.model).items()}
                extra["ema.n_averaged"] = self.ema.n_averaged
            train_state.save_state(
                tmp,
                step=self.step,
                optimizer=self.optimizer,
                loader_state=self.loader.state_dict(),
                run_config=run_to_dict(self.run),
                extra_tensors=extra,
            )
        old = sorted((self.out_dir / "checkpoints").glob(f"{STEP_PREFIX}*"))[: -self.cfg.keep_checkpoints]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return final

    def resume(self) -> None:
        """Restore the latest checkpoint of out_dir; with none, the run starts from step 0."""
        directory = latest_checkpoint(self.out_dir)
        if directory is None:
            self.log(f"no checkpoint in {self.out_dir}: starting from step 0")
            return
        verify(directory)
        meta, tensors = train_state.load_state(directory)
        weights = read_weights(directory / "model.safetensors", self.model)
        if self.ema is not None:
            self.ema.module.load_state_dict(weights)
            self.ema.n_averaged.copy_(tensors["ema.n_averaged"])
            raw = {k[len("raw.") :]: v for k, v in tensors.items() if k.startswith("raw.")}
            weights = complete_weights(raw, self.model, f"{directory} (raw weights)")
        self.model.load_state_dict(weights)
        train_state.restore_optimizer(self.optimizer, meta, tensors)
        train_state.restore_rng(tensors)
        self.loader.load_state_dict(meta["loader"])
        self.step = meta["step"]
        self.log(f"resumed from {directory} at step {self.step}")

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        metrics = MetricsLog(self.out_dir, cfg.loggers, run_to_dict(self.run), notice=self.log)
        if resume:
            self.resume()
            metrics.drop_after(self.step)
        elif metrics.path.exists():
            raise ConfigError(
                f"{self.out_dir} already holds a run: pass --resume to continue it, or choose another train.out_dir"
            )
        self.log(describe(self))
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.run.model.max_seq_len
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not progress, desc=self.out_dir.name, unit="step")
        self.model.train()
        start = window_start = time.perf_counter()
        window_steps, best = 0, math.inf
        try:
            while self.step < cfg.max_steps:
                main, aux, grad_norm = self.train_step()
                window_steps += 1
                last = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or last:
                    now = time.perf_counter()
                    rate = window_steps * self.tokens_per_step / (now - window_start)
                    metrics.write(self._train_record(main, aux, grad_norm, rate, now - start))
                    bar.set_postfix(loss=f"{main:.3f}", tok_s=f"{rate:,.0f}")
                    window_start, window_steps = now, 0
                if self.step % cfg.eval_interval == 0 or last:
                    record = self._eval_record()
                    best = min(best, record["val_loss"])
                    metrics.write(record)
                    bar.write(
                        f"step {self.step}: val loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.1f}"
                    )
                if self.step % cfg.checkpoint_interval == 0 or last:
                    self.save()
                bar.update(1)
        except KeyboardInterrupt:
            bar.write(f"interrupted: saving step {self.step}; continue with --resume")
            self.save()
            raise
        finally:
            bar.close()
            metrics.close()
        final = self.evaluate()
        return {
            "steps": self.step,
            **final,
            "best_val_loss": min(best, final["val_loss"]),
            "unigram_loss": self.meta.get("unigram_loss"),
            "wall_s": time.perf_counter() - start,
            "checkpoint": str(latest_checkpoint(self.out_dir)),
        }

    def _train_record(self, main: float, aux: float, grad_norm: float, rate: float, elapsed: float) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": main + aux,
            "loss/main": main,
            "loss/aux": aux,
            "lr": lr_at(self.step - 1, self.cfg),
            "grad_norm": grad_norm,
            "tokens_per_s": rate,
            "tokens": self.step * self.tokens_per_step,
            "elapsed_s": elapsed,
            **self.moe_monitor.summary(),
        }

    def _eval_record(self) -> dict[str, Any]:
        return {"step": self.step, **self.evaluate(), "tokens": self.step * self.tokens_per_step}


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
    data = dataclasses.asdict(run)
    data["model"] = run.model.to_dict()
    return data


def describe(trainer: Trainer) -> str:
    n_params = sum(p.numel() for p in trainer.model.parameters())
    amp = "bf16 autocast" if trainer.amp_dtype else "fp32"
    return (
        f"model {trainer.run.model.name}: {n_params / 1e6:.2f}M parameters | device {trainer.device} ({amp}) | "
        f"{trainer.cfg.max_steps} steps of {trainer.cfg.batch_size * trainer.cfg.grad_accum} x "
        f"{trainer.run.model.max_seq_len} tokens"
    )
