import os
import signal

import pytest

from mistura import cpu_isa


@pytest.fixture
def amx_cpu(monkeypatch):
    """A CPU that reports AMX, with ONEDNN_MAX_CPU_ISA unset; the variable is restored afterwards."""
    monkeypatch.setattr(cpu_isa, "reports_amx", lambda: True)
    monkeypatch.delenv(cpu_isa.VARIABLE, raising=False)
    return monkeypatch


def test_a_probe_that_faults_caps_onednn_below_amx(amx_cpu):
    amx_cpu.setattr(cpu_isa, "_bf16_matmul", lambda: os.kill(os.getpid(), signal.SIGILL))
    cpu_isa.avoid_faulting_amx()
    assert os.environ[cpu_isa.VARIABLE] == cpu_isa.BELOW_AMX


@pytest.mark.parametrize("probe", [lambda: None, lambda: os.kill(os.getpid(), signal.SIGSEGV)])
def test_a_probe_that_runs_or_dies_otherwise_changes_nothing(amx_cpu, probe):
    amx_cpu.setattr(cpu_isa, "_bf16_matmul", probe)
    cpu_isa.avoid_faulting_amx()
    assert cpu_isa.VARIABLE not in os.environ


def test_a_failing_probe_never_returns_into_the_parent_code(amx_cpu):
    def raises():
        raise RuntimeError("no bf16 here")

    amx_cpu.setattr(cpu_isa, "_bf16_matmul", raises)
    cpu_isa.avoid_faulting_amx()  # the child exits; only the parent comes back
    assert cpu_isa.VARIABLE not in os.environ


def test_a_stuck_probe_is_killed_and_changes_nothing(amx_cpu):
    amx_cpu.setattr(cpu_isa, "PROBE_SECONDS", 0.2)
    amx_cpu.setattr(cpu_isa, "_bf16_matmul", lambda: signal.pause())
    cpu_isa.avoid_faulting_amx()
    assert cpu_isa.VARIABLE not in os.environ


@pytest.mark.parametrize("already_set", [True, False])
def test_no_probe_where_the_variable_is_set_or_amx_is_not_reported(monkeypatch, already_set):
    if already_set:
        monkeypatch.setattr(cpu_isa, "reports_amx", lambda: True)
        monkeypatch.setenv(cpu_isa.VARIABLE, "AVX2")
    else:
        monkeypatch.setattr(cpu_isa, "reports_amx", lambda: False)
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("probed"))
    cpu_isa.avoid_faulting_amx()


def test_bf16_matmul_runs_once_mistura_is_imported():
    """On a VM that reports AMX without running it, this kills the test process unless capped."""
    import torch

    x = torch.randn(64, 64, dtype=torch.bfloat16)
    assert torch.allclose((x @ x).float(), x.float() @ x.float(), atol=0.5, rtol=0.05)
