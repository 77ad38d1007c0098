"""Supervised fine-tuning, `mistura finetune`: a checkpoint learns to answer as its data's assistant does.

The base checkpoint's chat template (or, for a base model without one, the Portuguese
script with an end of turn, see mistura.tune.template) formats each conversation, and the
loss is the cross-entropy of the assistant's tokens alone (see mistura.tune.encode). The
loop is the one pretraining runs (mistura.train.loop): progress bar, metrics.jsonl,
validation on held-out conversations (the loss of their assistant tokens), atomic
checkpoints, exact `--resume`, time budget.

With method `full` every weight trains, and each checkpoint is a plain mistura checkpoint
with the base's tokenizer and the chat template trained with: `mistura.load` and
`mistura chat` take it as they take the base. With method `lora` the base stays frozen
and only the adapters of mistura.lora train; each checkpoint is then an adapter folder
naming the base (`mistura.load` reads it as the base, adapted), with the tokenizer and
the template beside it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mistura.checkpoint import MANIFEST, check_names, resolve, write_model
from mistura.errors import ConfigError
from mistura.loading import load, load_tokenizer
from mistura.lora import adapter_state, apply_lora, save_adapter, trainable_share
from mistura.lora.checkpoint import read_adapter_weights
from mistura.model import Transformer
from mistura.quant.experts import QuantExperts
from mistura.quant.linear import QuantLinear
from mistura.train.allocator import retain_freed_memory
from mistura.train.loop import TrainLoop
from mistura.tune.batches import ExampleBatches, fixed_batches
from mistura.tune.config import FinetuneConfig
from mistura.tune.data import Conversation, hold_out, read_conversations
from mistura.tune.encode import Encoder
from mistura.tune.template import is_own, tuning_template

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")  # where mistura.infer.chat finds a template


class FineTuner(TrainLoop):
    def __init__(self, run: FinetuneConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        super().__init__(run.train, log, clock)
        if self.device.type == "cpu" and self.cfg.retain_cpu_memory:
            retain_freed_memory()
        self.run = run
        train, val = conversations(run)
        self.base = resolve(run.base)
        model = load(self.base)
        if run.method == "full":
            refuse_quantised(model, self.base)
        self.template = tuning_template(self.base)
        self.encoder = Encoder(load_tokenizer(self.base), self.template, model.config.max_seq_len)
        self.train_examples = [self.encoder.encode(conversation) for conversation in train]
        self.val_examples = [self.encoder.encode(conversation) for conversation in val]
        torch.manual_seed(self.cfg.seed)
        if run.method == "lora":
            apply_lora(model, run.lora)
            log(f"LoRA adapters: training {trainable_share(model)} parameters")
        self.use_model(model)
        self.loader = ExampleBatches(self.train_examples, self.cfg.batch_size, self.cfg.seed, self.device)

    def validation_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out examples, in order, eval_batches batches at most."""
        return fixed_batches(self.val_examples, self.cfg.batch_size, self.cfg.eval_batches, self.device)

    def save_model_files(self, directory: Path, model: Transformer) -> None:
        """The fine-tuned model (or with lora its adapters), the base's tokenizer and the chat template trained with."""
        if self.run.method == "lora":
            adapter = save_adapter(model, directory / "adapter", base=self.base)
            for path in adapter.iterdir():  # one folder: the adapter's files beside the training state
                if path.name != MANIFEST:
                    path.rename(directory / path.name)
            shutil.rmtree(adapter)
            shutil.copyfile(self.base / "tokenizer.json", directory / "tokenizer.json")
        else:
            write_model(directory, model, self.base / "tokenizer.json")
        for name in TEMPLATE_FILES:
            if (self.base / name).is_file():
                shutil.copyfile(self.base / name, directory / name)
        if not is_own(self.template):
            (directory / "chat_template.jinja").write_text(self.template.source, encoding="utf-8")

    def load_model_files(self, directory: Path, model: Transformer) -> None:
        if self.run.method != "lora":
            return super().load_model_files(directory, model)
        state = read_adapter_weights(directory)
        check_names(state, adapter_state(model), str(directory))
        model.load_state_dict(state, strict=False)

    def tokens_done(self) -> int:
        return self.loader.tokens_drawn

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.run) | {"lora": self.run.lora.to_dict()}

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


def refuse_quantised(model: Transformer, base: Path) -> None:
    """A ConfigError for a quantised base: its integer weights cannot take full fine-tuning's updates."""
    if any(isinstance(module, (QuantLinear, QuantExperts)) for module in model.modules()):
        raise ConfigError(
            f"{base} is quantised: its weights cannot be fine-tuned in full; use method lora (QLoRA) or the "
            "full-precision checkpoint"
        )
