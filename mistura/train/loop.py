"""The optimisation loop every training run shares: pretraining, distillation, fine-tuning.

One optimizer step = grad_accum batches. Every log_interval steps a record (loss, lr,
gradient norm, tokens/s) goes to metrics.jsonl and the trackers; every eval_interval steps
the validation loss and perplexity; every checkpoint_interval steps an atomic checkpoint
that `--resume` continues from exactly: weights, optimizer moments, RNG, data position.

Training ends at max_steps or, with train.max_minutes set, when the time spent training
reaches that budget, whichever comes first; the learning-rate schedule follows the
fraction of the run done (train.optim.fraction_done), so its cosine ends at the floor
either way. The budget counts the optimizer steps only (forward, backward, update and
their batches, and so a torch.compile's compilation in the first step), not evaluation,
checkpoints or start-up: the same work, so the same schedule, whether or not a run was
interrupted. Those seconds are saved with each checkpoint, and a resumed run spends what
is left of the budget.

What differs between runs, a subclass supplies (mistura.train.trainer.Trainer pretrains,
mistura.tune.sft.FineTuner fine-tunes):

    use_model(model)               in its constructor: the model to train
    self.loader                    the training batches, a `Batches`
    loss(model, batch, smoothing)  a batch's loss; by default the cross-entropy of a batch (x, y),
                                   positions whose label is IGNORE left out
    validation_batches()           the batches evaluate() averages the loss over, the same each time
    save_model_files(dir, model)   the model's files in a checkpoint; load_model_files reads them back
    save_model_info(dir)           a sharded run's: the files beside the weights of a distributed checkpoint
    tokens_done(), config_dict(), describe()

and may change what a step logs and what evaluation watches:

    extra_metrics()                more fields of each training record (the step's own statistics)
    extra_state(), load_extra_state(state)   more of the run's state in each checkpoint (JSON values)
    monitor, monitor_mode          the evaluation field whose best the run reports, "val_loss" and
                                   "min" by default (a reinforcement-learning run watches its reward)
    eval_at_start                  evaluate once before the first step too (a run that starts fresh)
    eval_message(record)           the line an evaluation prints

The device and precision a run trains in are mistura.train.device's, its progress bar and
closing line mistura.train.progress's, its checkpoints mistura.train.checkpoints', its layout over
the processes mistura.train.layout's, its data-parallel plumbing mistura.parallel.distributed's.

Data-parallel (given the run's parallel section, inside mistura.parallel.distributed.process_group):
each process trains on its rows of the global batch (the subclass's loader gives them). With ddp
the model trains wrapped in DistributedDataParallel, gradients all-reduced once a step (no_sync over
the micro-batches of gradient accumulation but the last); with fsdp it is sharded in place (see
mistura.parallel.fsdp), gradients reduce-scattered to their shards after each backward, the clipping
norm taken over every shard, the EMA average sharded alike, and every checkpoint distributed (see
mistura.parallel.dcp). The logged training loss is averaged over the processes, the
experts' loads are summed before their bias step, and the time a step took is the slowest
process's, so every process follows the same schedule and keeps the same weights. Evaluation runs
on every process, on the same batches with the same weights (sharded, gathering them as it goes).
Rank 0 alone prints and writes metrics.jsonl; it writes the checkpoints too, except a distributed
one's shards, which each process writes; all of them wait for each checkpoint to be in place, and
resume from the same one. A distributed checkpoint resumes at any number of processes, one included.
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from mistura.checkpoint import (
    latest_checkpoint,
    read_weights,
)
from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.parallel import distributed, expert, fsdp
from mistura.train.checkpoints import Checkpoints
from mistura.train.config import ParallelConfig, TrainConfig
from mistura.train.device import autocast_dtype, resolve_device
from mistura.train.layout import Layout
from mistura.train.loggers import MetricsLog
from mistura.train.moe_metrics import MoEMonitor
from mistura.train.optim import build_optimizer, fraction_done, lr_at, set_lr
from mistura.train.progress import advance, ending, progress_bar

IGNORE = -100  # a label the loss leaves out (cross-entropy's ignore_index)


class Batches(Protocol):
    """A source of training batches whose position a checkpoint saves: the next batch after
    `load_state_dict(state_dict())` is the one that would have followed."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainLoop(Checkpoints, ABC):
    loader: Batches
    monitor, monitor_mode = "val_loss", "min"
    eval_at_start = False

    def __init__(
        self,
        cfg: TrainConfig,
        log=print,
        clock: Callable[[], float] = time.perf_counter,
        parallel: ParallelConfig | None = None,
    ):
        """`parallel`: the run's parallel section when it trains on several processes, else None."""
        if parallel is not None and not distributed.initialized():
            raise RuntimeError("data-parallel training runs inside mistura.parallel.distributed.process_group")
        self.parallel = parallel
        self.data_parallel = data_parallel = parallel is not None
        self.main = not data_parallel or distributed.is_main()  # the process that prints and writes
        self.cfg, self.log, self.clock = cfg, log if self.main else distributed.quiet, clock
        self.out_dir = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device)
        if data_parallel and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU (its LOCAL_RANK)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.step = 0
        self.train_seconds = 0.0  # spent in optimizer steps, this run and those it resumes

    def use_model(self, model: Transformer) -> None:
        """Train `model` (its parameters that require gradients): on the device, laid out over the processes, with
        its optimizer and EMA (an average laid out alike)."""
        self.model = model.to(self.device)
        self.model.activation_checkpointing = self.cfg.activation_checkpointing
        self.layout = layout = Layout.of(self.parallel, self.device)
        self.ema = None
        if self.cfg.ema_decay is not None:
            self.ema = AveragedModel(self.model, use_buffers=False, **layout.ema_update(self.cfg.ema_decay))
        for module in (self.model, self.averaged):  # before the optimizer takes the parameters
            if module is not None:
                layout.split_(module)
        self.forward, self.ddp = self.model, None
        if layout.several and not layout.sharded and layout.tensor_mesh is None:
            own_experts = expert.expert_parameters(self.model)  # each process's are its own: not all-reduced
            self.ddp = self.forward = distributed.data_parallel_model(self.model, self.device, own_experts)
        if self.cfg.compile:
            self.forward = torch.compile(self.forward)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.moe_monitor = MoEMonitor([i for i, kind in enumerate(model.config.layer_mlp) if kind != "dense"])

    @abstractmethod
    def validation_batches(self) -> Iterable[Any]:
        """The batches evaluate() averages the main loss over: the same ones at every evaluation."""

    @abstractmethod
    def save_model_files(self, directory: Path, model: Transformer) -> None:
        """Write `model` into a checkpoint being built in `directory` (beside the training state)."""

    @abstractmethod
    def tokens_done(self) -> int:
        """The tokens of the batches trained on so far."""

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The run's resolved config, as saved in metrics and checkpoints."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what the run trains, where and for how long."""

    def extra_metrics(self) -> dict[str, float]:
        """Fields a subclass adds to every training record: none by default."""
        return {}

    def eval_message(self, record: dict[str, Any]) -> str:
        """What an evaluation prints: by default the validation loss and perplexity."""
        return f"step {self.step}: val loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.1f}"

    def better(self, value: float, best: float) -> bool:
        """Whether `value` of the monitored field improves on `best` (see monitor_mode)."""
        return value < best if self.monitor_mode == "min" else value > best

    def extra_state(self) -> dict[str, Any]:
        """What a subclass keeps in a checkpoint beyond weights, optimizer, RNG and data position (JSON values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved: by default there is nothing to restore."""
        return None

    def save_model_info(self, directory: Path) -> None:
        """The files a distributed checkpoint holds beside the shards (config, tokenizer): a sharded run's."""
        raise ConfigError(f"{type(self).__name__} does not train sharded (parallel.data_parallel: fsdp)")

    def load_model_files(self, directory: Path, model: Transformer) -> None:
        """Read the weights `save_model_files` wrote into `model`: by default a native model.safetensors."""
        model.load_state_dict(read_weights(directory / "model.safetensors", model))

    @property
    def fraction_done(self) -> float:
        """The fraction of the run done, from 0 to 1 (see train.optim.fraction_done)."""
        return fraction_done(self.step, self.train_seconds, self.cfg)

    @property
    def stopped_by_time(self) -> bool:
        return self.fraction_done >= 1.0 and self.step < self.cfg.max_steps

    @property
    def averaged(self) -> Transformer | None:
        """The EMA average of the weights, None without EMA."""
        return self.ema.module if self.ema is not None else None

    @property
    def eval_model(self) -> Transformer:
        """The weights evaluation and checkpoints use: the EMA average when enabled."""
        return self.averaged if self.averaged is not None else self.model

    def loss(self, model: torch.nn.Module, batch: Any, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy of a batch (x, y), labels IGNORE left out, and the experts' auxiliary loss
        (0 in a dense model)."""
        x, y = batch
        with self._autocast():
            logits, auxes = model(x, return_aux=True)  # (B, T, V)
        main = F.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, label_smoothing=smoothing
        )
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
        for micro in range(self.cfg.grad_accum):
            with self._accumulating(last=micro == self.cfg.grad_accum - 1):
                main, aux = self.loss(self.forward, self.loader.next_batch(), self.cfg.label_smoothing)
                ((main + aux) / self.cfg.grad_accum).backward()
            main_total, aux_total = main_total + main.item(), aux_total + aux.item()
        grad_norm = self.optimizer_step()
        self.step += 1
        main, aux = main_total / self.cfg.grad_accum, aux_total / self.cfg.grad_accum
        if self.data_parallel:  # each process's loss is its slice's: the global batch's is their mean
            main, aux = distributed.reduce_across_ranks([main, aux], "mean")
        return main, aux, grad_norm

    def _accumulating(self, last: bool):
        """Data-parallel, DDP's no_sync for all but a step's last micro-batch: gradients add up locally and are
        all-reduced once, with the last backward (replicated slices beside tensor parallelism alike); else nothing."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.layout.replicated:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def optimizer_step(self) -> float:
        """Clip the gradients, update the weights, then the experts' biases and the EMA; the norm before clipping."""
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        if self.layout.expert_mesh is not None:
            expert.average_expert_grads_(self.model, self.layout.expert_mesh, self.layout.sharded)
            grad_norm = expert.clip_grad_norm_(self.model, clip, self.layout.expert_mesh)
        else:
            grad_norm = distributed.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.data_parallel:  # the global batch's expert loads, so every process takes the same bias step
            distributed.sum_expert_loads_(self.model)
        self.model.balance_step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return grad_norm

    def timed_step(self) -> tuple[float, float, float]:
        """train_step, adding its duration to train_seconds."""
        begin = self.clock()
        result = self.train_step()
        seconds = self.clock() - begin
        if self.data_parallel:  # the slowest process's time, so that all stop at the same step of a time budget
            (seconds,) = distributed.reduce_across_ranks([seconds], "max")
        self.train_seconds += seconds
        return result

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (main loss only) and perplexity over validation_batches(), with the
        expert-usage metrics of those batches."""
        model = self.eval_model
        was_training = model.training
        model.eval()
        train_window = self.moe_monitor
        self.moe_monitor = MoEMonitor(train_window.layers)
        losses = [self.loss(model, batch, 0.0)[0].item() for batch in self.validation_batches()]
        fsdp.reshard(model)
        model.train(was_training)
        val_loss = sum(losses) / len(losses)
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
        metrics.update({f"val_{k}": v for k, v in self.moe_monitor.summary().items()})
        self.moe_monitor = train_window
        return metrics

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        fresh = not self.out_dir.exists()
        metrics = self._open_metrics(resume)
        self.log(self.describe())
        bar = progress_bar(self.out_dir.name, self.cfg, self.step, self.fraction_done, progress and self.main)
        self.model.train()
        start = self.clock()
        try:
            best = self._loop(metrics, bar, start)
        except KeyboardInterrupt:
            self._write(bar, f"interrupted: saving step {self.step}; continue with --resume")
            self.save()
            raise
        except Exception:
            if self.main and fresh and not any(self.out_dir.iterdir()):  # failed before writing anything: no trace
                self.out_dir.rmdir()
            raise
        finally:
            bar.close()
            metrics.close()
        self.log(ending(self.cfg, self.step, self.train_seconds, self.stopped_by_time))
        final = self.evaluate()
        return {
            "steps": self.step,
            **final,
            f"best_{self.monitor}": final[self.monitor] if self.better(final[self.monitor], best) else best,
            "wall_s": self.clock() - start,
            "train_s": self.train_seconds,
            "max_steps": self.cfg.max_steps,
            "max_minutes": self.cfg.max_minutes,
            "stopped_by": self._stopped_by(),
            "checkpoint": str(latest_checkpoint(self.out_dir)),
        }

    def _open_metrics(self, resume: bool) -> MetricsLog:
        """The run's metrics log (rank 0's; the others' writes nothing), after restoring the latest
        checkpoint when resuming."""
        if not resume and (self.out_dir / "metrics.jsonl").exists():
            raise ConfigError(
                f"{self.out_dir} already holds a run: pass --resume to continue it, or choose another train.out_dir"
            )
        distributed.barrier()  # every process has looked before rank 0 writes
        metrics = MetricsLog(self.out_dir, self.cfg.loggers, self.config_dict(), notice=self.log) if self.main else None
        if resume:
            self.resume()
            if metrics is not None:
                metrics.drop_after(self.step)
        return metrics if metrics is not None else distributed.NoMetrics()

    def _loop(self, metrics: MetricsLog, bar: tqdm, start: float) -> float:
        """Train until the run is done, logging, evaluating and saving on the way; returns the best monitored value."""
        cfg = self.cfg
        window_start, window_tokens = self.clock(), self.tokens_done()
        best = math.inf if self.monitor_mode == "min" else -math.inf
        if self.eval_at_start and self.step == 0:
            self._evaluation(metrics, bar)  # the starting point, not a result of the run
        while self.fraction_done < 1.0:
            main, aux, grad_norm = self.timed_step()
            last = self.fraction_done >= 1.0
            if self.step % cfg.log_interval == 0 or last:
                now, tokens = self.clock(), self.tokens_done()
                rate = (tokens - window_tokens) / (now - window_start)
                metrics.write(self._train_record(main, aux, grad_norm, rate, now - start, last))
                bar.set_postfix(loss=f"{main:.3f}", tok_s=f"{rate:,.0f}", step=self.step)
                window_start, window_tokens = now, tokens
            if self.step % cfg.eval_interval == 0 or last:
                value = self._evaluation(metrics, bar)
                best = value if self.better(value, best) else best
            if self.step % cfg.checkpoint_interval == 0 or last:
                self.save()
                distributed.barrier()  # no process runs ahead of the checkpoint it would resume from
            advance(bar, self.cfg, self.fraction_done)
        return best

    def _stopped_by(self) -> str:
        return "time_budget" if self.stopped_by_time else "max_steps"

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
            "tokens": self.tokens_done(),
            "elapsed_s": elapsed,
            "train_s": self.train_seconds,
            "fraction_done": self.fraction_done,
            **self.moe_monitor.summary(),
            **self.extra_metrics(),
        }
        if last:
            record["stopped_by"] = self._stopped_by()
        return record

    def _evaluation(self, metrics: MetricsLog, bar: tqdm) -> float:
        """Evaluate, log and print the record; returns its monitored value."""
        record = self._eval_record()
        metrics.write(record)
        self._write(bar, self.eval_message(record))
        return record[self.monitor]

    def _write(self, bar: tqdm, line: str) -> None:
        """Print a line above the progress bar: rank 0's alone."""
        if self.main:
            bar.write(line)

    def _eval_record(self) -> dict[str, Any]:
        return {"step": self.step, **self.evaluate(), "tokens": self.tokens_done()}
