"""Pretraining with the experts split across processes (parallel.expert_parallel, beside ddp), for real under
torchrun: the run must follow the single-process run, and its distributed checkpoints resume anywhere."""

import shutil

import pytest
import torch

from mistura.checkpoint import is_distributed
from mistura.errors import ConfigError
from mistura.train.config import RunConfig
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
from tests.train.test_moe_training import KINDS

pytestmark = NEEDS_GLOO

# Softmax top-2 over 8 experts, dropless and without balance losses: capacity and the balance losses are taken
# over each process's rows, so with them a data-parallel run is a different (equally valid) run.
QWEN = {**KINDS["qwen-top2"], "moe": {**KINDS["qwen-top2"]["moe"], "capacity_factor": None, "aux_loss_weight": 0.0}}


@pytest.mark.parametrize("model", [QWEN, MOE], ids=["qwen-top2", "deepseek"])
def test_experts_split_over_two_processes_follow_one(config, tmp_path, model):
    trained(config("one", model=model, grad_accum=2))
    two = trained(config("two", model=model, grad_accum=2, parallel={"expert_parallel": 2}), 2)
    loss_gap, weight_gap, one, split = assert_same_run(tmp_path / "one", tmp_path / "two", MOE_WEIGHT_ATOL)
    print(f"ep 2: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    assert "experts split over 2" in two.stdout
    assert is_distributed(tmp_path / f"two/checkpoints/step-{STEPS:07d}")  # each process wrote its experts
    biases = [k for k in one if k.endswith("expert_bias")]
    assert all(torch.equal(one[k], split[k]) for k in biases)


@pytest.mark.parametrize("processes", [2, 4])
def test_experts_split_beside_fsdp_follow_one(config, tmp_path, processes):
    """FSDP shards the rest of the model over every process, and each process's experts over the processes that
    hold the same ones: none at 2 (ep 2), its pair at 4."""
    trained(config("one", model=MOE, batch_size=4))
    parallel = {"data_parallel": "fsdp", "expert_parallel": 2}
    trained(config("split", model=MOE, batch_size=4, parallel=parallel), processes)
    loss_gap, weight_gap, _, _ = assert_same_run(tmp_path / "one", tmp_path / "split", MOE_WEIGHT_ATOL)
    print(f"fsdp + ep 2 on {processes}: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    if processes == 4:  # its step-10 checkpoint, sharded twice, resumes on 2 processes
        resumed = tmp_path / "resumed"
        shutil.copytree(tmp_path / "split", resumed)
        shutil.rmtree(resumed / f"checkpoints/step-{STEPS:07d}")
        moved = (tmp_path / "split.yaml").read_text().replace(str(tmp_path / "split"), str(resumed))
        (tmp_path / "resumed.yaml").write_text(moved)
        assert "at step 10" in trained(tmp_path / "resumed.yaml", 2, "--resume").stdout
        assert_same_run(tmp_path / "split", resumed, MOE_WEIGHT_ATOL)


def test_two_expert_groups_of_two_follow_one_and_resume_at_one(config, tmp_path):
    """4 processes: experts split in pairs, each pair's experts replicated on the other pair."""
    trained(config("one", model=MOE, batch_size=8))
    path = config("four", model=MOE, batch_size=8, parallel={"expert_parallel": 2})
    trained(path, 4)
    assert_same_run(tmp_path / "one", tmp_path / "four", MOE_WEIGHT_ATOL)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "four", resumed)
    shutil.rmtree(resumed / f"checkpoints/step-{STEPS:07d}")
    single = path.read_text().replace(str(tmp_path / "four"), str(resumed))
    (tmp_path / "resumed.yaml").write_text(single.replace('"expert_parallel": 2', '"expert_parallel": 1'))
    result = trained(tmp_path / "resumed.yaml", None, "--resume")
    assert "at step 10" in result.stdout
    full, again = train_losses(tmp_path / "four"), train_losses(resumed)
    assert max(abs(a - b) / a for a, b in zip(full, again)) < 1e-5
    weights, whole = final_weights(tmp_path / "four"), final_weights(resumed)
    assert max((weights[k] - whole[k]).abs().max().item() for k in weights) < MOE_WEIGHT_ATOL


def test_bad_expert_layouts_are_refused(config):
    result = mistura_train(config("three", model=MOE, batch_size=6, parallel={"expert_parallel": 3}), 2)
    assert result.returncode != 0
    assert result.stderr.count("parallel.expert_parallel 3 does not divide the 2 process(es)") == 2, result.stderr
    odd = {**MOE, "moe": {**MOE["moe"], "n_experts": 6, "n_groups": 3}}
    result = mistura_train(config("odd", model=odd, batch_size=4, parallel={"expert_parallel": 4}), 4)
    assert result.returncode != 0
    assert "6 routed experts, not divisible by ep=4" in result.stderr, result.stderr
    with pytest.raises(ConfigError, match="beside parallel.data_parallel: ddp or fsdp"):
        RunConfig.from_dict({"parallel": {"data_parallel": "none", "expert_parallel": 2}})
    with pytest.raises(ConfigError, match="expert_parallel: must be >= 1"):
        RunConfig.from_dict({"parallel": {"expert_parallel": 0}})
