"""Fully sharded data parallelism (ZeRO-3) with FSDP2's `fully_shard` (parallel.data_parallel: fsdp).

Each of the N processes keeps 1/N of every parameter (its rows of dim 0, a DTensor shard), and
so 1/N of the gradients and of the optimizer's moments. Each block is its own FSDP unit: its
parameters are all-gathered just before its forward (and again before its backward), freed
after, and its gradients reduce-scattered back to their shards; the root unit holds the
embeddings, the final norm and the head (a tied head shares the embedding's shard). At most one
block's full parameters thus live at a time beside the shards.

Mixed precision (parallel.mixed_precision: bf16) gathers bf16 copies of the fp32 shards for the
forward and backward, and reduces the gradients in fp32 onto the fp32 shards the optimizer
updates. CPU offload (parallel.cpu_offload) keeps the shards, their gradients and the optimizer
state in CPU memory, moving each unit's shards to the device for its gather.
"""

from __future__ import annotations

import torch
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from mistura.model import Transformer
from mistura.parallel.expert import ExpertParallelMoE


def shard_model(
    model: Transformer,
    mixed_precision: str = "none",
    cpu_offload: bool = False,
    mesh: DeviceMesh | None = None,
    expert_mesh: DeviceMesh | None = None,
) -> Transformer:
    """Shard `model` in place over `mesh` (all the processes when None): one FSDP unit per block, then the root.

    A tensor-parallel model is sharded over the data-parallel dimension of its mesh: each process's
    tensor-parallel slices split further over the processes that hold the same slices. With experts split
    over the "ep" dimension of `expert_mesh` (mistura.parallel.expert), each layer's own experts are a unit
    of their own, sharded over its "replica" dimension, the processes that hold the same experts (their
    gradients averaged over those; see expert.average_expert_grads_ for the rest).
    """
    precision = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in model.modules() if expert_mesh is not None else ():
        if isinstance(layer, ExpertParallelMoE):
            fully_shard(layer.experts, mesh=expert_mesh["replica"], mp_policy=precision, offload_policy=offload)
    for module in (*model.blocks, model):
        fully_shard(module, mesh=mesh, mp_policy=precision, offload_policy=offload)
    return model


def replicate_model(model: Transformer, mesh: DeviceMesh, ignore: set[torch.nn.Parameter]) -> Transformer:
    """Replicate the tensor-parallel `model` in place over `mesh`, the data-parallel dimension of its (dp, tp) mesh:
    DDP on FSDP2's machinery (`replicate`), whose gradients are all-reduced over the processes that hold the same
    slices after each block's backward, but for the parameters in `ignore` (each process's own experts).
    DistributedDataParallel itself does not take DTensor parameters."""
    for module in (*model.blocks, model):
        replicate(module, mesh=mesh, ignored_params=ignore)
    return model


def reshard(module: torch.nn.Module) -> None:
    """Free the whole parameters a forward without backward (evaluation) leaves gathered in the root unit, so
    the module holds its shards again, the tensors its optimizer updates; nothing for a plain module."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
