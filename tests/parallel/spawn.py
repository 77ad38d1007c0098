"""Run a test function on several real processes joined in a gloo process group, from pytest.

    run_ranks(check_layer, 4, config)   # check_layer(rank, world, config) runs on ranks 0..3

The function must be defined at a module's top level (the processes are spawned and import it).
A failure on any rank raises here with that rank's traceback; a collective that hangs fails
after `timeout` seconds instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_launcher(processes: int, port: int | None = None) -> list[str]:
    """The start of a command that runs a module or script on `processes` processes under torchrun, meeting on
    127.0.0.1. torchrun looks at its workers once a second, so a worker that fails leaves the others the time to
    say why before torchrun stops them."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    meeting = ["--master-addr", "127.0.0.1", "--master-port", str(port or free_port())]
    return [*launcher, *meeting, "--monitor-interval", "1"]


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120) -> None:
    """fn(rank, world, *args) on `world` spawned processes, each in the default gloo group."""
    context = mp.start_processes(
        _join_and_run, args=(fn, world, free_port(), args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world} processes did not finish within {timeout:g} s")


def _join_and_run(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
