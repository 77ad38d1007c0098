"""What every post-training run shares: a base checkpoint, trained in full or through LoRA adapters, saved so
that `mistura.load` and `mistura chat` take the result as they take the base.

    base     a checkpoint or run folder; its tokenizer and chat template (or the Portuguese script,
             see mistura.tune.template) format the run's data
    method   full: every weight trains, and each checkpoint is a plain mistura checkpoint;
             lora: the base stays frozen, only mistura.lora's adapters train, and each checkpoint
             is an adapter folder naming the base (mistura.load reads it as the base, adapted)

A run's config (mistura.tune.config.FinetuneConfig, and the preference and RL configs) has the
fields `base`, `method`, `lora` and `train`. A subclass builds its data, then trains the model
`self.load_base()` returns through `self.train_model(model)`; a model with a head of its own
(mistura.tune.reward_model.HeadedModel: a reward model, a policy with a value head) adapts its
backbone with `self.adapt(backbone)` and hands the whole model to `self.use_model`; its
checkpoints hold the head's file beside the backbone's.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
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
from mistura.tune.reward_model import HeadedModel, read_head, write_head
from mistura.tune.template import is_own, tuning_template

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")  # where mistura.infer.chat finds a template


class TunedLoop(TrainLoop):
    """A TrainLoop on a base checkpoint: self.base, self.tokenizer, self.template, and SFT's checkpoint files."""

    def __init__(self, run: Any, log=print, clock: Callable[[], float] = time.perf_counter):
        super().__init__(run.train, log, clock)
        if self.device.type == "cpu" and self.cfg.retain_cpu_memory:
            retain_freed_memory()
        self.run = run
        self.base = resolve(run.base)
        self.template = tuning_template(self.base)
        self.tokenizer = load_tokenizer(self.base)

    def load_base(self) -> Transformer:
        """A fresh copy of the base model; a quantised base is refused for full training."""
        model = load(self.base)
        if self.run.method == "full":
            refuse_quantised(model, self.base)
        return model

    def load_reference(self) -> Transformer:
        """A frozen copy of the base on the device, in eval mode: the reference DPO and RL measure a policy by."""
        model = load(self.base)
        model.requires_grad_(False)
        return model.to(self.device).eval()

    def train_model(self, model: Transformer) -> None:
        """Seed, add the adapters when method is lora, and train `model` (TrainLoop.use_model)."""
        self.adapt(model)
        self.use_model(model)

    def adapt(self, model: Transformer) -> None:
        """Seed, and add the adapters to `model` when method is lora (freezing the rest of it)."""
        torch.manual_seed(self.cfg.seed)
        if self.run.method == "lora":
            apply_lora(model, self.run.lora)
            self.log(f"LoRA adapters: training {trainable_share(model)} parameters")

    def save_model_files(self, directory: Path, model: Transformer | HeadedModel) -> None:
        """The trained model (or with lora its adapters), the base's tokenizer and the chat template trained with;
        a model with a head (a reward model, a policy with its critic) has the head's file beside its backbone's."""
        if isinstance(model, HeadedModel):
            write_head(directory, model)
            model = model.backbone
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

    def load_model_files(self, directory: Path, model: Transformer | HeadedModel) -> None:
        if isinstance(model, HeadedModel):
            read_head(directory, model)
            model = model.backbone
        if self.run.method != "lora":
            return super().load_model_files(directory, model)
        state = read_adapter_weights(directory)
        check_names(state, adapter_state(model), str(directory))
        model.load_state_dict(state, strict=False)

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.run) | {"lora": self.run.lora.to_dict()}


def refuse_quantised(model: Transformer, base: Path) -> None:
    """A ConfigError for a quantised base: its integer weights cannot take full training's updates."""
    if any(isinstance(module, (QuantLinear, QuantExperts)) for module in model.modules()):
        raise ConfigError(
            f"{base} is quantised: its weights cannot be fine-tuned in full; use method lora (QLoRA) or the "
            "full-precision checkpoint"
        )
