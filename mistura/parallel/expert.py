"""Expert parallelism: each rank of a process group holds E / ep whole routed experts, and tokens travel to them.

    model = shard_experts_(model, ep=dist.get_world_size())   # every MoELayer, in place
    comm_bytes(model)                                         # payload bytes this rank sent, forward and backward

Legend: A kept assignments of this rank's tokens, sorted by expert, D model width, E experts,
ep ranks in the group, R rows that arrive at this rank.

Expert parallelism runs along the data-parallel dimension (as in DeepSeek-V3 and torchtitan):
every rank has its own tokens, the router, shared experts and shared gate are replicated, and
rank r holds the routed experts [r * E / ep, (r + 1) * E / ep). A layer routes its tokens and
applies capacity on its own rank, exactly as `MoELayer` does, then replaces only the step that
runs the experts (`_run_experts`):

1. the rows per (destination rank, local expert) go first, in one fixed-size all_to_all;
2. the rows themselves, already grouped by destination since they are sorted by expert, go in
   a variable-size all_to_all; they arrive grouped by source rank, then expert, and a stable
   sort by local expert makes each expert's rows contiguous for the grouped matmul;
3. the outputs, put back in arrival order, return by the reverse all_to_all, and the source
   scales them by their gate weights, which never travel; `MoELayer` adds them to their tokens.

So each rank's output is the unsplit layer's output on that rank's tokens, up to float rounding.
The payload all_to_alls are differentiable (their backward is the reverse exchange), so every
rank must run the backward of every layer, as every collective in DDP does. Gradients, when each
rank backpropagates a loss of its own outputs:
- the input, the router, the shared experts and the shared gate get the gradient of the rank's own
  loss, as the unsplit layer on the rank's tokens would (replicated parameters then need DDP's
  all-reduce, as usual);
- a rank's routed experts get the gradient of the sum of all ranks' losses: their slice of the
  unsplit layer's gradients summed over the ranks' batches. DDP averages the replicated
  gradients over ranks, so a trainer that follows the mean of the ranks' losses divides the
  experts' by ep, and keeps them out of DDP's all-reduce: each rank's are different experts.

The auxiliary losses and stats (balance, z, sequence and entropy losses, dropped fraction) are the
rank's own, computed from its tokens as the unsplit layer computes them. `MoEAux.load` is global:
the per-expert assignments of all ranks' tokens, summed over the group. The router's own load
buffer for aux-loss-free balancing counts the rank's tokens, to be summed before `balance_step` as
under DDP (`mistura.parallel.distributed.sum_expert_loads_`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from mistura.errors import ConfigError
from mistura.model.moe import CollaborativeExperts, GroupedExperts, MoEAux, MoELayer
from mistura.parallel.distributed import clip_grads_, grad_norm


def shard_experts_(model: nn.Module, ep: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every MoELayer of `model` expert-parallel over `group` (the default group when None) of ep ranks,
    in place; returns the model, or, for a MoELayer given alone, its expert-parallel replacement.

    Call it on the full model, loaded or initialised the same on every rank, before quantising, adding
    LoRA or wrapping in DDP. ep 1 leaves the model as it is.
    """
    if ep < 1:
        raise ConfigError(f"expert parallelism: ep must be >= 1, got {ep}")
    if ep == 1:
        return model
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (MoELayer, CollaborativeExperts))]
    for name, layer in layers:
        _check_layer(name or "the layer", layer, ep)
    group = _check_group(ep, group)
    for name, layer in layers:
        sharded = ExpertParallelMoE(layer, group)
        if not name:
            return sharded
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, sharded)
    return model


def _check_layer(name: str, layer: nn.Module, ep: int) -> None:
    if isinstance(layer, CollaborativeExperts):
        raise ConfigError(
            f"expert parallelism: {name} is a collaborative-experts (moc) layer, where every token runs all "
            "experts and attends over their answers, so its experts cannot be split across ranks"
        )
    if layer.config.n_experts % ep:
        raise ConfigError(
            f"expert parallelism: {name} has {layer.config.n_experts} routed experts, not divisible by ep={ep}: "
            "every rank holds the same number of whole experts"
        )
    if type(layer.experts) is not GroupedExperts:
        raise ConfigError(
            f"expert parallelism: {name}'s experts are {type(layer.experts).__name__}, not plain GroupedExperts: "
            "shard the experts before quantising them or adding LoRA"
        )


def _check_group(ep: int, group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The group to split over: `group`, or the default one, which must exist and have ep ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"expert parallelism over ep={ep} ranks needs a torch.distributed process group: "
            "run under torchrun, with the process group initialised"
        )
    group = dist.group.WORLD if group is None else group
    if dist.get_world_size(group) != ep:
        raise ConfigError(f"expert parallelism: ep={ep}, but the process group has {dist.get_world_size(group)} ranks")
    return group


class ExpertParallelMoE(MoELayer):
    """A MoELayer whose routed experts are split across the ranks of `group`; it takes over `layer`'s modules and
    cuts its experts down to this rank's slice."""

    def __init__(self, layer: MoELayer, group: dist.ProcessGroup):
        nn.Module.__init__(self)  # not MoELayer.__init__, which allocates every expert
        self.config = layer.config
        self.group, self.ep, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.router, self.shared, self.shared_gate = layer.router, layer.shared, layer.shared_gate
        self.experts = _keep_slice(layer.experts, self.rank, self.ep)
        self.comm = CommBytes()
        self.train(layer.training)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:  # x (B, T, D)
        y, aux = super().forward(x)
        load = aux.load.clone()  # (E,)
        dist.all_reduce(load, group=self.group)
        return y, dataclasses.replace(aux, load=load)

    def _run_experts(self, rows: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows (A, D) sorted by expert, counts (E,) -> each row's expert output times its weight (A, 1),
        the experts run on the ranks that hold them."""
        send = counts.view(self.ep, -1)  # (ep, E / ep): rows for each rank's experts
        receive = torch.empty_like(send)
        dist.all_to_all_single(receive, send, group=self.group)  # (ep, E / ep): each rank's rows for mine
        splits = Splits(*torch.stack((send.sum(1), receive.sum(1))).tolist())
        arrived = _AllToAll.apply(rows, splits, self.group, self.comm)  # (R, D) by source rank, then expert
        order = _by_expert(receive, sum(splits.receive))  # (R,)
        out = self.experts(arrived.index_select(0, order), receive.sum(0))  # (R, D) by expert
        back = out.index_select(0, order.argsort())  # (R, D) in arrival order
        return _AllToAll.apply(back, splits.reversed(), self.group, self.comm) * weights  # (A, D)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, ep={self.ep}"


@dataclass
class Splits:
    """Rows this rank sends to, and receives from, each rank of the group."""

    send: list[int]
    receive: list[int]

    def reversed(self) -> Splits:
        return Splits(self.receive, self.send)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows (n, D) whose backward sends the gradients back the way the rows came;
    counts the bytes each direction sends to other ranks."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, splits: Splits, group: dist.ProcessGroup, tally: CommBytes) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.tally = splits, group, tally
        out, sent = _exchange(rows, splits, group)
        tally.forward += sent
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out, sent = _exchange(grad.contiguous(), ctx.splits.reversed(), ctx.group)
        ctx.tally.backward += sent
        return out, None, None, None


def _exchange(rows: torch.Tensor, splits: Splits, group: dist.ProcessGroup) -> tuple[torch.Tensor, int]:
    """rows (sum(send), D) -> the rows the ranks send here (sum(receive), D), and the bytes sent to other ranks."""
    out = rows.new_empty(sum(splits.receive), *rows.shape[1:])
    dist.all_to_all_single(out, rows, splits.receive, splits.send, group=group)
    remote = sum(splits.send) - splits.send[dist.get_rank(group)]
    return out, remote * math.prod(rows.shape[1:]) * rows.element_size()


def _by_expert(receive: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The order (R,) that groups rows arrived by (source rank, local expert) by local expert, sources in
    rank order; receive (ep, E / ep) holds the row counts."""
    ep, local = receive.shape
    expert = torch.arange(local, device=receive.device).repeat(ep)  # (ep * E / ep,)
    return expert.repeat_interleave(receive.flatten(), output_size=n_rows).argsort(stable=True)


def _keep_slice(experts: GroupedExperts, rank: int, ep: int) -> GroupedExperts:
    """`experts` holding only rank's E / ep experts (new, smaller Parameters, so the others' memory is freed)."""
    n = experts.gate_proj.shape[0] // ep
    for name, param in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(param.detach()[rank * n : (rank + 1) * n].clone()))
    return experts


@dataclass
class CommBytes:
    """Payload bytes a rank's all_to_alls sent to other ranks since the last reset. Rows a rank keeps for its
    own experts never leave it and are not counted, nor is the small exchange of row counts. The combine
    mirrors the dispatch, so a rank receives in a forward (or backward) as many bytes as it sends."""

    forward: int = 0  # dispatch + combine: rows to other ranks' experts and the outputs of theirs, times D * itemsize
    backward: int = 0  # the same exchanges' gradients, in reverse

    def __add__(self, other: CommBytes) -> CommBytes:
        return CommBytes(self.forward + other.forward, self.backward + other.backward)


def comm_bytes(model: nn.Module) -> CommBytes:
    """The payload bytes this rank's expert-parallel layers sent to other ranks since the last reset."""
    return sum((m.comm for m in model.modules() if isinstance(m, ExpertParallelMoE)), CommBytes())


def reset_comm_bytes(model: nn.Module) -> None:
    """Zero the counters in place (a backward still to run counts into them)."""
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE):
            m.comm.forward = m.comm.backward = 0


# Training with experts split over the `ep` dimension of a (replica, ep) mesh, beside data parallelism: every
# process trains on its own rows, the `replica` dimension groups the processes that hold the same experts.
SPLIT = (Replicate(), Shard(0))  # an expert stack's placement on that mesh


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The routed experts' parameters of every expert-parallel layer, by their names in `model`."""
    return {
        f"{name}.experts.{key}": param
        for name, layer in model.named_modules()
        if isinstance(layer, ExpertParallelMoE)
        for key, param in layer.experts.named_parameters()
    }


@torch.no_grad()
def average_expert_grads_(model: nn.Module, mesh: DeviceMesh, sharded: bool = False) -> None:
    """Make the experts' gradients those of the mean loss over every process, as the others' are: the
    all_to_all's backward summed the ep group's losses into them; add the replicas' and divide by the world
    size. Sharded by FSDP, whose reduce-scatter has averaged them over the replicas, divide by ep."""
    grads = [p.grad for p in expert_parameters(model).values() if p.grad is not None]
    if sharded:
        torch._foreach_div_(grads, mesh["ep"].size())
        return
    if mesh["replica"].size() > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=mesh["replica"].get_group())
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])
    torch._foreach_div_(grads, mesh.size())


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: DeviceMesh) -> float:
    """Scale every gradient so that the norm of the whole model's gradient is at most max_norm; returns that
    norm before clipping: the other parameters' (equal everywhere, or sharded by FSDP), and the ep group's
    experts' summed."""
    experts = set(expert_parameters(model).values())
    params = [p for p in model.parameters() if p.grad is not None]
    shared = grad_norm([p for p in params if p not in experts])
    own = grad_norm([p for p in params if p in experts]).pow(2)
    dist.all_reduce(own, group=mesh["ep"].get_group())
    total = (shared.pow(2) + own).sqrt()
    clip_grads_(params, max_norm, total)
    return float(total)


def as_global_(state: dict[str, Any], model: nn.Module, mesh: DeviceMesh) -> None:
    """Give the experts' entries of a state dict (weights by name, or an optimizer's state by parameter name)
    their global shape, in place: DTensors over `mesh`, split by expert across ep and equal across replicas,
    that share this rank's tensors; so a distributed checkpoint stores every expert once, at its place."""
    for name, param in expert_parameters(model).items():
        if name in state:  # the weight, or its moments; not an optimizer's step count
            shape = param.shape
            state[name] = _apply(state[name], lambda t, shape=shape: _split(t, mesh) if t.shape == shape else t)


def _split(tensor: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """This rank's slice of experts as the whole stack's DTensor: sharing its tensor, or, sharded by FSDP over the
    replicas, gathered whole first."""
    local = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return DTensor.from_local(local, mesh, SPLIT, run_check=False)


def as_local_(state: dict[str, Any], model: nn.Module) -> None:
    """Undo `as_global_`: this rank's experts' tensors again, sharded over the replicas as the model's are, in place."""
    for name, param in expert_parameters(model).items():
        if name in state:
            state[name] = _apply(state[name], lambda t, param=param: _local(t, param))


def _local(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """An entry of `as_global_`'s as `param` holds it: its slice of experts, or that slice's FSDP shard."""
    if not isinstance(tensor, DTensor):
        return tensor
    if isinstance(param, DTensor):
        return distribute_tensor(tensor.to_local(), param.device_mesh, param.placements, src_data_rank=None)
    return tensor.to_local()


def _apply(entry: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """fn applied to a tensor, or to each tensor of a (nested) dict of them."""
    if isinstance(entry, dict):
        return {key: _apply(value, fn) for key, value in entry.items()}
    return fn(entry) if torch.is_tensor(entry) else entry
