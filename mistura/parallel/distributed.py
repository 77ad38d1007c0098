"""Data-parallel training across the processes torchrun starts.

    torchrun --nproc-per-node N -m mistura.cli train CONFIG.yaml      (with parallel.data_parallel: ddp or fsdp)

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process;
`process_group` joins them into the default process group (gloo on the CPU, NCCL on CUDA, each
process on the GPU of its LOCAL_RANK) for the length of a command and leaves it at the end,
whatever happens. Its timeout bounds every collective, so a dead or stuck process fails the run
instead of hanging it, and such a failure is a DistributedError that says so on the processes
left; processes given different run configs are refused on every one of them
(`check_same_config`).

Every process draws the same global batch (train.batch_size rows, from the same seeded
loader) and reads and trains on its own contiguous rows of it (`rank_rows`); DistributedDataParallel
(or FSDP2, see mistura.parallel.sharded) averages the gradients, which over equal slices is the
global batch's mean, so a run on N processes follows the single-process run: same data order,
same updates up to float rounding.
Outside a process group every helper here is the single-process case (rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from mistura.errors import ConfigError, DistributedError
from mistura.model.moe.router import Router


def launched_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE), 1 when run directly."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {value!r}") from None


def initialized() -> bool:
    """Whether this process is in a default process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that prints, logs and writes checkpoints."""
    return rank() == 0


def check_layout(
    data_parallel: str, batch_size: int, world: int | None = None, expert_parallel: int = 1, tensor_parallel: int = 1
) -> None:
    """Refuse a layout that cannot run: several processes without ddp, a global batch they cannot split evenly,
    experts split over groups that do not divide them, or a model split over other than all the processes."""
    world = launched_world_size() if world is None else world
    if tensor_parallel > 1:
        alone = data_parallel == "none"
        if tensor_parallel != world if alone else world % tensor_parallel:
            raise ConfigError(
                f"parallel.tensor_parallel is {tensor_parallel} and there are {world} process(es): the model is split "
                + ("over all of them (start as many)" if alone else "over groups of that many (start a multiple)")
            )
        if (world // tensor_parallel) % expert_parallel:
            raise ConfigError(
                f"parallel.expert_parallel {expert_parallel} does not divide the {world // tensor_parallel} "
                f"data-parallel groups of {tensor_parallel} processes: the experts are split over that many groups"
            )
        if batch_size % (world // tensor_parallel):
            raise ConfigError(
                f"train.batch_size {batch_size} is not divisible by the {world // tensor_parallel} data-parallel "
                "groups of processes: each trains on an equal slice of the global batch"
            )
        return
    if world % expert_parallel:
        raise ConfigError(
            f"parallel.expert_parallel {expert_parallel} does not divide the {world} process(es) (the world size): "
            "the experts are split over groups of that many processes"
        )
    if world <= 1:
        return
    if data_parallel == "none":
        raise ConfigError(
            f"running under torchrun with {world} processes, but parallel.data_parallel is none: "
            "set parallel.data_parallel: ddp or fsdp to train data-parallel, or parallel.tensor_parallel to the number "
            "of processes to split the model (or run a single process)"
        )
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size {batch_size} is not divisible by the {world} processes (the world size): "
            "each process trains on an equal slice of the global batch"
        )


@contextlib.contextmanager
def process_group(
    data_parallel: str,
    timeout_s: float,
    batch_size: int,
    device: torch.device,
    expert_parallel: int = 1,
    tensor_parallel: int = 1,
) -> Iterator[bool]:
    """Join torchrun's processes for the length of the block; yields whether the run is data-parallel.

    Alone (no torchrun, or one process) it does nothing and yields False. A bad layout
    (see check_layout) is refused before any process waits for another.
    """
    world = launched_world_size()
    check_layout(data_parallel, batch_size, world, expert_parallel, tensor_parallel)
    if data_parallel == "none" and tensor_parallel == 1 or world <= 1:
        yield False
        return
    if not dist.is_available():
        raise ConfigError(f"parallel.data_parallel: {data_parallel} needs torch.distributed, which this PyTorch lacks")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif device.type != "cpu":
        raise ConfigError(f"parallel.data_parallel: {data_parallel} runs on cpu or cuda devices, not {device.type}")
    with joined(device.type, timeout_s, "parallel.timeout_s"):
        yield True


@contextlib.contextmanager
def joined(device_type: str, timeout_s: float, setting: str) -> Iterator[None]:
    """The default process group (NCCL for cuda, else gloo) for the block, left at the end whatever happens;
    a failure of its collectives is a DistributedError that names `setting`, the option that set timeout_s."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        raise DistributedError(
            f"rank {rank()}: the process group failed ({first_line(err)}): another process crashed, hangs or quit "
            f"(collectives wait {setting}={timeout_s:g} s); its own error says why"
        ) from err
    finally:
        dist.destroy_process_group()


def is_collective_failure(err: RuntimeError) -> bool:
    """Whether an error is the communication backend's (a peer that closed its connection, a timeout)."""
    return isinstance(err, dist.DistError) or any(marker in str(err) for marker in ("gloo", "NCCL", "ProcessGroup"))


def first_line(err: Exception) -> str:
    """An error's first line without the source path the backends prefix it with."""
    return str(err).splitlines()[0].split("] ", 1)[-1].strip()


def check_same_config(config: dict[str, Any]) -> None:
    """Raise DistributedError on every process unless all were given the same run config (flattened, compared
    field by field with rank 0's): processes that train different runs would silently average them."""
    if not initialized():
        return
    configs: list[Any] = [None] * world_size()
    dist.all_gather_object(configs, flatten(config))
    for other, theirs in enumerate(configs[1:], 1):
        differ = sorted(key for key in configs[0].keys() | theirs.keys() if configs[0].get(key) != theirs.get(key))
        if differ:
            key = differ[0]
            raise DistributedError(
                f"the processes were given different run configs: {key} is {theirs.get(key)!r} on rank {other} "
                f"and {configs[0].get(key)!r} on rank 0 ({len(differ)} field(s) differ): give every process the same"
            )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"section.field": value}."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        flat |= flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return flat


# DDP's switch for no buffer sync in forward: its newer name where this PyTorch has it (it still syncs them
# once at the start, when they are equal anyway), else the older one.
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def data_parallel_model(
    model: torch.nn.Module, device: torch.device, ignore: Iterable[str] = ()
) -> DistributedDataParallel:
    """`model` wrapped in DistributedDataParallel, on this process's GPU if it has one, the parameters named in
    `ignore` left out of its all-reduce (each process's own experts). No buffer sync in forward: the experts'
    biases stay equal by construction, and each process counts its own expert loads until `sum_expert_loads_`
    adds them up."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **NO_BUFFER_SYNC)


def expert_mesh(expert_parallel: int, device: torch.device) -> DeviceMesh:
    """The processes as a (world / ep, ep) mesh: along "ep" the ranks that split the experts between them,
    along "replica" those that hold the same experts."""
    shape = (world_size() // expert_parallel, expert_parallel)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replica", "ep"))


def sum_expert_loads_(model: torch.nn.Module) -> None:
    """The load counts of every balancing router, summed over the processes: the global batch's."""
    sum_across_ranks_(m.load for m in model.modules() if isinstance(m, Router) and m.config.balance_bias_rate > 0)


def quiet(*args: Any, **kwargs: Any) -> None:
    """The log of a process other than rank 0: they all say the same, rank 0 says it once."""


class NoMetrics:
    """The metrics log of a process other than rank 0, which writes nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def barrier() -> None:
    """Wait until every process gets here; nothing outside a process group."""
    if initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others: e.g. preparing data once that all then read."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def reduce_across_ranks(values: list[float], op: Literal["mean", "max"]) -> list[float]:
    """Each value's mean or maximum over the processes (one all-reduce), the same on all; the values alone."""
    if not initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "mean" else dist.ReduceOp.MAX)
    if op == "mean":
        tensor /= dist.get_world_size()
    return tensor.tolist()


def sum_across_ranks_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor, in place, with its sum over the processes (one all-reduce); nothing alone."""
    tensors = list(tensors)
    if not initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def rank_rows(batch_size: int, index: int, count: int) -> slice:
    """The contiguous rows of each global batch of the `index`-th of `count` data-parallel processes (or groups):
    rows [i * B/N, (i + 1) * B/N)."""
    if batch_size % count:
        raise ConfigError(f"train.batch_size {batch_size} is not divisible by the {count} data-parallel processes")
    rows = batch_size // count
    return slice(index * rows, (index + 1) * rows)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for parameters that may be split or sharded (DTensors of any meshes) beside
    whole ones; returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    total = grad_norm(params)
    clip_grads_(params, max_norm, total)
    return float(total)


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The norm of the gradients of `params`, plain tensors or DTensors of any meshes (split by tensor parallelism,
    sharded by FSDP): each DTensor's norm covers all its shards."""
    norms = [torch.nn.utils.get_total_norm([p.grad for p in kind]) for kind in _by_mesh(params)]
    return torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))


def clip_grads_(params: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients of `params`, whose norm is `total`, to a norm of at most max_norm: one mesh's
    DTensors, or the plain tensors, at a time, as PyTorch's fused (foreach) kernels take them."""
    for kind in _by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(kind, max_norm, total)


def _by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    kinds: dict[DeviceMesh | None, list[torch.Tensor]] = {}
    for p in params:
        kinds.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    return list(kinds.values())
