"""Knowledge distillation (Hinton et al. 2015): train a student to match a teacher's next-token distributions.

An ordinary training run (the student's YAML gives its shape, data and schedule) whose
training loss, instead of the cross-entropy with the next token of the text, is

    KL(p_teacher || p_student), summed over the vocabulary, averaged over tokens

with the teacher frozen. Validation still measures cross-entropy on the text, so the
run's perplexities compare with a plain run's. A speculative-decoding draft distilled
from its target proposes what the target would choose more often than one trained on
the text alone: its acceptance rate, and so the speedup, grows.

Sequence-level distillation (Kim & Rush 2016) goes further: with `continuations=N`, the
student also trains on the teacher's own greedy continuations of N short prefixes of
the text, generated once before training

    prefix (PREFIX_TOKENS tokens of the text) + the teacher's greedy tokens, max_seq_len in all

Half of each batch's rows are windows of these continuations, half windows of the text,
so the student learns the teacher's distributions where greedy speculative decoding needs
them, on text the teacher wrote itself (repetitions included), without forgetting the
text that sampling wanders through. The KL loss stays the same.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mistura.data.bins import BatchLoader
from mistura.errors import ConfigError
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.model import Transformer
from mistura.parallel import distributed
from mistura.train.config import RunConfig
from mistura.train.trainer import Trainer

PREFIX_TOKENS = 8  # of the text, before each of the teacher's continuations
GENERATION_BATCH = 64  # continuations the teacher writes at once


class DistillationTrainer(Trainer):
    """A Trainer whose training loss is the KL divergence from a frozen teacher sharing the data's tokenizer;
    with `continuations` > 0, half on that many greedy continuations by the teacher, half on the text."""

    def __init__(self, run: RunConfig, teacher: Transformer, continuations: int = 0, log=print):
        if run.parallel.data_parallel != "none" and distributed.launched_world_size() > 1:
            raise ConfigError("distillation (--teacher) does not run data-parallel yet: train it in one process")
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
        if continuations < 0:
            raise ConfigError(f"the number of teacher continuations must be positive or 0, got {continuations}")
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if continuations:
            log(f"the teacher writes {continuations} greedy continuations to train on")
            written = teacher_continuations(
                self.teacher, self.loader.tokens, continuations, self.run.model.max_seq_len, self.cfg.seed
            )
            self.loader = HalfAndHalf(self.loader, written, self.run.model.max_seq_len, self.cfg.seed, self.device)

    def loss(self, model: torch.nn.Module, batch, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not model.training:  # validation: cross-entropy on the text, as in a plain run
            return super().loss(model, batch, smoothing)
        x, _ = batch
        with self._autocast():
            logits, auxes = model(x, return_aux=True)  # (B, T, V)
            with torch.no_grad():
                target = self.teacher(x)  # (B, T, V)
        student = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)  # (B * T, V)
        teacher = F.log_softmax(target.flatten(0, 1).float(), dim=-1)
        main = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        self.moe_monitor.update(auxes)
        return main, sum((aux.loss for aux in auxes), torch.zeros((), device=main.device))


class HalfAndHalf:
    """Batches of the text loader's rows stacked on as many rows of the teacher's continuations."""

    def __init__(self, text: BatchLoader, written: np.ndarray, block_size: int, seed: int, device: torch.device):
        self.text = text
        self.written = BatchLoader(written, text.batch_size, block_size, seed, device)
        self.half = text.batch_size // 2

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size): the first half of the rows text, the rest the teacher's."""
        (x_text, y_text), (x_written, y_written) = self.text.next_batch(), self.written.next_batch()
        return torch.cat([x_text[: self.half], x_written[self.half :]]), torch.cat(
            [y_text[: self.half], y_written[self.half :]]
        )

    def state_dict(self) -> dict[str, int]:
        return self.text.state_dict()  # both loaders draw in step, from the same seed

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.text.load_state_dict(state)
        self.written.load_state_dict(state)


def teacher_continuations(teacher: Transformer, tokens: np.ndarray, count: int, length: int, seed: int) -> np.ndarray:
    """`count` sequences of `length` tokens, each PREFIX_TOKENS tokens of `tokens` from a random offset (drawn
    with `seed`) continued greedily by the teacher, laid end to end: (count * length,) of tokens' dtype."""
    offsets = np.random.default_rng(seed).integers(0, len(tokens) - PREFIX_TOKENS, size=count)  # (N,)
    prefixes = torch.from_numpy(tokens[offsets[:, None] + np.arange(PREFIX_TOKENS)].astype(np.int64))  # (N, P)
    greedy = Sampling(max_new_tokens=length - PREFIX_TOKENS, temperature=0)
    device = teacher.tok_emb.weight.device
    rows = []
    for batch in prefixes.split(GENERATION_BATCH):
        new = generate(teacher, batch.to(device), greedy)
        rows += [prefix + continuation for prefix, continuation in zip(batch.tolist(), new)]
    return np.asarray(rows, dtype=tokens.dtype).reshape(-1)
