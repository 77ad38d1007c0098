"""Learning from preference pairs: a reward model (`mistura reward-model`) and DPO (`mistura dpo`).

Both read JSONL pairs {"prompt", "chosen", "rejected"} (mistura.tune.pairs), hold out
data.val_fraction of them (or read data.val), and train on batches of B pairs run as 2B rows,
the chosen conversations first (mistura.tune.batches.PairBatches). Each row is labelled on
its reply's tokens only, so a sequence's log-probability is that of the reply given the prompt.

    reward model  r = RewardModel(x), the score at each row's last token;
                  loss -log sigmoid(r_c - r_r) (mistura.tune.losses.reward_model_loss)
    DPO           log pi(y | x) of the policy and of a frozen copy of the base, the reference;
                  loss -log sigmoid(beta ((pi_c - pi_r) - (ref_c - ref_r))), or IPO's, or SimPO's
                  (which needs no reference)

The loop, checkpoints and resume are mistura.train.loop's, the base and its LoRA option
mistura.tune.tuned's. Every training record carries the batch's metrics (accuracy and margin
of the rewards, as TRL logs them), every evaluation the same over the held-out pairs, with
their loss as val_loss. A reward model's checkpoint is its backbone's with reward_head.safetensors
beside it (mistura.tune.reward_model); a DPO checkpoint is a fine-tune like SFT's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mistura.lora import trainable_share
from mistura.train.loop import IGNORE
from mistura.tune.batches import PairBatches, collate_pairs, fixed_batches
from mistura.tune.config import DPOConfig, RewardModelConfig, TunedConfig
from mistura.tune.data import hold_out
from mistura.tune.encode import Encoder
from mistura.tune.logprobs import sequence_logprobs
from mistura.tune.losses import Metrics, dpo_loss, reward_model_loss, simpo_loss
from mistura.tune.pairs import encode_pair, read_pairs
from mistura.tune.reward_model import RewardModel, reply_rewards
from mistura.tune.tuned import TunedLoop

Batch = tuple[torch.Tensor, torch.Tensor]  # x, y (2B, T): the chosen rows, then the rejected ones


class PairLoop(TunedLoop):
    """A TunedLoop on preference pairs; a subclass gives pair_loss and the metric its evaluations print."""

    accuracy_key: str
    shift = True  # batches as next-token (x, y); False: whole ids and their labels, for a scoring head

    def __init__(self, run: TunedConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        super().__init__(run, log, clock)
        self.window: list[Metrics] = []  # the metrics of the batches since they were last logged

    def encode(self, context: int) -> None:
        """Read, split and encode the pairs for a model of `context` tokens; build the training batches."""
        pairs = read_pairs(self.run.data.train)
        if self.run.data.val is not None:
            train, val = pairs, read_pairs(self.run.data.val)
        else:
            train, val = hold_out(pairs, self.run.data.val_fraction, self.run.data.seed)
        encoder = Encoder(self.tokenizer, self.template, context)
        self.train_pairs = [encode_pair(encoder, pair) for pair in train]
        self.val_pairs = [encode_pair(encoder, pair) for pair in val]
        self.loader = PairBatches(self.train_pairs, self.cfg.batch_size, self.cfg.seed, self.device, self.shift)

    def pair_loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
        """The batch's preference loss, the experts' auxiliary loss, and the metrics to log."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Batch, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        main, aux, metrics = self.pair_loss(model, batch)
        self.window.append(metrics)
        return main, aux

    def extra_metrics(self) -> dict[str, float]:
        """The mean metrics of the batches trained on since the last record."""
        means, self.window = mean_metrics(self.window), []
        return means

    def evaluate(self) -> dict[str, float]:
        """The held-out pairs' loss (val_loss) and metrics (val_accuracy, ...)."""
        training_window, self.window = self.window, []
        record = super().evaluate()
        record.pop("val_ppl")  # exp of a preference loss means nothing
        record |= {f"val_{name}": value for name, value in mean_metrics(self.window).items()}
        self.window = training_window
        return record

    def eval_message(self, record: dict[str, Any]) -> str:
        key = self.accuracy_key
        return f"step {self.step}: val loss {record['val_loss']:.4f}, held-out accuracy {record[f'val_{key}']:.1%}"

    def validation_batches(self) -> Iterator[Batch]:
        cfg = self.cfg
        return fixed_batches(self.val_pairs, cfg.batch_size, cfg.eval_batches, self.device, collate_pairs, self.shift)

    def tokens_done(self) -> int:
        return self.loader.tokens_drawn

    def describe(self) -> str:
        cfg, amp = self.cfg, "bf16 autocast" if self.amp_dtype else "fp32"
        budget = "" if cfg.max_minutes is None else f" (or {cfg.max_minutes:g} min of training)"
        return (
            f"{self.what()} ({self.run.method}) on {self.base}: {trainable_share(self.model)} parameters train | "
            f"device {self.device} ({amp}) | {cfg.max_steps} steps{budget} of {cfg.batch_size * cfg.grad_accum} "
            f"pairs | {len(self.train_pairs)} training pairs, {len(self.val_pairs)} held out"
        )

    def what(self) -> str:
        """What the run trains, for describe()."""
        raise NotImplementedError


class RewardModelTrainer(PairLoop):
    """A scalar head on the base (RewardModel) trained so that the chosen reply scores above the rejected one."""

    accuracy_key = "accuracy"
    shift = False

    def __init__(self, run: RewardModelConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        super().__init__(run, log, clock)
        backbone = self.load_base()
        self.encode(backbone.config.max_seq_len)
        self.adapt(backbone)
        self.use_model(RewardModel(backbone))  # the head trains in full, with LoRA too

    def pair_loss(self, model: RewardModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
        ids, labels = batch
        B = ids.size(0) // 2
        with self._autocast():
            rewards, auxes = reply_rewards(model, ids, labels, return_aux=True)  # (2B,)
        self.moe_monitor.update(auxes)
        loss, metrics = reward_model_loss(rewards[:B], rewards[B:], center_coef=self.run.reward.center_coef)
        return loss, sum((aux.loss for aux in auxes), torch.zeros((), device=ids.device)), metrics

    def what(self) -> str:
        return "reward model"


class DPOTrainer(PairLoop):
    """The base, as a policy, trained on pairs against a frozen copy of itself (the reference): DPO, IPO or SimPO."""

    accuracy_key = "rewards/accuracies"

    def __init__(self, run: DPOConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        super().__init__(run, log, clock)
        policy = self.load_base()
        self.encode(policy.config.max_seq_len)
        self.reference = None if run.dpo.loss == "simpo" else self.load_reference()
        self.train_model(policy)

    def pair_loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
        x, y = batch
        B, mask, settings = x.size(0) // 2, y != IGNORE, self.run.dpo
        with self._autocast():
            logits, auxes = model(x, return_aux=True)  # (2B, T, V)
        policy = sequence_logprobs(logits, y, mask)
        self.moe_monitor.update(auxes)
        aux = sum((aux.loss for aux in auxes), torch.zeros((), device=x.device))
        if settings.loss == "simpo":
            loss, metrics = simpo_loss(
                policy.mean[:B], policy.mean[B:], settings.beta, settings.gamma, settings.label_smoothing
            )
            return loss, aux, metrics
        with torch.no_grad(), self._autocast():
            ref = sequence_logprobs(self.reference(x), y, mask)
        loss, metrics = dpo_loss(
            policy.total[:B],
            policy.total[B:],
            ref.total[:B],
            ref.total[B:],
            settings.beta,
            settings.loss,
            settings.label_smoothing,
            policy.count[:B],
            policy.count[B:],
        )
        return loss, aux, metrics

    def what(self) -> str:
        return f"DPO ({self.run.dpo.loss}, beta {self.run.dpo.beta:g})"


def mean_metrics(window: list[Metrics]) -> dict[str, float]:
    """The mean of each metric over the batches of `window`, as floats; {} for none."""
    if not window:
        return {}
    return {name: float(torch.stack([metrics[name] for metrics in window]).mean()) for name in window[0]}
