"""Generation and chat across the processes torchrun starts: one tensor-parallel model, rank 0 at the keyboard.

    torchrun --nproc-per-node N -m mistura.cli generate CKPT --prompt "Capitu"
    torchrun --nproc-per-node N -m mistura.cli chat CKPT

A generation command runs inside `processes(timeout_s)`, which yields how it runs:

- `Alone` (no torchrun, or one process): models load whole (`mistura.load`) and input is read
  where it is; nothing distributed is set up.
- `TensorParallel` (torchrun with N > 1 processes): the processes join the default process
  group (gloo on the CPU; NCCL on CUDA, each process on the GPU of its LOCAL_RANK) and a 1-D
  device mesh over all of them, over which every model is split (mistura.parallel.tensor: a
  `--model-parallel N` folder gives each rank its own file; any other folder is loaded whole,
  then split).

Both answer the same calls, so a command reads the same either way:

    model = run.load(path)          # whole, or this rank's part of it
    value = run.share(read)         # read() on rank 0; on every rank its value, or the MisturaError it raised
    read_line = run.shared(make)    # a reader make() builds on rank 0 alone, each call shared

Rank 0 alone reads input (the prompt, a prompts file, the chat's lines) and shares it; a bad
input raises the same error on every rank, so that none is left waiting for the others. Every
rank then runs the same generation: the logits are gathered whole and every rank samples with
the same seed, so all draw the tokens one process draws. Rank 0 alone prints: the others' stdout
and stderr go nowhere for the length of the command (an error raised out of it is still printed
on every rank).

Input travels over a gloo group of its own that waits as long as it takes, since a person may
take their time to type (a rank 0 that dies closes its connections, which ends the wait at once).
The timeout bounds every other collective, so a dead or stuck process fails the command with a
DistributedError instead of hanging it. The group is left at the end whatever happens.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mistura.errors import ConfigError, MisturaError
from mistura.loading import load
from mistura.model import Transformer
from mistura.parallel.distributed import is_main, joined, launched_world_size

T = TypeVar("T")

# How long the other ranks wait for rank 0's next input: a year stands for "as long as the person takes".
INPUT_TIMEOUT = datetime.timedelta(days=365)


class Alone:
    """A single process: models loaded whole, input read where it is."""

    def load(self, path: str | Path) -> Transformer:
        return load(path)

    def share(self, read: Callable[[], T]) -> T:
        return read()

    def shared(self, make: Callable[[], Callable[[], T]]) -> Callable[[], T]:
        return make()


class TensorParallel:
    """One of torchrun's processes: models split over `mesh`, input read by rank 0 and shared over `inputs`."""

    def __init__(self, mesh: DeviceMesh, inputs: dist.ProcessGroup):
        self.mesh, self.inputs = mesh, inputs

    def load(self, path: str | Path) -> Transformer:
        # DTensor's modules take half a second to import: only a run on several processes pays it.
        from mistura.parallel.tensor import load_tensor_parallel

        return load_tensor_parallel(path, self.mesh)

    def share(self, read: Callable[[], T]) -> T:
        """read() on rank 0 and its value on every rank; a MisturaError it raises is raised on every rank.

        Anything else read raises (Ctrl-C at the prompt, say) stays rank 0's: the others keep waiting.
        """
        message: list[Any] = [None]
        if is_main():
            try:
                message = [(read(), None)]
            except MisturaError as err:
                message = [(None, err)]
        dist.broadcast_object_list(message, src=0, group=self.inputs)
        value, error = message[0]
        if error is not None:
            raise error
        return value

    def shared(self, make: Callable[[], Callable[[], T]]) -> Callable[[], T]:
        """A reader every rank calls in step: make() builds it on rank 0 alone, and each call is shared."""
        read = make() if is_main() else None
        return lambda: self.share(read)


Run = Alone | TensorParallel  # how a generation command runs


@contextlib.contextmanager
def processes(timeout_s: float) -> Iterator[Run]:
    """How a generation command runs, for the length of the block: Alone, or one of torchrun's processes
    whose collectives wait `timeout_s` seconds at most (see the module docstring)."""
    if launched_world_size() <= 1:
        yield Alone()
        return
    if timeout_s <= 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout_s:g}")
    with _joined(timeout_s) as mesh, _quiet_unless_main():
        yield TensorParallel(mesh, dist.new_group(backend="gloo", timeout=INPUT_TIMEOUT))


@contextlib.contextmanager
def _joined(timeout_s: float) -> Iterator[DeviceMesh]:
    """The default process group and a 1-D mesh over all its ranks; left at the end, its failures DistributedErrors."""
    device = _device()
    with joined(device, timeout_s, "--timeout"):
        yield init_device_mesh(device, (dist.get_world_size(),))


def _device() -> str:
    """cuda, this process on the GPU of its LOCAL_RANK, on a machine with GPUs; else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= gpus:
        raise ConfigError(
            f"process {local_rank} of this machine has no GPU of its own: start at most {gpus} processes per node"
        )
    torch.cuda.set_device(local_rank)
    return "cuda"


@contextlib.contextmanager
def _quiet_unless_main() -> Iterator[None]:
    """Rank 0's stdout and stderr as they are, the other ranks' nowhere, for the block."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere), contextlib.redirect_stderr(nowhere):
        yield
