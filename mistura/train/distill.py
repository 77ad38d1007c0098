"""Knowledge distillation (Hinton et al. 2015): train a student to match a teacher's next-token distributions.

An ordinary training run (the student's YAML gives its shape, data and schedule) whose
training loss, instead of the cross-entropy with the next token of the text, is

    KL(p_teacher || p_student), summed over the vocabulary, averaged over tokens

with the teacher frozen. Validation still measures cross-entropy on the text, so the
run's perplexities compare with a plain run's. A speculative-decoding draft distilled
from its target proposes what the target would choose more often than one trained on
the text alone: its acceptance rate, and so the speedup, grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.train.config import RunConfig
from mistura.train.trainer import Trainer


class DistillationTrainer(Trainer):
    """A Trainer whose training loss is the KL divergence from a frozen teacher sharing the data's tokenizer."""

    def __init__(self, run: RunConfig, teacher: Transformer, log=print):
        super().__init__(run, log)
        if teacher.config.vocab_size != self.run.model.vocab_size:
            raise ConfigError(
                f"the teacher's vocabulary ({teacher.config.vocab_size} tokens) differs from the student's data "
                f"({self.run.model.vocab_size}): distil on the data the teacher was trained on"
            )
        if teacher.config.max_seq_len < self.run.model.max_seq_len:
            raise ConfigError(
                f"the teacher's context ({teacher.config.max_seq_len} tokens) is shorter than the student's "
                f"training sequences ({self.run.model.max_seq_len}): lower model.max_seq_len"
            )
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)

    def loss(self, model: torch.nn.Module, x, y, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not model.training:  # validation: cross-entropy on the text, as in a plain run
            return super().loss(model, x, y, smoothing)
        with self._autocast():
            logits, auxes = model(x, return_aux=True)  # (B, T, V)
            with torch.no_grad():
                target = self.teacher(x)  # (B, T, V)
        student = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)  # (B * T, V)
        teacher = F.log_softmax(target.flatten(0, 1).float(), dim=-1)
        main = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        self.moe_monitor.update(auxes)
        return main, sum((aux.loss for aux in auxes), torch.zeros((), device=main.device))
