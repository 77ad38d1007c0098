"""Data-parallel pretraining for real: torchrun starts two CPU processes (gloo) that train on halves
of each global batch, and the run must follow the single-process run on the same batches."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mistura
from mistura.data.bins import BatchLoader
from mistura.errors import ConfigError
from mistura.parallel.distributed import check_layout
from mistura.train.config import RunConfig
from mistura.train.loggers import read_metrics
from mistura.train.trainer import run_to_dict
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
from tests.parallel.spawn import free_port, torchrun_launcher

pytestmark = NEEDS_GLOO


def test_two_processes_follow_one(config, tmp_path):
    one = trained(config("one"))
    two = trained(config("two"), 2)
    loss_gap, weight_gap, _, _ = assert_same_run(tmp_path / "one", tmp_path / "two")
    print(f"dense: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    assert "data-parallel (ddp) over 2 processes" in two.stdout and "data-parallel" not in one.stdout
    assert two.stdout.count("done: 20 steps") == 1  # rank 0 alone reports
    assert two.stdout.count("step 10: val loss") == 1
    records = read_metrics(tmp_path / "two")
    assert len(records) == len(read_metrics(tmp_path / "one"))  # one writer: no line twice
    state = json.loads((tmp_path / "two/checkpoints/step-0000020/train_state.json").read_text())
    assert state["loader"]["batches_drawn"] == STEPS and state["run_config"]["parallel"]["data_parallel"] == "ddp"


def test_two_nodes_meeting_by_rendezvous_follow_one_process(config, tmp_path):
    """Multi-node as torchrun runs it: two launchers (nodes) of one process each, which find each other through
    the c10d rendezvous on 127.0.0.1 rather than a fixed master; the run follows the single-process run."""
    trained(config("one"))
    path = config("nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    node += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mistura-test"]
    command = [*node, "-m", "mistura.cli", "train", str(path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        outputs = [n.communicate(timeout=180) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outputs
    assert sum("data-parallel (ddp) over 2 processes" in out for out, _ in outputs) == 1  # rank 0's node alone
    assert_same_run(tmp_path / "one", tmp_path / "nodes")


def test_moe_bias_follows_one_process(config, tmp_path):
    # Two micro-batches a step: each process counts its expert loads over both before they are summed.
    trained(config("one", model=MOE, grad_accum=2))
    trained(config("two", model=MOE, grad_accum=2), 2)
    loss_gap, weight_gap, one, two = assert_same_run(tmp_path / "one", tmp_path / "two", MOE_WEIGHT_ATOL)
    print(f"moe: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    biases = [k for k in one if k.endswith("expert_bias")]
    assert biases and any(one[k].abs().sum() > 0 for k in biases)  # the bias did move
    assert all(torch.equal(one[k], two[k]) for k in biases)


def test_two_processes_resume_from_one_checkpoint(config, tmp_path):
    path = config("run")
    trained(path, 2)
    full = train_losses(tmp_path / "run")
    last = final_weights(tmp_path / "run")
    (tmp_path / "run/checkpoints/step-0000020").rename(tmp_path / "kept")
    resumed = trained(path, 2, "--resume")
    assert resumed.stdout.count("resumed from") == 1
    assert train_losses(tmp_path / "run") == full
    again = final_weights(tmp_path / "run")
    assert all(torch.equal(last[k], again[k]) for k in last)


def no_traceback_of_ours(stderr: str) -> bool:
    """torchrun reports a failed worker with a traceback of its own; none may come from mistura."""
    return str(Path(mistura.__file__).parent) + os.sep not in stderr and "ConfigError" not in stderr


def test_batch_not_divisible_by_the_processes_is_an_error(config):
    result = mistura_train(config("bad", batch_size=3), 2)
    assert result.returncode != 0
    line = "error: train.batch_size 3 is not divisible by the 2 processes (the world size)"
    assert result.stderr.count(line) == 2, result.stderr  # each process says why, and exits
    assert no_traceback_of_ours(result.stderr), result.stderr


def test_torchrun_needs_ddp(config):
    result = mistura_train(config("plain", parallel={"data_parallel": "none"}), 2)
    assert result.returncode != 0
    assert result.stderr.count("set parallel.data_parallel: ddp") == 2, result.stderr
    assert no_traceback_of_ours(result.stderr), result.stderr


# Each process runs `mistura train` with its own learning rate: what a node with another copy of the config does.
PER_RANK_LR = (
    "import os, sys; from mistura.cli import main; lr = 1e-3 * (1 + int(os.environ['RANK'])); "
    "sys.exit(main(['train', sys.argv[1], '--no-progress', '--set', f'train.lr={lr}']))"
)


def test_processes_given_different_configs_all_refuse(config, tmp_path):
    script = tmp_path / "per_rank_lr.py"
    script.write_text(PER_RANK_LR, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*torchrun_launcher(2), str(script), str(config("mixed"))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode != 0
    line = "error: the processes were given different run configs: train.lr is 0.002 on rank 1 and 0.001 on rank 0"
    assert result.stderr.count(line) == 2, result.stderr  # every process refuses, none waits for the others
    assert not (tmp_path / "mixed" / "metrics.jsonl").exists()


def worker(port: int, rank: int) -> int:
    """The pid of the torchrun worker of `rank` in the run on `port`, found by its environment."""
    for proc in Path("/proc").iterdir():
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if {f"MASTER_PORT={port}".encode(), f"RANK={rank}".encode()} <= environ:
            return int(proc.name)
    raise AssertionError(f"no worker of rank {rank} on port {port}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize(("signal_name", "says"), [("SIGKILL", "by peer"), ("SIGSTOP", "Timed out")])
def test_a_rank_that_dies_or_hangs_fails_the_run_with_a_clear_error(config, tmp_path, signal_name, says):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    long_run = config("long", max_steps=100_000, parallel={"timeout_s": 5})
    command = [*torchrun_launcher(2, port), "-m", "mistura.cli", "train", str(long_run)]
    run = subprocess.Popen(
        [*command, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    victim = None
    try:
        deadline = time.monotonic() + 60
        while not [r for r in read_metrics(tmp_path / "long") if "loss" in r]:  # the run is training
            assert time.monotonic() < deadline and run.poll() is None, "the run did not start"
            time.sleep(0.2)
        victim, survivor = worker(port, 1), worker(port, 0)
        os.kill(victim, getattr(signal, signal_name))
        while Path(f"/proc/{survivor}").exists():  # rank 0 fails on its own (a stopped rank: within timeout_s)
            assert time.monotonic() < deadline + 60, "rank 0 did not fail"
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):  # a stopped process cannot take torchrun's SIGTERM
            os.kill(victim, signal.SIGKILL)
        _, stderr = run.communicate(timeout=90)  # no hang: the run ends
    finally:
        if victim is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        run.kill()
    assert run.returncode != 0
    assert "error: rank 0: the process group failed (" in stderr and says in stderr, stderr
    assert "another process crashed, hangs or quit" in stderr


def test_each_process_gets_its_rows_of_the_same_global_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    whole = BatchLoader(tokens, 4, 8, seed=3).next_batch()
    parts = [BatchLoader(tokens, 4, 8, seed=3, rows=slice(2 * rank, 2 * rank + 2)) for rank in range(2)]
    halves = [part.next_batch() for part in parts]
    for i in range(2):  # x, then y
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i])
    assert parts[1].state_dict() == {"seed": 3, "batches_drawn": 1}


def test_layout_checks():
    check_layout("none", 3, world=1)
    check_layout("ddp", 3, world=1)  # ddp alone is one process
    check_layout("ddp", 4, world=2)
    with pytest.raises(ConfigError, match="set parallel.data_parallel: ddp"):
        check_layout("none", 4, world=2)
    with pytest.raises(ConfigError, match="batch_size 6 is not divisible by the 4 processes"):
        check_layout("ddp", 6, world=4)


def test_parallel_section_is_validated_and_recorded_only_when_set():
    assert "parallel" not in run_to_dict(RunConfig.from_dict({}))
    run = RunConfig.from_dict({"parallel": {"data_parallel": "ddp", "timeout_s": 30}})
    assert run_to_dict(run)["parallel"] == {
        "data_parallel": "ddp",
        "mixed_precision": "none",
        "cpu_offload": False,
        "expert_parallel": 1,
        "tensor_parallel": 1,
        "timeout_s": 30.0,
    }
    with pytest.raises(ConfigError, match="parallel.data_parallel"):
        RunConfig.from_dict({"parallel": {"data_parallel": "zero"}})
    with pytest.raises(ConfigError, match="are FSDP's: set parallel.data_parallel: fsdp"):
        RunConfig.from_dict({"parallel": {"data_parallel": "ddp", "cpu_offload": True}})
    with pytest.raises(ConfigError, match="parallel.timeout_s: must be a positive"):
        RunConfig.from_dict({"parallel": {"timeout_s": 0}})
    with pytest.raises(ConfigError, match="parallel"):
        RunConfig.from_dict({"parallel": {"world": 2}})
