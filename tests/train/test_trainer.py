import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mistura.errors import ConfigError
from mistura.train.config import RunConfig
from mistura.train.loggers import read_metrics
from mistura.train.optim import build_optimizer, lr_at
from mistura.train.trainer import Trainer


def train(run_dict, resume=False, model=None, **train_overrides):
    run = RunConfig.from_dict(run_dict(model, **train_overrides))
    trainer = Trainer(run, log=lambda *a: None)
    summary = trainer.fit(resume=resume, progress=False)
    return trainer, summary


def losses(out_dir):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out_dir)]


def test_training_lowers_the_loss_and_writes_metrics(run_dict, tmp_path):
    trainer, summary = train(run_dict, max_steps=30, eval_interval=10)
    records = read_metrics(trainer.out_dir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.5
    assert {"lr", "grad_norm", "tokens_per_s", "tokens"} <= set(train_records[0])
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert summary["val_loss"] < evals[0]["val_loss"]


def test_same_seed_same_losses(run_dict, tmp_path):
    first, _ = train(run_dict, out_dir=str(tmp_path / "a"))
    second, _ = train(run_dict, out_dir=str(tmp_path / "b"))
    assert losses(first.out_dir) == losses(second.out_dir)
    third, _ = train(run_dict, out_dir=str(tmp_path / "c"), seed=7)
    assert losses(third.out_dir) != losses(first.out_dir)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resumed_run_continues_the_uninterrupted_curve(run_dict, tmp_path, ema_decay):
    full, _ = train(run_dict, out_dir=str(tmp_path / "full"), ema_decay=ema_decay)
    # An interruption after step 6: the copy keeps only the step-6 checkpoint but the log runs on.
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000012")
    resumed, _ = train(run_dict, resume=True, out_dir=str(tmp_path / "cut"), ema_decay=ema_decay)
    assert losses(resumed.out_dir) == losses(full.out_dir)
    final = "checkpoints/step-0000012/model.safetensors"
    a, b = load_file(full.out_dir / final), load_file(resumed.out_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dropout_rng_is_restored_on_resume(run_dict, tmp_path):
    dropout = {"attn_dropout": 0.2, "mlp_dropout": 0.2}
    full, _ = train(run_dict, model=dropout, out_dir=str(tmp_path / "full"))
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000012")
    resumed, _ = train(run_dict, resume=True, model=dropout, out_dir=str(tmp_path / "cut"))
    assert losses(resumed.out_dir) == losses(full.out_dir)


def test_ema_checkpoint_holds_the_average(run_dict):
    trainer, _ = train(run_dict, ema_decay=0.5)
    saved = load_file(trainer.out_dir / "checkpoints/step-0000012/model.safetensors")
    raw = trainer.model.state_dict()
    assert torch.equal(saved["norm.weight"], trainer.ema.module.state_dict()["norm.weight"])
    assert not torch.equal(saved["norm.weight"], raw["norm.weight"])


def test_only_the_newest_checkpoints_are_kept(run_dict):
    trainer, summary = train(run_dict, max_steps=12, checkpoint_interval=3, keep_checkpoints=2)
    names = sorted(p.name for p in (trainer.out_dir / "checkpoints").iterdir())
    assert names == ["step-0000009", "step-0000012"]
    state = json.loads((trainer.out_dir / "checkpoints/step-0000012/train_state.json").read_text())
    assert state["step"] == 12 and state["loader"]["batches_drawn"] == 12
    assert summary["checkpoint"].endswith("step-0000012")


def test_existing_run_needs_resume(run_dict):
    train(run_dict, max_steps=3, warmup_steps=1)
    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        train(run_dict, max_steps=3, warmup_steps=1)


def test_vocab_mismatch_with_prepared_data_is_an_error(run_dict):
    run = run_dict()
    run["data"]["vocab_size"] = 512
    with pytest.raises(ConfigError, match="prepared with vocab_size=384"):
        Trainer(RunConfig.from_dict(run), log=lambda *a: None)


def test_missing_logger_is_skipped_with_a_notice(run_dict, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    notices = []
    run = RunConfig.from_dict(run_dict(max_steps=2, warmup_steps=1, loggers=["wandb"]))
    Trainer(run, log=notices.append).fit(progress=False)
    assert any("logger 'wandb' is not installed" in n for n in notices)


def test_gradient_accumulation_and_label_smoothing_run(run_dict):
    trainer, summary = train(run_dict, max_steps=4, warmup_steps=1, grad_accum=2, label_smoothing=0.1)
    assert trainer.loader.state_dict()["batches_drawn"] == 8
    assert math.isfinite(summary["val_loss"])


def test_lr_schedule_warmup_then_cosine_to_floor():
    config = RunConfig.from_dict(
        {"train": {"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}}
    ).train
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.55)
    assert lr_at(110, config) == pytest.approx(0.1)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 110))


def test_weight_decay_skips_norms_biases_and_embeddings(tiny):
    from mistura.model import Transformer

    model = Transformer(tiny("gpt2-baseline-tiny"))
    config = RunConfig.from_dict({"train": {"weight_decay": 0.1}}).train
    decay, no_decay = build_optimizer(model, config).param_groups
    decayed = {id(p) for p in decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith(("proj.weight",)) for n in names)
    assert id(model.tok_emb.weight) not in decayed and id(model.pos_emb.weight) not in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
