"""`mistura compare` end to end: two tiny runs (dense and MoE), each trained in its own process."""

import json
import math
import shutil

import pytest
from PIL import Image

import mistura
from mistura.cli import main
from mistura.compare import runner
from mistura.compare.runner import compare, overall_line
from mistura.compare.suite import load_suite
from mistura.errors import ConfigError, DataError

SUITE = """
name: tiny
data: {{source: unused, dir: '{data}', vocab_size: 384}}
model: {{n_layer: 2, d_model: 32, n_head: 4, n_kv_head: 2, max_seq_len: 32}}
train: {{batch_size: 4, max_steps: 12, warmup_steps: 2, lr: 0.01, eval_interval: 6, eval_batches: 2,
        log_interval: 1, checkpoint_interval: 6}}
generation: {{prompts: ['O amor é', 'Era uma vez'], samples_per_prompt: 2, max_new_tokens: 6}}
runs:
  - {{name: dense, model: {{preset: llama-tiny, d_ff: 64}}}}
  - name: moe
    model: {{preset: qwen-moe-8e-top2, moe: {{n_experts: 4, top_k: 2, d_expert: 32, capacity_factor: 1.0}}}}
"""
FIELDS = {
    "run", "model", "device", "steps", "tokens", "val_loss", "val_ppl", "best_val_loss", "best_val_ppl", "train_loss",
    "unigram_loss", "tokens_per_s", "peak_memory_bytes", "peak_memory_kind", "params_total", "params_active",
    "params_embedding", "flops_per_token", "train_flops", "moe", "wall_s", "history", "spec",
}  # fmt: skip
TOKENS_PER_STEP = 4 * 32


@pytest.fixture
def one_thread(monkeypatch):
    # Each run's process then works like the tests' own: one thread suits tiny shapes on a busy machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def compared(prepared, tmp_path_factory):
    """The suite and its results folder, after one `mistura compare`."""
    root = tmp_path_factory.mktemp("compare")
    suite = root / "suite.yaml"
    suite.write_text(SUITE.format(data=prepared), encoding="utf-8")
    out = root / "results"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        assert main(["compare", str(suite), "--out", str(out), "--no-progress"]) == 0
    return suite, out


def metrics(out, name):
    return json.loads((out / "metrics" / f"{name}_metrics.json").read_text(encoding="utf-8"))


def test_metrics_json_fields_and_values(compared):
    _, out = compared
    for name in ("dense", "moe"):
        m = metrics(out, name)
        assert FIELDS <= set(m)
        assert m["run"] == name and m["steps"] == 12 and m["tokens"] == 12 * TOKENS_PER_STEP
        for key in ("val_loss", "best_val_loss", "train_loss", "tokens_per_s", "wall_s", "flops_per_token"):
            assert math.isfinite(m[key]) and m[key] > 0, key
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
        assert m["best_val_loss"] <= m["val_loss"] and m["best_val_ppl"] == pytest.approx(math.exp(m["best_val_loss"]))
        cuda = m["device"].startswith("cuda")  # tensors' peak there; on the CPU the process's, runtime included
        assert m["peak_memory_kind"] == ("CUDA peak allocated" if cuda else "process peak RSS")
        assert m["peak_memory_bytes"] > (0 if cuda else 50 * 2**20)
        counts = mistura.load(out / "runs" / name).parameter_counts()
        assert (m["params_total"], m["params_active"], m["params_embedding"]) == (
            counts["total"],
            counts["active"],
            counts["embedding"],
        )
        assert m["flops_per_token"] > 6 * counts["active_non_embedding"]
        assert m["train_flops"] == m["flops_per_token"] * m["tokens"]
        history = m["history"]
        assert history["train_tokens"] == [TOKENS_PER_STEP * step for step in range(1, 13)]
        assert history["val_tokens"] == [TOKENS_PER_STEP * 6, TOKENS_PER_STEP * 12]
        assert history["val_loss"][-1] == m["val_loss"]
    dense, moe = metrics(out, "dense"), metrics(out, "moe")
    assert dense["moe"] == {} and dense["history"]["expert_load"] == {}
    assert moe["params_total"] > moe["params_active"]
    assert set(moe["moe"]) == {"0", "1"}
    for layer in moe["moe"].values():
        assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0)
        assert 0 <= layer["dropped_fraction"] < 1 and 0 < layer["entropy"] <= math.log(4)
        assert layer["max_util"] >= 1 >= layer["min_util"] and "balance_loss" in layer and "dead_experts" in layer
    assert [len(shares) for shares in moe["history"]["expert_load"]["0"]] == [4] * 12


def test_plots_are_png_images(compared):
    _, out = compared
    for name in ("dense_convergence.png", "moe_convergence.png", "moe_utilisation.png", "convergence.png"):
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 380
            image.verify()
    assert not (out / "plots" / "dense_utilisation.png").exists()


def test_generations_cover_every_prompt_and_seed(compared):
    _, out = compared
    generations = json.loads((out / "generations" / "moe_generations.json").read_text(encoding="utf-8"))
    pairs = [(s["prompt"], s["seed"]) for s in generations["samples"]]
    assert pairs == [("O amor é", 0), ("O amor é", 1), ("Era uma vez", 0), ("Era uma vez", 1)]
    assert all(isinstance(s["completion"], str) for s in generations["samples"])
    assert generations["generation"]["max_new_tokens"] == 6


def test_report_lists_both_runs_and_embeds_the_plots(compared):
    _, out = compared
    report = (out / "report.md").read_text(encoding="utf-8")
    head = report.splitlines()[:4]
    assert head[0] == "# Comparison study: tiny"
    assert head[2].startswith("Command: `mistura compare ") and head[3].startswith("Machine: ")
    rows = [line for line in report.splitlines() if line.startswith(("| dense |", "| moe |"))]
    assert len(rows) == 3  # both runs in the results table, the MoE run in the MoE table
    for plot in ("convergence.png", "dense_convergence.png", "moe_convergence.png", "moe_utilisation.png"):
        assert f"](plots/{plot})" in report
    assert "Lowest validation perplexity: **" in report and "- moe: O amor é" in report


def test_a_second_invocation_skips_finished_runs(compared, monkeypatch):
    suite, out = compared
    watched = [out / "metrics" / "dense_metrics.json", out / "runs" / "moe" / "metrics.jsonl"]
    before = [path.stat().st_mtime_ns for path in watched]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("subprocess.Popen", no_training)
    lines = []
    results = compare(load_suite([suite]), out, progress=False, log=lines.append)
    assert [r["run"] for r in results] == ["dense", "moe"]
    assert sum("finished earlier, skipped" in line for line in lines) == 2
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_an_interrupted_run_resumes_from_its_checkpoint(compared, tmp_path, one_thread, capfd):
    suite, out = compared
    # As if stopped after step 6: the MoE run has its step-6 checkpoint, a longer log, no metrics yet.
    copy = tmp_path / "results"
    shutil.copytree(out, copy)
    (copy / "metrics" / "moe_metrics.json").unlink()
    shutil.rmtree(copy / "runs" / "moe" / "checkpoints" / "step-0000012")
    lines = []
    compare(load_suite([suite]), copy, progress=False, log=lines.append)
    assert any("dense: finished earlier, skipped" in line for line in lines)
    assert any(line.startswith("run 2/2: moe") for line in lines)
    assert "checkpoints/step-0000006 at step 6" in capfd.readouterr().out  # the run's own process says so
    resumed, original = metrics(copy, "moe"), metrics(out, "moe")
    assert resumed["history"]["train_loss"] == original["history"]["train_loss"]
    assert resumed["val_loss"] == original["val_loss"]


def test_a_changed_configuration_is_refused(compared):
    suite, out = compared
    with pytest.raises(ConfigError, match="run 'dense' .* was made with another configuration"):
        compare(load_suite([suite], {"train": {"lr": 0.02}}), out, progress=False, log=lambda *a: None)


def test_an_eval_block_scores_every_run_without_training_again(compared, tmp_path, monkeypatch, capsys):
    suite, out = compared
    text = tmp_path / "texto.txt"
    text.write_text("Capitu olhou para mim.\nEra uma vez um amor que ninguém contou.\n" * 3, encoding="utf-8")
    copy = tmp_path / "results"
    shutil.copytree(out, copy)
    monkeypatch.setattr(runner, "train_in_subprocess", lambda *a: pytest.fail("a finished run was trained again"))
    lines = []
    compare(load_suite([suite], {"eval": {"text": str(text), "ctx": 16}}), copy, progress=False, log=lines.append)
    scores = {name: json.loads((copy / "evals" / f"{name}_eval.json").read_text()) for name in ("dense", "moe")}
    by_hand = ["eval", str(copy / "runs" / "moe"), "--text", str(text), "--ctx", "16", "--output", str(tmp_path / "e")]
    assert main(by_hand) == 0
    by_hand = json.loads((tmp_path / "e").read_text())
    assert scores["moe"]["text"]["bits_per_byte"] == pytest.approx(by_hand["bits_per_byte"], rel=1e-6)
    assert scores["moe"]["text"]["stride"] == 8 and scores["dense"]["tasks"] == {}
    report = (copy / "report.md").read_text(encoding="utf-8")
    assert "### Evaluation" in report and "| run | val ppl | text ppl | text bits/byte |" in report
    assert f"| moe | {metrics(copy, 'moe')['val_ppl']:.1f} | {by_hand['perplexity']:.1f} |" in report
    lines.clear()
    compare(load_suite([suite], {"eval": {"text": str(text), "ctx": 16}}), copy, progress=False, log=lines.append)
    assert sum("scored earlier, reused" in line for line in lines) == 2
    assert "### Evaluation" not in (out / "report.md").read_text(encoding="utf-8")  # no eval block, no table


def test_an_eval_block_runs_lm_evaluation_harness_tasks(compared, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="eval.tasks need the eval extra: pip install -e '.[eval]'")
    suite, out = compared
    copy = tmp_path / "results"
    shutil.copytree(out, copy)
    monkeypatch.setattr(runner, "train_in_subprocess", lambda *a: pytest.fail("a finished run was trained again"))
    evaluation = {"eval": {"tasks": ["machado_cloze"], "limit": 8, "batch_size": 4}}
    compare(load_suite([suite], evaluation), copy, progress=False, log=lambda *a: None)
    report = (copy / "report.md").read_text(encoding="utf-8")
    assert "| run | val ppl | machado_cloze acc | machado_cloze acc_norm |" in report
    for name in ("dense", "moe"):
        score = json.loads((copy / "evals" / f"{name}_eval.json").read_text())
        cloze = score["tasks"]["machado_cloze"]
        assert score["spec"]["limit"] == 8 and 0 <= cloze["acc,none"] <= 1 and cloze["acc,none"] * 8 % 1 == 0
        assert f"| {cloze['acc,none']:.3f} ± {cloze['acc_stderr,none']:.3f} |" in report


def test_a_bad_eval_block_is_refused_before_any_training(compared, tmp_path, monkeypatch):
    suite, _ = compared
    monkeypatch.setattr(runner, "train_in_subprocess", lambda *a: pytest.fail("trained before checking the eval"))
    with pytest.raises(DataError, match="no such file or folder"):
        compare(load_suite([suite], {"eval": {"text": str(tmp_path / "none.txt")}}), tmp_path / "a", log=print)
    pytest.importorskip("lm_eval", reason="eval.tasks need the eval extra: pip install -e '.[eval]'")
    with pytest.raises(ConfigError, match="unknown lm-evaluation-harness task.*: machado_clozet"):
        compare(load_suite([suite], {"eval": {"tasks": ["machado_clozet"]}}), tmp_path / "b", log=print)


def test_the_overall_line_estimates_the_time_left():
    assert overall_line(1, 6, "dense", [], 0.0) == "run 1/6: dense | 0 s so far | ETA after the first run"
    line = overall_line(3, 6, "moe", [60.0, 120.0], 181.0)
    assert line == "run 3/6: moe | 3 min 01 s so far | ETA 6 min 00 s"  # mean 90 s x 4 runs left
