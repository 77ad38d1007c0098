import ctypes.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mistura.train import trainer
from mistura.train.allocator import _glibc, retain_freed_memory
from mistura.train.config import RunConfig

# Allocates and fills a 64 MiB tensor a few times (one page fault per fresh 4 KiB page), and
# prints the median minor page faults of a round once the heap holds enough free memory.
FAULTS_PER_REUSE = textwrap.dedent(
    """
    import resource, statistics, sys, torch
    from mistura.train.allocator import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    def faults_of_one_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    rounds = [faults_of_one_tensor() for _ in range(7)]
    print(int(statistics.median(rounds[2:])))
    """
)
PAGES = 64 * 2**20 // 4096
# A freed block is reused only if it coalesces with its free neighbours: torch asks for 64-byte
# aligned blocks, which glibc serves from a request a little larger than the block. A small
# neighbour held in glibc's per-thread cache (the tensor's TensorImpl, say) keeps the freed block
# from growing back to that size; whether one lands there depends on where the heap starts,
# which ASLR moves from run to run. Without the cache the measurement is the same every run.
NO_TCACHE = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}


def faults_per_reuse(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_REUSE, mode],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | NO_TCACHE,
    )
    return int(done.stdout)


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's malloc")
def test_retained_memory_is_reused_without_page_faults():
    assert faults_per_reuse("retain") < PAGES // 10


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's malloc")
def test_by_default_glibc_maps_a_large_tensor_anew_each_time():
    """The cost the trainer avoids (with transparent huge pages always on, a fault maps 2 MiB)."""
    huge_pages = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if huge_pages.exists() and "[always]" in huge_pages.read_text():
        pytest.skip("transparent huge pages are always on")
    assert faults_per_reuse("default") > PAGES // 2


def test_without_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert retain_freed_memory() is False


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_training_retains_freed_memory_unless_told_not_to(run_dict, monkeypatch, retain):
    calls = []
    monkeypatch.setattr(trainer, "retain_freed_memory", lambda: calls.append(True))
    trainer.Trainer(RunConfig.from_dict(run_dict(device="cpu", retain_cpu_memory=retain)), log=lambda *a: None)
    assert calls == ([True] if retain else [])
