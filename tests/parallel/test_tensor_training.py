"""Pretraining with every layer split over the processes (parallel.tensor_parallel), for real under torchrun: the
processes train on the same rows, and the run must follow the single-process run; its distributed checkpoints
resume in one process."""

import json
import shutil

import pytest

from mistura.checkpoint import is_distributed
from tests.parallel.conftest import (
    MOE,
    MOE_WEIGHT_ATOL,
    NEEDS_GLOO,
    STEPS,
    assert_same_run,
    final_weights,
    mistura_train,
    train_losses,
    trained,
)

pytestmark = NEEDS_GLOO

TP = {"data_parallel": "none", "tensor_parallel": 2}
MLA = {"preset": "dragao-tiny", "n_head": 4, "n_kv_head": 4, "d_model": 32}


@pytest.mark.parametrize(
    ("model", "train"), [(None, {"ema_decay": 0.9}), (MOE, {"grad_accum": 2}), (MLA, {})], ids=["gqa", "moe", "mla"]
)
def test_tensor_parallel_follows_one_process(config, tmp_path, model, train):
    trained(config("one", model=model, **train))
    two = trained(config("two", model=model, parallel=TP, **train), 2)
    loss_gap, weight_gap, _, _ = assert_same_run(tmp_path / "one", tmp_path / "two", MOE_WEIGHT_ATOL)
    print(f"tp 2: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    assert "tensor-parallel over 2 processes" in two.stdout and "samples:" in two.stdout
    assert is_distributed(tmp_path / f"two/checkpoints/step-{STEPS:07d}")


@pytest.mark.parametrize(
    ("model", "data_parallel", "train"),
    [(None, "fsdp", {}), (MLA, "fsdp", {}), (None, "ddp", {"grad_accum": 2, "ema_decay": 0.9})],
    ids=["gqa-fsdp", "mla-fsdp", "gqa-ddp"],
)
def test_tensor_parallel_beside_data_parallel_follows_one_process(config, tmp_path, model, data_parallel, train):
    """4 processes: two groups split the layers in two, FSDP shards (or DDP replicates) each half over the
    groups, which train on their own rows."""
    trained(config("one", model=model, **train))
    parallel = {"data_parallel": data_parallel, "tensor_parallel": 2}
    four = trained(config("four", model=model, parallel=parallel, **train), 4)
    loss_gap, weight_gap, _, _ = assert_same_run(tmp_path / "one", tmp_path / "four", MOE_WEIGHT_ATOL)
    print(f"tp 2 x {data_parallel} 2: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    assert f"tensor-parallel over 2 processes, data-parallel ({data_parallel}) over 2 groups" in four.stdout


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_tensor_parallel_beside_split_experts_follows_one_process(config, tmp_path, data_parallel):
    """4 processes: two groups split the layers in two; the groups split the experts between them (ep 2), each
    group's two processes running the same experts on the same rows."""
    trained(config("one", model=MOE, grad_accum=2))
    parallel = {"data_parallel": data_parallel, "tensor_parallel": 2, "expert_parallel": 2}
    four = trained(config("four", model=MOE, parallel=parallel, grad_accum=2), 4)
    loss_gap, weight_gap, _, _ = assert_same_run(tmp_path / "one", tmp_path / "four", MOE_WEIGHT_ATOL)
    print(f"tp 2 x ep 2 ({data_parallel}): loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    expected = f"tensor-parallel over 2 processes, data-parallel ({data_parallel}) over 2 groups, experts split over 2"
    assert expected in four.stdout
    assert_resumes_in_one_process(tmp_path, tmp_path / "four.yaml")


def test_mla_tensor_parallel_resumes_in_one_process(config, tmp_path):
    path = config("two", model=MLA, parallel=TP)
    trained(path, 2)
    assert_resumes_in_one_process(tmp_path, path)


def assert_resumes_in_one_process(tmp_path, path):
    """The run of config `path` resumed from its step-10 checkpoint in a single process follows it to the end."""
    run = tmp_path / path.stem
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / f"checkpoints/step-{STEPS:07d}")
    single = json.loads(path.read_text().replace(str(run), str(resumed)))
    single["parallel"] = {"data_parallel": "none"}
    (tmp_path / "resumed.yaml").write_text(json.dumps(single))
    assert "at step 10" in trained(tmp_path / "resumed.yaml", None, "--resume").stdout
    full, again = train_losses(run), train_losses(resumed)
    assert max(abs(a - b) / a for a, b in zip(full, again)) < 1e-5
    weights, whole = final_weights(run), final_weights(resumed)
    assert max((weights[k] - whole[k]).abs().max().item() for k in weights) < MOE_WEIGHT_ATOL


def test_bad_tensor_parallel_layouts_are_refused(config):
    result = mistura_train(config("three", parallel={**TP, "tensor_parallel": 3}), 2)
    assert result.returncode != 0
    assert result.stderr.count("parallel.tensor_parallel is 3 and there are 2 process(es)") == 2, result.stderr
    result = mistura_train(config("odd", parallel={"data_parallel": "fsdp", "tensor_parallel": 2}, batch_size=3), 4)
    assert result.returncode != 0 and "batch_size 3 is not divisible by the 2 data-parallel" in result.stderr
    result = mistura_train(config("kv", model={"n_kv_head": 1}, parallel=TP), 2)
    assert result.returncode != 0 and "n_kv_head" in result.stderr, result.stderr
    result = mistura_train(config("ep4", model=MOE, parallel={**TP, "data_parallel": "ddp", "expert_parallel": 4}), 4)
    assert result.returncode != 0
    assert "expert_parallel 4 does not divide the 2 data-parallel groups of 2 processes" in result.stderr
