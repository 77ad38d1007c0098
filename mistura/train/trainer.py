"""The training loop behind `mistura train`.

One optimizer step = grad_accum micro-batches of (batch_size, max_seq_len) tokens.
Every log_interval steps a record (loss, lr, gradient norm, tokens/s) goes to
metrics.jsonl and the trackers; every eval_interval steps the validation loss and
perplexity; every checkpoint_interval steps an atomic checkpoint that `--resume`
continues from exactly: weights, optimizer moments, RNG, data position.

Training ends at max_steps or, with train.max_minutes set, when the time spent training
reaches that budget, whichever comes first; the learning-rate schedule follows the
fraction of the run done (train.optim.fraction_done), so its cosine ends at the floor
either way. The budget counts the optimizer steps only (forward, backward, update and
their batches, and so a torch.compile's compilation in the first step), not evaluation,
checkpoints or start-up: the same work, so the same schedule, whether or not a run was
interrupted. Those seconds are saved with each checkpoint, and a resumed run spends what
is left of the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
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
from mistura.train.optim import build_optimizer, fraction_done, lr_at, set_lr

BUDGET_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"


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
    def __init__(self, run: RunConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        self.cfg, self.log, self.clock = run.train, log, clock
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
        self.train_seconds = 0.0  # spent in optimizer steps, this run and those it resumes

    @property
    def fraction_done(self) -> float:
        """The fraction of the run done, from 0 to 1 (see train.optim.fraction_done)."""
        return fraction_done(self.step, self.train_seconds, self.cfg)

    @property
    def stopped_by_time(self) -> bool:
        return self.fraction_done >= 1.0 and self.step < self.cfg.max_steps

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
        set_lr(self.optimizer, lr_at(self.step, self.cfg, self.fraction_done))
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

    def timed_step(self) -> tuple[float, float, float]:
        """train_step, adding its duration to train_seconds."""
        begin = self.clock()
        result = self.train_step()
        self.train_seconds += self.clock() - begin
        return result

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
                train_seconds=self.train_seconds,
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
        self.train_seconds = train_state.train_seconds(meta)
        self.log(f"resumed from {directory} at step {self.step} ({self.train_seconds:.0f} s of training)")

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        metrics = self._open_metrics(resume)
        self.log(describe(self))
        self.tokens_per_step = self.cfg.batch_size * self.cfg.grad_accum * self.run.model.max_seq_len
        bar = self._progress_bar(progress)
        self.model.train()
        start = self.clock()
        try:
            best = self._loop(metrics, bar, start)
        except KeyboardInterrupt:
            bar.write(f"interrupted: saving step {self.step}; continue with --resume")
            self.save()
            raise
        finally:
            bar.close()
            metrics.close()
        self.log(self._ending())
        final = self.evaluate()
        return {
            "steps": self.step,
            **final,
            "best_val_loss": min(best, final["val_loss"]),
            "unigram_loss": self.meta.get("unigram_loss"),
            "wall_s": self.clock() - start,
            "train_s": self.train_seconds,
            "max_steps": self.cfg.max_steps,
            "max_minutes": self.cfg.max_minutes,
            "stopped_by": self._stopped_by(),
            "checkpoint": str(latest_checkpoint(self.out_dir)),
        }

    def _open_metrics(self, resume: bool) -> MetricsLog:
        """The run's metrics log, after restoring the latest checkpoint when resuming."""
        metrics = MetricsLog(self.out_dir, self.cfg.loggers, run_to_dict(self.run), notice=self.log)
        if resume:
            self.resume()
            metrics.drop_after(self.step)
        elif metrics.path.exists():
            raise ConfigError(
                f"{self.out_dir} already holds a run: pass --resume to continue it, or choose another train.out_dir"
            )
        return metrics

    def _loop(self, metrics: MetricsLog, bar: tqdm, start: float) -> float:
        """Train until the run is done, logging, evaluating and saving on the way; returns the best validation loss."""
        cfg = self.cfg
        window_start, window_steps, best = self.clock(), 0, math.inf
        while self.fraction_done < 1.0:
            main, aux, grad_norm = self.timed_step()
            window_steps += 1
            last = self.fraction_done >= 1.0
            if self.step % cfg.log_interval == 0 or last:
                now = self.clock()
                rate = window_steps * self.tokens_per_step / (now - window_start)
                metrics.write(self._train_record(main, aux, grad_norm, rate, now - start, last))
                bar.set_postfix(loss=f"{main:.3f}", tok_s=f"{rate:,.0f}", step=self.step)
                window_start, window_steps = now, 0
            if self.step % cfg.eval_interval == 0 or last:
                record = self._eval_record()
                best = min(best, record["val_loss"])
                metrics.write(record)
                bar.write(f"step {self.step}: val loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.1f}")
            if self.step % cfg.checkpoint_interval == 0 or last:
                self.save()
            self._advance(bar)
        return best

    def _progress_bar(self, enabled: bool) -> tqdm:
        """Steps out of max_steps; with a time budget, the percentage of the run done, whose end
        (and so the time left) is whichever of max_steps and the budget comes first."""
        name = self.out_dir.name
        if self.cfg.max_minutes is None:
            return tqdm(total=self.cfg.max_steps, initial=self.step, disable=not enabled, desc=name, unit="step")
        desc = f"{name} ({self.cfg.max_minutes:g} min or {self.cfg.max_steps} steps)"
        return tqdm(total=100, initial=100 * self.fraction_done, disable=not enabled, desc=desc, bar_format=BUDGET_BAR)

    def _advance(self, bar: tqdm) -> None:
        bar.update(1 if self.cfg.max_minutes is None else 100 * self.fraction_done - bar.n)

    def _stopped_by(self) -> str:
        return "time_budget" if self.stopped_by_time else "max_steps"

    def _ending(self) -> str:
        cfg = self.cfg
        if self.stopped_by_time:
            return f"stopped by the time budget ({cfg.max_minutes:g} min) at step {self.step} of {cfg.max_steps}"
        budget = "" if cfg.max_minutes is None else f" of the {cfg.max_minutes:g} min budget"
        return f"reached max_steps {cfg.max_steps} after {self.train_seconds / 60:.1f} min of training{budget}"

    def _train_record(
        self, main: float, aux: float, grad_norm: float, rate: float, elapsed: float, last: bool
    ) -> dict[str, Any]:
        record = {
            "step": self.step,
            "loss": main + aux,
            "loss/main": main,
            "loss/aux": aux,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": rate,
            "tokens": self.step * self.tokens_per_step,
            "elapsed_s": elapsed,
            "train_s": self.train_seconds,
            "fraction_done": self.fraction_done,
            **self.moe_monitor.summary(),
        }
        if last:
            record["stopped_by"] = self._stopped_by()
        return record

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
    budget = "" if trainer.cfg.max_minutes is None else f" (or {trainer.cfg.max_minutes:g} min of training)"
    return (
        f"model {trainer.run.model.name}: {n_params / 1e6:.2f}M parameters | device {trainer.device} ({amp}) | "
        f"{trainer.cfg.max_steps} steps{budget} of {trainer.cfg.batch_size * trainer.cfg.grad_accum} x "
        f"{trainer.run.model.max_seq_len} tokens"
    )
