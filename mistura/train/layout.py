"""How a training run lays its model out over the processes torchrun starts: the run's parallel section made
device meshes, and what follows from them (see mistura.train.config.ParallelConfig and mistura.parallel).

- experts split over ep processes: a (world / ep, ep) mesh (mistura.parallel.distributed.expert_mesh);
- layers split over tp processes: a (world / (ep * tp), ep, tp) mesh, whose "tp" dimension splits the layers
  (mistura.parallel.tensor), whose ("replica", "ep") dimensions split the experts, if ep > 1, as above, and
  whose ("replica", "ep") dimensions flattened, "dp", FSDP shards each part over, or DDP replicates it over;
- FSDP alone shards every parameter over all the processes (mistura.parallel.fsdp).

A single process is the layout with no mesh at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.optim.swa_utils import get_ema_avg_fn, get_ema_multi_avg_fn

from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.parallel import distributed, expert, fsdp, tensor
from mistura.train.config import ParallelConfig


@dataclass
class Layout:
    parallel: ParallelConfig  # the default section (nothing split) for a single process
    several: bool  # whether the run is on several processes
    expert_mesh: DeviceMesh | None = None
    tensor_mesh: DeviceMesh | None = None
    data_mesh: DeviceMesh | None = None  # beside tensor parallelism, the dimension FSDP shards over

    @classmethod
    def of(cls, parallel: ParallelConfig | None, device: torch.device) -> Layout:
        """The layout of a run on the processes of the default process group (`parallel`), or alone (None)."""
        if parallel is None:
            return cls(ParallelConfig(), several=False)
        if parallel.data_parallel == "fsdp" and parallel.cpu_offload and device.type == "cpu":
            raise ConfigError(
                "parallel.cpu_offload keeps the shards in CPU memory while a GPU computes: this run trains on the CPU, "
                "where they are already"
            )
        ep, tp = parallel.expert_parallel, parallel.tensor_parallel
        layout = cls(parallel, several=True)
        if tp == 1:
            layout.expert_mesh = distributed.expert_mesh(ep, device) if ep > 1 else None
            return layout
        # processes [i * tp, (i + 1) * tp) split the layers; across those groups, ep at a time split the experts,
        # and FSDP shards (DDP replicates) the layers' parts
        shape = (distributed.world_size() // (ep * tp), ep, tp)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replica", "ep", "tp"))
        layout.tensor_mesh, layout.data_mesh = mesh["tp"], mesh["replica", "ep"]._flatten("dp")
        layout.expert_mesh = mesh["replica", "ep"] if ep > 1 else None
        return layout

    @property
    def sharded(self) -> bool:
        """Whether FSDP shards the parameters."""
        return self.parallel.data_parallel == "fsdp" and self.several

    @property
    def replicated(self) -> bool:
        """Whether DDP beside tensor parallelism replicates each layer's slices over the "dp" dimension, where their
        gradients are all-reduced."""
        return self.tensor_mesh is not None and self.parallel.data_parallel == "ddp"

    @property
    def splits_weights(self) -> bool:
        """Whether each process holds only part of the weights (FSDP, expert or tensor parallelism), and so saves
        distributed checkpoints."""
        return self.sharded or self.expert_mesh is not None or self.tensor_mesh is not None

    def split_(self, model: Transformer) -> None:
        """Split `model` in place: the experts across processes, every layer, every parameter into shards (or,
        DDP beside tensor parallelism, each layer's slices replicated)."""
        parallel = self.parallel
        if self.expert_mesh is not None:
            expert.shard_experts_(model, parallel.expert_parallel, self.expert_mesh["ep"].get_group())
        if self.tensor_mesh is not None:
            tensor.parallelize(model, self.tensor_mesh)
        if self.sharded:
            meshes = (self.data_mesh, self.expert_mesh)  # tensor- or expert-parallel, the shards' and the experts'
            fsdp.shard_model(model, parallel.mixed_precision, parallel.cpu_offload, *meshes)
        elif self.replicated:  # the experts' gradients are averaged apart (expert.average_expert_grads_)
            fsdp.replicate_model(model, self.data_mesh, set(expert.expert_parameters(model).values()))

    def batch_rows(self, batch_size: int) -> slice:
        """The rows of each global batch this process trains on: its own when data-parallel, its tensor-parallel
        group's beside FSDP, all of them alone or split over all processes by tensor parallelism."""
        if not self.several:
            return slice(None)
        if self.data_mesh is not None:
            return distributed.rank_rows(batch_size, self.data_mesh.get_local_rank(), self.data_mesh.size())
        return distributed.rank_rows(batch_size, distributed.rank(), distributed.world_size())

    def ema_update(self, decay: float) -> dict[str, Callable]:
        """AveragedModel's update for an EMA: fused over all parameters at once, or one parameter at a time where
        split (DTensor) and whole ones mix, which PyTorch's fused (foreach) kernels do not take together."""
        if self.tensor_mesh is not None:
            return {"avg_fn": get_ema_avg_fn(decay)}
        return {"multi_avg_fn": get_ema_multi_avg_fn(decay)}
