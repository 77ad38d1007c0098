"""What the torchrun tests share: a tiny run's config, `mistura train` under torchrun, and the checks
that two runs followed the same curve to the same weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import mistura
from mistura.train.loggers import read_metrics
from tests.conftest import tiny_run
from tests.parallel.spawn import torchrun_launcher
from tests.train.test_moe_training import KINDS

NEEDS_GLOO = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)
STEPS = 20
# fp32 sums taken in another order (two half-batch means averaged, not one mean): the loss curves and the
# weights agree to float rounding, which 20 Adam steps amplify a little.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
GRAD_NORM_RTOL = 1e-4
# With two micro-batches a step, a few gradient elements of the MoE are sums that cancel to ~1e-9, pure
# rounding noise, whose sign Adam's first steps (lr * g / (|g| + eps)) turn into updates of up to ~lr / 10:
# measured 1.5e-4 on the final weights (lr 3e-3), while the losses still agree to 1.4e-6 and the biases exactly.
MOE_WEIGHT_ATOL = 1e-3
# The deepseek-style MoE of tests/train/test_moe_training.py, aux-loss-free: sigmoid scores, groups,
# a shared expert and the selection bias, with its balance losses at 0 (see test_moe_bias_follows_one_process).
MOE = {**KINDS["deepseek"], "moe": {**KINDS["deepseek"]["moe"], "seq_aux_loss_weight": 0.0}}


@pytest.fixture
def config(prepared, tmp_path):
    """config(name, model=..., parallel=..., **train): a run's YAML file, out_dir tmp_path / name."""

    def make(name, model=None, parallel=None, **train):
        ddp_run = {"device": "cpu", "max_steps": STEPS, "eval_interval": 10, "checkpoint_interval": 10}
        run = tiny_run(prepared, model, out_dir=str(tmp_path / name), **(ddp_run | train))
        run["sample"] = {"prompts": ["Capitu"], "max_new_tokens": 2}
        run["parallel"] = {"data_parallel": "ddp", "timeout_s": 60, **(parallel or {})}
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(run), encoding="utf-8")  # JSON is YAML
        return path

    return make


def mistura_train(config, processes=None, *args):
    """`python -m mistura.cli train config`, under torchrun with `processes` processes when given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if processes is None else torchrun_launcher(processes)
    command = [*launcher, "-m", "mistura.cli", "train", str(config), "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def trained(config, processes=None, *args):
    result = mistura_train(config, processes, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def train_losses(out_dir, field: str = "loss") -> list[float]:
    """A run's training records' `field` (the loss by default), one per step."""
    records = [r for r in read_metrics(out_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r[field] for r in records]


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    """The weights of a run's last checkpoint, single-file or distributed."""
    return mistura.load(out_dir / f"checkpoints/step-{STEPS:07d}").state_dict()


def assert_same_run(one, two, weight_atol=WEIGHT_ATOL):
    """Two runs' training losses, gradient norms and final weights agree to fp32 rounding; returns the largest
    differences. The gradient norms catch a gradient scaled as a whole, which Adam's updates would hide."""
    a, b = train_losses(one), train_losses(two)
    loss_gap = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert loss_gap <= LOSS_RTOL, (a, b)
    norms = train_losses(one, "grad_norm"), train_losses(two, "grad_norm")
    assert max(abs(x - y) / x for x, y in zip(*norms)) <= GRAD_NORM_RTOL, norms
    wa, wb = final_weights(one), final_weights(two)
    assert wa.keys() == wb.keys()
    weight_gap = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert weight_gap <= weight_atol
    return loss_gap, weight_gap, wa, wb
