"""Distillation: the training loss is the KL divergence from a frozen teacher; validation stays cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from mistura.config import ModelConfig
from mistura.data.bins import open_tokens
from mistura.errors import ConfigError
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.model import Transformer
from mistura.train.config import RunConfig
from mistura.train.distill import PREFIX_TOKENS, DistillationTrainer
from mistura.train.loggers import read_metrics

TEACHER = dict(vocab_size=384, max_seq_len=32, n_layer=2, d_model=48, n_head=4, n_kv_head=2, d_ff=96)


def teacher(**overrides) -> Transformer:
    torch.manual_seed(5)
    return Transformer(ModelConfig.from_name("llama-tiny", **{**TEACHER, **overrides})).eval()


@torch.no_grad()
def divergence(student: Transformer, teacher: Transformer, x: torch.Tensor) -> float:
    log_p, log_q = (F.log_softmax(m(x).flatten(0, 1), dim=-1) for m in (teacher, student))
    return float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))


def test_the_student_moves_toward_the_teacher_and_validation_is_cross_entropy(run_dict):
    run = RunConfig.from_dict(run_dict(max_steps=12, lr=1e-2))
    teacher_model = teacher()
    trainer = DistillationTrainer(run, teacher_model, log=lambda *a: None)
    x = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    before = divergence(trainer.model.eval(), teacher_model, x)
    trainer.fit(progress=False)
    assert divergence(trainer.model.eval(), teacher_model, x) < before / 2
    records = read_metrics(trainer.out_dir)
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[0] == pytest.approx(before, rel=0.3)  # the KL, near 0 for a random student
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert val > math.log(384) / 2 > train_losses[-1]  # cross-entropy with the text, not the KL


def test_a_teacher_with_another_vocabulary_or_a_shorter_context_is_refused(run_dict):
    run = RunConfig.from_dict(run_dict())
    with pytest.raises(ConfigError, match="vocabulary"):
        DistillationTrainer(run, teacher(vocab_size=100))
    with pytest.raises(ConfigError, match="context"):
        DistillationTrainer(run, teacher(max_seq_len=16))


def test_with_continuations_half_the_batch_is_the_teachers_greedy_text(run_dict):
    run = RunConfig.from_dict(run_dict(max_steps=12, lr=1e-2))
    teacher_model = teacher()
    trainer = DistillationTrainer(run, teacher_model, continuations=3, log=lambda *a: None)
    written = torch.from_numpy(trainer.loader.written.tokens.astype("int64")).view(3, 32)  # (N, max_seq_len)
    text = torch.from_numpy(open_tokens(trainer.data_dir / "train.bin", trainer.meta["dtype"]).astype("int64"))
    for row in written:
        prefix = row[:PREFIX_TOKENS]
        assert any(torch.equal(prefix, window) for window in text.unfold(0, PREFIX_TOKENS, 1))
        greedy = generate(teacher_model, [prefix.tolist()], Sampling(max_new_tokens=32 - PREFIX_TOKENS, temperature=0))
        assert row[PREFIX_TOKENS:].tolist() == greedy[0]
    x, y = trainer.loader.next_batch()  # (4, 32): 2 rows of text, 2 of the teacher's
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = [text.unfold(0, 32, 1), written.flatten().unfold(0, 32, 1)]
    for rows, source in ((x[:2], windows[0]), (x[2:], windows[1])):
        assert all(bool((source == row).all(dim=1).any()) for row in rows)
    before = divergence(trainer.model.eval(), teacher_model, written[:, :-1])
    trainer.fit(progress=False)
    assert divergence(trainer.model.eval(), teacher_model, written[:, :-1]) < before / 2


def test_a_negative_number_of_continuations_is_refused(run_dict):
    with pytest.raises(ConfigError, match="continuations"):
        DistillationTrainer(RunConfig.from_dict(run_dict()), teacher(), continuations=-1)
