import itertools
import json
import shutil

import pytest

from mistura.errors import ConfigError
from mistura.train.config import RunConfig
from mistura.train.loggers import read_metrics
from mistura.train.optim import fraction_done, lr_at
from mistura.train.trainer import Trainer


def ticking_clock():
    """A clock that moves one second each time it is read: every optimizer step then takes one second."""
    return itertools.count(0.0, 1.0).__next__


def train(run_dict, resume=False, notices=None, progress=False, **train_overrides):
    run = RunConfig.from_dict(run_dict(**train_overrides))
    log = notices.append if notices is not None else lambda *a: None
    trainer = Trainer(run, log=log, clock=ticking_clock())
    return trainer, trainer.fit(resume=resume, progress=progress)


def train_records(out_dir):
    return [r for r in read_metrics(out_dir) if "loss" in r]


def schedule(out_dir):
    """What a resumed run must repeat: per step, the loss, learning rate and time spent training."""
    return [(r["step"], r["loss"], r["lr"], r["train_s"], r["fraction_done"]) for r in train_records(out_dir)]


def test_budget_stops_before_max_steps_with_a_final_checkpoint(run_dict, capsys):
    notices = []
    trainer, summary = train(run_dict, notices=notices, progress=True, max_minutes=0.1, checkpoint_interval=100)
    assert summary["steps"] == 6 and summary["train_s"] == 6.0
    assert summary["stopped_by"] == "time_budget" and summary["max_minutes"] == 0.1 and summary["max_steps"] == 12
    assert summary["checkpoint"].endswith("step-0000006")
    assert sorted(p.name for p in (trainer.out_dir / "checkpoints").iterdir()) == ["step-0000006"]
    records = train_records(trainer.out_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["stopped_by"] == "time_budget" and records[-1]["fraction_done"] == 1.0
    assert "stopped by the time budget (0.1 min) at step 6 of 12" in notices
    assert "(0.1 min or 12 steps): 100%" in capsys.readouterr().err  # the bar counts the run's fraction done


def test_lr_follows_the_time_and_reaches_the_floor_at_the_budget(run_dict):
    trainer, _ = train(run_dict, max_minutes=0.1, lr=1.0, min_lr_ratio=0.1)
    cfg = trainer.cfg
    logged = [r["lr"] for r in train_records(trainer.out_dir)]
    assert logged == pytest.approx([lr_at(step, cfg, step / 6) for step in range(6)])
    assert all(a > b for a, b in zip(logged[1:], logged[2:]))  # decaying after the 2 warmup steps
    assert logged[-1] < lr_at(5, cfg)  # below the step schedule: the budget, not max_steps, ends this run
    assert lr_at(trainer.step, cfg, trainer.fraction_done) == pytest.approx(0.1)


def test_unreached_budget_leaves_the_step_schedule_unchanged(run_dict, tmp_path):
    stepped, plain = train(run_dict, out_dir=str(tmp_path / "plain"))
    budgeted, summary = train(run_dict, out_dir=str(tmp_path / "budget"), max_minutes=1.0)
    assert summary["steps"] == 12 and summary["stopped_by"] == "max_steps"
    assert plain["stopped_by"] == "max_steps" and plain["max_minutes"] is None
    assert [r["lr"] for r in train_records(budgeted.out_dir)] == [r["lr"] for r in train_records(stepped.out_dir)]
    assert [r.get("val_loss") for r in read_metrics(budgeted.out_dir)] == [
        r.get("val_loss") for r in read_metrics(stepped.out_dir)
    ]


def test_resume_spends_what_is_left_of_the_budget(run_dict, tmp_path):
    budget = {"max_minutes": 0.15, "checkpoint_interval": 3}  # 9 one-second steps of 12
    full, summary = train(run_dict, out_dir=str(tmp_path / "full"), **budget)
    assert summary["steps"] == 9
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000009")
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-0000006" / "train_state.json").read_text())
    assert state["train_seconds"] == 6.0
    resumed, summary = train(run_dict, resume=True, out_dir=str(tmp_path / "cut"), **budget)
    assert summary["steps"] == 9 and summary["train_s"] == 9.0 and summary["stopped_by"] == "time_budget"
    assert schedule(resumed.out_dir) == schedule(full.out_dir)


def test_fraction_done_is_the_further_of_steps_and_time():
    config = RunConfig.from_dict({"train": {"max_steps": 100, "warmup_steps": 10, "max_minutes": 2}}).train
    assert fraction_done(50, 30.0, config) == 0.5
    assert fraction_done(20, 90.0, config) == 0.75
    assert fraction_done(100, 0.0, config) == 1.0
    no_budget = RunConfig.from_dict({"train": {"max_steps": 100, "warmup_steps": 10}}).train
    assert fraction_done(20, 1e9, no_budget) == 0.2


def test_budget_ending_during_warmup_still_ends_at_the_floor():
    config = RunConfig.from_dict({"train": {"lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 10}}).train
    assert lr_at(3, config, 1.0) == pytest.approx(0.1)
    assert lr_at(3, config, 0.0) == pytest.approx(0.4)


@pytest.mark.parametrize("value", [0, -1.5, "three", True, float("nan")])
def test_invalid_budget_is_a_config_error(value):
    with pytest.raises(ConfigError, match="train.max_minutes"):
        RunConfig.from_dict({"train": {"max_minutes": value}})
