"""Fully sharded training (FSDP2) and distributed checkpoints for real: torchrun starts CPU processes
(gloo) that each hold a shard of every parameter, and the runs must follow the single-process run;
their checkpoints, one shard file per process, resume at any number of processes."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

import mistura
from mistura.checkpoint import is_distributed, load_weights, verify
from mistura.config import ModelConfig
from mistura.errors import CheckpointError
from mistura.model import Transformer
from mistura.parallel.fsdp import shard_model
from mistura.train.loggers import read_metrics
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
from tests.parallel.spawn import run_ranks, torchrun_launcher

pytestmark = NEEDS_GLOO

FSDP = {"data_parallel": "fsdp"}


def checkpoint(out_dir, step=STEPS):
    return out_dir / "checkpoints" / f"step-{step:07d}"


def test_two_sharded_processes_follow_one(config, tmp_path):
    trained(config("one"))
    two = trained(config("two", parallel=FSDP), 2)
    loss_gap, weight_gap, _, _ = assert_same_run(tmp_path / "one", tmp_path / "two")
    print(f"dense fsdp: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    assert "data-parallel (fsdp) over 2 processes" in two.stdout
    assert two.stdout.count("done: 20 steps") == 1 and "samples:" in two.stdout  # rank 0 reports, from the shards
    assert len(read_metrics(tmp_path / "two")) == len(read_metrics(tmp_path / "one"))
    saved = checkpoint(tmp_path / "two")
    shards = sorted(p.name for p in (saved / "shards").iterdir())
    assert is_distributed(saved) and shards == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    assert not (saved / "model.safetensors").exists()
    verify(saved)  # the manifest covers every shard file


def test_sharded_moe_with_accumulation_follows_one(config, tmp_path):
    trained(config("one", model=MOE, grad_accum=2))
    trained(config("two", model=MOE, grad_accum=2, parallel=FSDP), 2)
    loss_gap, weight_gap, one, two = assert_same_run(tmp_path / "one", tmp_path / "two", MOE_WEIGHT_ATOL)
    print(f"moe fsdp: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
    biases = [k for k in one if k.endswith("expert_bias")]
    assert biases and all(torch.equal(one[k], two[k]) for k in biases)


def test_ema_follows_one(config, tmp_path):
    trained(config("one", ema_decay=0.9))
    trained(config("two", ema_decay=0.9, parallel=FSDP), 2)
    assert_same_run(tmp_path / "one", tmp_path / "two")  # the checkpoints hold the average


def test_cpu_offload_on_the_cpu_is_refused(config):
    result = mistura_train(config("offload", parallel={**FSDP, "cpu_offload": True}), 2)
    assert result.returncode != 0
    assert result.stderr.count("this run trains on the CPU, where they are already") == 2, result.stderr


def test_bf16_mixed_precision_stays_near_fp32(config, tmp_path):
    trained(config("fp32", parallel=FSDP), 2)
    trained(config("bf16", parallel={**FSDP, "mixed_precision": "bf16"}), 2)
    fp32, bf16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    gap = max(abs(a - b) / a for a, b in zip(fp32, bf16))
    assert 0 < gap < 2e-2, gap  # bf16 products (8 bits of mantissa): close, not equal
    weights = final_weights(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 for w in weights.values())  # the shards stay fp32


def test_saved_at_four_resumes_at_two_and_one(config, tmp_path):
    """The uninterrupted run at 4 processes against the same run resumed from its step-10 checkpoint."""
    path = config("four", parallel=FSDP, batch_size=8)
    trained(path, 4)
    full = train_losses(tmp_path / "four")
    for processes in (2, None):
        resumed = tmp_path / f"resumed-{processes}"
        shutil.copytree(tmp_path / "four", resumed)
        shutil.rmtree(checkpoint(resumed))
        moved = path.read_text().replace(str(tmp_path / "four"), str(resumed))
        (tmp_path / f"resumed-{processes}.yaml").write_text(moved)
        result = trained(tmp_path / f"resumed-{processes}.yaml", processes, "--resume")
        assert "resumed from" in result.stdout and "at step 10" in result.stdout
        again = train_losses(resumed)
        assert again[:10] == full[:10]
        assert max(abs(a - b) / a for a, b in zip(full, again)) < 1e-5, (full, again)
    single = checkpoint(tmp_path / "resumed-None")
    assert not is_distributed(single) and (single / "model.safetensors").is_file()  # one process writes one file


# Rank 0 kills itself with SIGKILL in the middle of saving step 20: every process has written its shards,
# the training state and the manifest are not written yet, and the folder has not been renamed into place.
KILLED_IN_SAVE = (
    "import os, signal, sys\n"
    "from mistura.cli import main\n"
    "from mistura.train import state\n"
    "save_state = state.save_state\n"
    "def dying(directory, **kw):\n"
    "    if kw['step'] == 20 and os.environ['RANK'] == '0':\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    save_state(directory, **kw)\n"
    "state.save_state = dying\n"
    "sys.exit(main(['train', sys.argv[1], '--no-progress', *sys.argv[2:]]))\n"
)


def test_killed_while_saving_resumes_from_the_previous_checkpoint(config, tmp_path):
    reference = config("reference", parallel=FSDP)
    trained(reference, 2)
    path = config("killed", parallel=FSDP)
    script = tmp_path / "killed_in_save.py"
    script.write_text(KILLED_IN_SAVE, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*torchrun_launcher(2), str(script), str(path)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert killed.returncode != 0
    run_dir = tmp_path / "killed"
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-0000010"]
    assert list((run_dir / "checkpoints").glob(".step-0000020*"))  # the half-written folder, hidden
    result = trained(path, 2, "--resume")
    assert "resumed from" in result.stdout and "at step 10" in result.stdout
    assert train_losses(run_dir) == train_losses(tmp_path / "reference")


def test_a_sharded_run_refuses_to_resume_a_single_file_checkpoint(config, tmp_path):
    path = config("run", max_steps=10)
    trained(path, 2)  # ddp writes single-file checkpoints
    fsdp = path.read_text().replace('"data_parallel": "ddp"', '"data_parallel": "fsdp"')
    path.write_text(fsdp.replace('"max_steps": 10', '"max_steps": 20'))
    result = mistura_train(path, 2, "--resume")
    assert result.returncode != 0
    assert result.stderr.count("resumes distributed checkpoints only") == 2, result.stderr


def test_convert_a_distributed_checkpoint_to_one_folder(config, tmp_path):
    trained(config("run", parallel=FSDP), 2)
    out = tmp_path / "whole"
    command = [sys.executable, "-m", "mistura.cli", "convert", "from-distributed", str(tmp_path / "run"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    whole, sharded = mistura.load(out).state_dict(), final_weights(tmp_path / "run")
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)
    assert (
        mistura.load_tokenizer(out).encode("Capitu").ids
        == mistura.load_tokenizer(tmp_path / "run").encode("Capitu").ids
    )


def test_a_damaged_or_mismatched_distributed_checkpoint_is_refused_by_name(config, tmp_path):
    trained(config("run", parallel=FSDP, max_steps=10), 2)
    saved = checkpoint(tmp_path / "run", 10)
    other = Transformer(dataclasses.replace(ModelConfig.from_json(saved / "config.json"), d_ff=96))
    with pytest.raises(CheckpointError, match="has shape"):
        load_weights(saved, other)
    shard = next((saved / "shards").iterdir())
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        mistura.load(saved)
    with pytest.raises(CheckpointError, match="not a readable distributed checkpoint"):
        load_weights(saved, other)  # past the manifest: the shard's own header is checked too
    result = subprocess.run(
        [sys.executable, "-m", "mistura.cli", "convert", "from-distributed", str(tmp_path / "whole"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr and "error:" in result.stderr


def local_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this process holds: its shards of a sharded module, all of a plain one."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in module.parameters())


def shard_bytes(rank, world):
    """Each process's parameters, gradients and Adam moments are 1/world of the whole (dim 0 padded to divide)."""
    torch.manual_seed(0)
    config = ModelConfig.from_name("llama-tiny", vocab_size=96, max_seq_len=16, n_layer=2, d_model=32, n_head=4)
    model = Transformer(config)
    total = local_bytes(model)
    shard_model(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 96, (2, 16))).sum().backward()
    optimizer.step()
    grads = sum(p.grad.to_local().numel() * 4 for p in model.parameters())
    moments = sum(t.to_local().numel() * 4 for s in optimizer.state.values() for t in s.values() if t.dim())
    for part in (local_bytes(model), grads, moments / 2):
        assert abs(part - total / world) <= 0.1 * total / world, (part, total / world)


@pytest.mark.parametrize("world", [2, 4])
def test_each_process_holds_its_share_of_the_state(world):
    run_ranks(shard_bytes, world)
