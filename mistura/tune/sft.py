"""Supervised fine-tuning, `mistura finetune`: a checkpoint learns to answer as its data's assistant does.

The base checkpoint's chat template (or, for a base model without one, the Portuguese
script with an end of turn, see mistura.tune.template) formats each conversation, and the
loss is the cross-entropy of the assistant's tokens alone (see mistura.tune.encode). The
loop is the one pretraining runs (mistura.train.loop): progress bar, metrics.jsonl,
validation on held-out conversations (the loss of their assistant tokens), atomic
checkpoints, exact `--resume`, time budget.

Method `full` or `lora`, and what a checkpoint holds, are mistura.tune.tuned's (TunedLoop).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from mistura.lora import trainable_share
from mistura.tune.batches import ExampleBatches, fixed_batches
from mistura.tune.config import FinetuneConfig
from mistura.tune.data import Conversation, hold_out, read_conversations
from mistura.tune.encode import Encoder
from mistura.tune.tuned import TunedLoop


class FineTuner(TunedLoop):
    def __init__(self, run: FinetuneConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        super().__init__(run, log, clock)
        train, val = conversations(run)
        model = self.load_base()
        self.encoder = Encoder(self.tokenizer, self.template, model.config.max_seq_len)
        self.train_examples = [self.encoder.encode(conversation) for conversation in train]
        self.val_examples = [self.encoder.encode(conversation) for conversation in val]
        self.train_model(model)
        self.loader = ExampleBatches(self.train_examples, self.cfg.batch_size, self.cfg.seed, self.device)

    def validation_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out examples, in order, eval_batches batches at most."""
        return fixed_batches(self.val_examples, self.cfg.batch_size, self.cfg.eval_batches, self.device)

    def tokens_done(self) -> int:
        return self.loader.tokens_drawn

    def describe(self) -> str:
        cfg, amp = self.cfg, "bf16 autocast" if self.amp_dtype else "fp32"
        budget = "" if cfg.max_minutes is None else f" (or {cfg.max_minutes:g} min of training)"
        learnt = sum(example.learnt for example in self.train_examples)
        return (
            f"fine-tuning ({self.run.method}) {self.base}: {trainable_share(self.model)} parameters train | "
            f"device {self.device} ({amp}) | {cfg.max_steps} steps{budget} of {cfg.batch_size * cfg.grad_accum} "
            f"examples | {len(self.train_examples)} training examples ({learnt:,} assistant tokens), "
            f"{len(self.val_examples)} held out"
        )


def conversations(run: FinetuneConfig) -> tuple[list[Conversation], list[Conversation]]:
    """The training and validation conversations: the two files, or the train file and a held-out share of it."""
    train = read_conversations(run.data.train)
    if run.data.val is not None:
        return train, read_conversations(run.data.val)
    return hold_out(train, run.data.val_fraction, run.data.seed)
