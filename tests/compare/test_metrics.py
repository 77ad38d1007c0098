"""The metrics JSON's derived figures, from training records like the trainer writes."""

import pytest

from mistura.compare.metrics import median_tokens_per_s, moe_layers, run_metrics, sessions


def record(step, elapsed, rate=1000.0, loss=3.0, **extra):
    return {"step": step, "loss": loss, "loss/main": loss, "tokens_per_s": rate, "tokens": step * 10,
            "elapsed_s": elapsed, **extra}  # fmt: skip


def test_a_resumed_run_adds_up_its_sessions():
    # Session one logged steps 1-6 in 6 s; the run resumed from step 4 and took 9 s for steps 5-10.
    records = [record(s, float(s)) for s in range(1, 5)] + [record(s, 1.5 * (s - 4)) for s in range(5, 11)]
    assert [len(group) for group in sessions(records)] == [4, 6]
    summary = {"steps": 10, "val_loss": 2.0, "val_ppl": 7.39, "unigram_loss": 5.0}
    counts = {"total": 10, "active": 8, "embedding": 2, "flops_per_token": 100}
    memory = {"device": "cpu", "bytes": 1, "kind": "process peak RSS"}
    evals = [{"step": 5, "val_loss": 2.5, "tokens": 50}, {"step": 10, "val_loss": 2.0, "tokens": 100}]
    result = run_metrics("x", "m", records + evals, summary, counts, 10, 10, memory)
    assert result["wall_s"] == pytest.approx(4.0 + 9.0)
    assert result["best_val_loss"] == 2.0 and result["history"]["val_tokens"] == [50, 100]
    assert result["train_flops"] == 100 * 100 and result["tokens"] == 100


def test_throughput_leaves_out_warm_up_and_each_first_record():
    slow_start = [record(1, 1.0, rate=10.0), record(2, 2.0, rate=100.0)]
    steady = [record(s, float(s), rate=1000.0 + s) for s in range(3, 20)]
    resumed = [record(20, 0.5, rate=1.0), record(21, 1.0, rate=1021.0)]
    assert median_tokens_per_s(slow_start + steady + resumed, max_steps=21) == pytest.approx(1011.5)
    assert median_tokens_per_s([record(1, 1.0, rate=5.0)], max_steps=1) == 5.0


def test_moe_statistics_are_window_means_with_the_expert_load():
    def moe(shares, dropped):
        stats = {f"moe/3/load_{i}": share for i, share in enumerate(shares)}
        return {**stats, "moe/3/load_cv": 2 * dropped, "moe/3/dropped_fraction": dropped, "moe/3/dead_experts": 0}

    window = [record(9, 9.0, **moe([0.5, 0.5, 0.0], 0.1)), record(10, 10.0, **moe([0.3, 0.3, 0.4], 0.3))]
    layers = moe_layers(window)
    assert list(layers) == ["3"]
    assert layers["3"]["load"] == pytest.approx([0.4, 0.4, 0.2])
    assert layers["3"]["dropped_fraction"] == pytest.approx(0.2) and layers["3"]["load_cv"] == pytest.approx(0.4)
