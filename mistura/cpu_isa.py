"""Keep oneDNN off AMX on CPUs that report it but fault on its instructions.

Some virtual machines report AMX (Intel Sapphire Rapids and later) without enabling it:
oneDNN picks its AMX kernels, and the first bf16 matmul kills the process with SIGILL
(bf16 autocast, the fp8 inference path). On a Linux CPU that reports AMX,
`avoid_faulting_amx` runs one bf16 matmul in a forked child; if the child dies of SIGILL,
oneDNN is capped at AVX-512 through ONEDNN_MAX_CPU_ISA, which oneDNN reads at its first
use and child processes inherit. Setting the variable yourself skips the probe.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

import torch

VARIABLE = "ONEDNN_MAX_CPU_ISA"
BELOW_AMX = "AVX512_CORE_BF16"
CPUINFO = Path("/proc/cpuinfo")
PROBE_SECONDS = 10.0  # a child that has not finished by then (a lock held at fork time) is killed


def avoid_faulting_amx() -> None:
    """Cap oneDNN below AMX if this CPU reports AMX and a bf16 matmul faults on it."""
    if VARIABLE in os.environ or not reports_amx():
        return
    if _faults_in_child(_bf16_matmul):
        os.environ[VARIABLE] = BELOW_AMX


def reports_amx() -> bool:
    return CPUINFO.exists() and "amx_bf16" in CPUINFO.read_text()


def _bf16_matmul() -> None:
    x = torch.ones(64, 64, dtype=torch.bfloat16)
    x @ x


def _faults_in_child(probe) -> bool:
    """Whether `probe` dies of SIGILL in a forked child (silenced, on one thread, killed if stuck)."""
    pid = os.fork()
    if pid == 0:
        try:
            faulthandler.disable()  # no crash report on the parent's terminal
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            torch.set_num_threads(1)  # the parent's OpenMP threads do not exist here
            probe()
        finally:
            os._exit(0)
    deadline = time.monotonic() + PROBE_SECONDS
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.002)
    status = waited[1]
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGILL
