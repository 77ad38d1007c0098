import pytest

from mistura.cli import main
from mistura.train.loggers import read_metrics

STEPS = ["--set", "train.max_steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_interval=2"]


def test_reward_model_end_to_end(base, pairs, tmp_path, capsys):
    run = tmp_path / "rm"
    assert (
        main(
            [
                "reward-model",
                str(base),
                "--dados",
                str(pairs),
                "--val",
                str(pairs),
                "--saida",
                str(run),
                *STEPS,
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "held-out pairs ranked right" in out and f"--reward model:{run}" in out
    assert (run / "checkpoints" / "step-0000004" / "reward_head.safetensors").is_file()
    assert [r["step"] for r in read_metrics(run) if "val_accuracy" in r] == [2, 4]


def test_dpo_end_to_end_with_its_flags(base, pairs, tmp_path, capsys):
    run = tmp_path / "dpo"
    argv = ["dpo", str(base), "--data", str(pairs), "--out", str(run), "--loss", "ipo", "--beta", "0.3", *STEPS]
    assert main([*argv, "--set", "data.val_fraction=0.5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "held-out pairs preferred" in out
    assert "DPO (ipo, beta 0.3)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dpo", "{base}", "--data", "missing.jsonl"], "missing.jsonl"),
        (["reward-model", "{base}"], "no training data"),
        (["dpo", "{base}", "--data", "{pairs}", "--set", "dpo.beta=-1"], "dpo.beta must be > 0"),
        (["reward-model", "nowhere", "--data", "{pairs}"], "checkpoint not found: nowhere"),
    ],
)
def test_bad_input_is_one_clear_line(base, pairs, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [arg.format(base=base, pairs=pairs) for arg in argv]
    assert main([*argv, "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
