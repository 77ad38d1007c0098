import io
import json

import mistura
from mistura.cli import main
from mistura.train.loggers import read_metrics
from mistura.tune import tasks


def finetune(*argv: str) -> int:
    return main(["finetune", *argv, "--no-progress"])


def test_finetune_end_to_end_then_chat_and_resume(base, toy, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    steps = ["--set", "train.max_steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_interval=2"]
    assert finetune(str(base), "--dados", str(toy), "--val", str(toy), "--saida", str(run), *steps) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "validation loss of the assistant's tokens" in out
    assert [r["step"] for r in read_metrics(run) if "val_loss" in r] == [2, 4]
    state = json.loads((run / "checkpoints" / "step-0000004" / "train_state.json").read_text())
    assert state["run_config"]["base"] == str(base) and state["run_config"]["method"] == "full"

    monkeypatch.setattr("sys.stdin", io.StringIO("Quem tinha olhos de cigana?\n/sair\n"))
    assert main(["chat", str(run), "--max-new-tokens", "4", "--temperatura", "0"]) == 0

    more = [*steps[:1], "train.max_steps=6", *steps[2:]]
    assert finetune(str(base), "--data", str(toy), "--val", str(toy), "--out", str(run), *more, "--resume") == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert mistura.load(run).config == mistura.load(base).config


def test_a_config_file_gives_what_the_command_line_does_not(base, toy, tmp_path, capsys, monkeypatch):
    config = tmp_path / "ft.yaml"
    config.write_text(
        f"base: {base}\nmethod: lora\nlora: {{rank: 2}}\ndata: {{train: {toy}, val_fraction: 0.25}}\n"
        f"train: {{out_dir: {tmp_path / 'run'}, max_steps: 2, warmup_steps: 1, batch_size: 2}}\n",
        encoding="utf-8",
    )
    assert finetune("--config", str(config)) == 0
    assert "LoRA adapters: training " in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "adapter_config.json").is_file()
    monkeypatch.setattr("sys.stdin", io.StringIO("Quem escreveu?\n/sair\n"))
    assert main(["chat", str(tmp_path / "run"), "--max-new-tokens", "4"]) == 0  # the base, adapted


def test_finetune_data_writes_the_task_set(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tasks, "load_machado", lambda: corpus)
    monkeypatch.chdir(tmp_path)
    assert main(["finetune-data", "machado-obras"]) == 0
    assert "800 training and 200 held-out examples written to data/machado-obras" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data" / "machado-obras").iterdir()) == ["test.jsonl", "train.jsonl"]
