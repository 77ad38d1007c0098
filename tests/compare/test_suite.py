"""Reading a comparison: a suite YAML or several run configs, and the checks that keep it fair."""

import pytest
import yaml

from mistura.cli import main
from mistura.compare.suite import load_suite
from mistura.errors import ConfigError

SEED004_PRESETS = [
    "seed004-baseline", "qwen-moe-4e-top1", "qwen-moe-8e-top2", "qwen-moe-6e-top1", "deepseek-moe-tiny", "moc-tiny",
]  # fmt: skip


def write(path, data):
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def suite(**changes):
    data = {
        "data": {"dir": "data/x", "vocab_size": 384},
        "train": {"max_steps": 10, "warmup_steps": 1},
        "runs": [{"name": "a", "model": {"preset": "llama-tiny"}}, {"model": {"preset": "gpt2-baseline-tiny"}}],
    }
    return {**data, **changes}


def test_the_seed004_suite_shares_one_budget():
    loaded = load_suite(["configs/suites/seed004.yaml"])
    assert loaded.name == "seed004"
    assert [run.config.model.name for run in loaded.runs] == SEED004_PRESETS
    assert [run.name for run in loaded.runs][0] == "dense-baseline"
    assert {run.config.model.max_seq_len for run in loaded.runs} == {128}
    assert len({repr(run.config.train) for run in loaded.runs}) == 1
    assert loaded.generation.prompts[0] == "O amor é" and list(loaded.generation.seeds) == [0, 1]


def test_suite_yaml_runs_are_named_after_their_preset_and_share_sections(tmp_path):
    loaded = load_suite([write(tmp_path / "study.yaml", suite(model={"max_seq_len": 64}))], {"train": {"lr": 0.01}})
    assert loaded.name == "study"
    assert [run.name for run in loaded.runs] == ["a", "gpt2-baseline-tiny"]
    assert all(run.config.model.max_seq_len == 64 and run.config.train.lr == 0.01 for run in loaded.runs)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runs": []}, "runs: expected a non-empty list"),
        ({"runs": [{"model": {"preset": "gpt5"}}]}, "run 'gpt5': unknown preset 'gpt5'"),
        ({"runs": [{"name": "a", "model": {"preset": "llama-tiny"}}] * 2}, "two runs are named 'a'"),
        ({"runs": [{"name": "../a", "model": {"preset": "llama-tiny"}}]}, "run name '../a'"),
        ({"runs": ["llama-tiny"]}, r"runs\[0\]: expected \{name, model"),
        ({"train": {"out_dir": "x"}}, "train.out_dir: compare places every run"),
        ({"seed": 1}, r"unknown suite key\(s\) \['seed'\]"),
        ({"generation": {"prompts": [""]}}, "generation.prompts: give at least one prompt"),
        ({"eval": {}}, "eval: name tasks"),
        ({"eval": {"taks": ["machado_cloze"]}}, "eval: unknown key 'taks' \\(did you mean 'tasks'\\?\\)"),
        ({"eval": {"tasks": ["machado_cloze"], "limit": 0}}, "eval.limit: a number of examples"),
        ({"eval": {"tasks": "machado_cloze"}}, "eval.tasks"),
        (
            {
                "runs": [
                    {"model": {"preset": "llama-tiny"}},
                    {"model": {"preset": "gpt2-baseline-tiny", "max_seq_len": 64}},
                ]
            },
            "model.max_seq_len 64 differs",
        ),
    ],
)
def test_bad_suites_are_clear_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_suite([write(tmp_path / "suite.yaml", suite(**changes))])


def test_run_configs_must_share_data_and_schedule(tmp_path):
    base = {
        "data": {"dir": "data/x", "vocab_size": 384},
        "train": {"out_dir": "runs/a", "max_steps": 10, "warmup_steps": 1},
    }
    a = write(tmp_path / "dense.yaml", {**base, "model": {"preset": "llama-tiny"}})
    b = write(tmp_path / "moe.yaml", {**base, "model": {"preset": "qwen-moe-4e-top1"}})
    loaded = load_suite([a, b])
    assert [run.name for run in loaded.runs] == ["dense", "moe"]
    c = write(
        tmp_path / "other.yaml",
        {**base, "model": {"preset": "llama-tiny"}, "train": {"max_steps": 20, "warmup_steps": 1}},
    )
    with pytest.raises(ConfigError, match="run 'other': train.max_steps is 20 but run 'dense' has 10"):
        load_suite([a, c])
    with pytest.raises(ConfigError, match="two runs are named 'dense'"):
        load_suite([a, a])


def test_the_cli_reports_a_bad_suite_without_a_traceback(tmp_path, capsys):
    path = write(tmp_path / "suite.yaml", suite(runs=[{"model": {"preset": "gpt5"}}]))
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "error: run 'gpt5': unknown preset 'gpt5'" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
