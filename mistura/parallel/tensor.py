"""Tensor parallelism: every layer's heads and hidden channels split over the ranks of a device mesh (Megatron-LM).

    mesh = init_device_mesh("cpu", (world,))               # in each of the `world` processes torchrun starts
    model = load_tensor_parallel("runs/quickstart", mesh)   # or parallelize(model, mesh) on a whole model
    generate(model, prompts, sampling)                       # on every rank: the same tokens, as one process

Legend: B batch, T time, D model width, V vocabulary, n ranks.

Every rank holds the whole residual stream (B, T, D) and computes its share of each layer.
DTensor's parallel styles split the weights and communicate:

| modules (per block unless top-level)                    | style    | a rank holds          | then         |
|---------------------------------------------------------|----------|-----------------------|--------------|
| attn.q_proj, k_proj, v_proj; MLA's q_proj or q_b_proj   | colwise  | n_head / n query and  |              |
| and kv_b_proj                                           |          | n_kv_head / n kv heads|              |
| mlp.gate_proj, up_proj; mlp.shared.gate_proj, up_proj   | colwise  | d_ff / n channels     |              |
| attn.o_proj; mlp.down_proj, mlp.shared.down_proj        | rowwise  | the same columns      | all-reduce   |
| tok_emb                                                 | rowwise  | V / n rows            | all-reduce   |
| lm_head                                                 | colwise  | V / n rows            | all-gather   |
| norms, pos_emb, MLA's q_a_proj, q_a_norm, kv_a_proj,    | none     | all of it             |              |
| kv_a_norm, routers, shared gates, routed experts        |          |                       |              |

Which module splits how is convert.parallel's table, the one the `--model-parallel` folders
are written by, except for routed experts: this rank's tokens are every rank's tokens, so
each rank runs every expert, as one process does (expert parallelism, which sends tokens to
the ranks that hold their experts, is mistura.parallel.expert's).

A column-parallel projection's output stays a plain tensor of whole local heads (B, T, H / n * D),
so the attention modules run unchanged: they read their head count off that width. A
row-parallel projection sums the ranks' partial outputs (B, T, D), its bias added once.
The embedding looks up the rows of its vocabulary slice (zeros elsewhere) and sums over
ranks; the head's logits are gathered whole (B, T, V), so sampling needs nothing more: the
same logits on every rank, and the same seed, give the same token.

Training runs through the same split (parallel.tensor_parallel): DTensor's styles sum the
gradients of a replicated input where it enters a split projection, so the replicated weights
get the same whole gradients on every rank; the one exception, MLA's rotary key, which every
head reads but no split projection, has its gradient summed by a hook. The clipping norm
(mistura.parallel.distributed.clip_grad_norm_) spans split and replicated parameters together.

Caches: a rank's KVCache holds its n_kv_head / n heads; MLA's LatentCache (the latent and
the rotary key, which all heads share) is whole on every rank.

Tied embeddings stay tied: the embedding and the head split the same table by its rows.
Collaborative-experts ("moc") layers are refused, as by convert.parallel.

Loading a `--model-parallel n` folder on n ranks (`load_tensor_parallel`): each rank builds
the model on the meta device, splits it, and fills it from its own file alone. The file's
slices are the DTensor shards as they are; a row-parallel bias, whole on rank 0 and zeros on
the others, is a Partial sum that one all-reduce makes whole on every rank; the file's
slices of the routed experts are gathered whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from mistura.config import ModelConfig
from mistura.convert.parallel import (
    COLUMN_PARALLEL,
    ROW_PARALLEL,
    block_role,
    check_no_collaborative_experts,
    check_world_size,
    is_model_parallel,
    model_parallel_size,
    placement,
    read_rank,
)
from mistura.errors import ConfigError
from mistura.loading import load, locate
from mistura.model import Transformer
from mistura.model.mla import MultiHeadLatentAttention
from mistura.model.moe import Router
from mistura.model.rope import RotaryEmbedding


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Split `model` in place over the ranks of a 1-D mesh, each keeping its own slices; returns it.

    Every rank must hold the same weights (as loading the same checkpoint gives).
    """
    if mesh.ndim != 1:
        raise ConfigError(f"tensor parallelism runs on a 1-D device mesh, got {mesh.ndim} dimensions")
    check_tensor_parallel(model.config, mesh.size())
    parallelize_module(model, mesh, tensor_parallel_plan(model), src_data_rank=None)
    _tie_head(model)
    model.tensor_parallel = mesh.size()  # its caches hold this rank's heads
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.kv_a_proj.register_forward_hook(_SumRopeKeyGradients(module.rank, mesh.get_group()))
    return model


class _SumRopeKeyGradients:
    """A forward hook on MLA's kv_a_proj, whose output is [latent, rotary key]: in training, the rotary key's
    gradient summed over the ranks.

    Every head attends with the one rotary key, which no split projection reads, so each rank's backward
    gives it the gradient of its own heads alone; the sum over ranks is the key's gradient (Megatron's
    "copy to the tensor-parallel region"). The latent needs nothing: kv_b_proj, column-parallel, sums its
    gradient already.
    """

    def __init__(self, latent_width: int, group: dist.ProcessGroup):
        self.latent_width, self.group = latent_width, group

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return output
        latent, rope_key = output.split([self.latent_width, output.shape[-1] - self.latent_width], dim=-1)
        return torch.cat([latent, _SumGradients.apply(rope_key, self.group)], dim=-1)


class _SumGradients(torch.autograd.Function):
    """The identity, whose backward sums the gradient over a group's ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def check_tensor_parallel(config: ModelConfig, n: int) -> None:
    """ConfigError unless n ranks can split the model: head counts, vocabulary, dense and shared-expert widths."""
    check_no_collaborative_experts(config)
    check_world_size(config, n, experts=False)


def tensor_parallel_plan(model: Transformer) -> dict[str, ParallelStyle]:
    """The parallel style of every split module of `model`, by its name (see the module docstring)."""
    plan: dict[str, ParallelStyle] = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate()),  # token ids, the same on every rank
        "lm_head": ColwiseParallel(output_layouts=Replicate()),  # the logits, gathered whole
    }
    for name, _ in model.named_modules():
        role = block_role(name)
        if role in COLUMN_PARALLEL:
            plan[name] = ColwiseParallel()
        elif role in ROW_PARALLEL:
            plan[name] = RowwiseParallel()
    return plan


def _tie_head(model: Transformer) -> None:
    """A tied head shares the embedding's table again: both split it by vocabulary rows, Shard(0)."""
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def load_tensor_parallel(path: str | Path, mesh: DeviceMesh, dtype: torch.dtype | None = None) -> Transformer:
    """This rank's part of a model folder, split over `mesh`, in eval mode (and in `dtype` if given).

    A model-parallel folder (`mistura convert --model-parallel n`) split for as many ranks
    as the mesh has: each rank reads its own file alone. Any other folder `mistura.load`
    reads (or a model-parallel one for another count of ranks): each rank loads it whole,
    then keeps its slices. Tensors go to the mesh's device type (for CUDA, the current device).
    """
    directory = locate(path)
    if is_model_parallel(directory) and model_parallel_size(directory) == mesh.size():
        model = _load_rank(directory, mesh, dtype)
    else:
        model = parallelize(load(directory, mesh.device_type, dtype), mesh)
    return model.eval()


@torch.no_grad()
def _load_rank(directory: Path, mesh: DeviceMesh, dtype: torch.dtype | None) -> Transformer:
    """This rank's model from its own file of a model-parallel folder: built empty, split, then filled."""
    config, tensors = read_rank(directory, mesh.get_local_rank())
    with torch.device("meta"):  # allocates nothing and runs no init
        model = Transformer(config)
    parallelize(model, mesh)
    state = {
        name: _as_placed(_stored(tensors, name, config).to(mesh.device_type, dtype or target.dtype), name, target, mesh)
        for name, target in model.state_dict().items()
    }
    model.load_state_dict(state, assign=True)
    _tie_head(model)
    _restore_buffers(model, mesh.device_type)
    return model.to(dtype=dtype)


def _stored(tensors: dict[str, torch.Tensor], name: str, config: ModelConfig) -> torch.Tensor:
    """A rank file's tensor for state-dict name `name`: a tied head is stored as the embedding."""
    return tensors["tok_emb.weight" if config.tie_embeddings and name == "lm_head.weight" else name]


def _as_placed(part: torch.Tensor, name: str, target: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """A rank file's part of tensor `name` as the split model holds it (`target`, on the meta device).

    The file's placement, in DTensor's terms: split (Shard), whole (Replicate), or a row-parallel
    bias whole on rank 0 and zeros on the others, which sum to it (Partial). Redistributing
    turns it into the model's: a bias's Partial into Replicate (an all-reduce), and the file's
    expert slices into the whole experts every rank runs (an all-gather).
    """
    stored = DTensor.from_local(part, mesh, [_file_placement(name)], run_check=False)
    return stored.redistribute(mesh, target.placements) if isinstance(target, DTensor) else stored.full_tensor()


def _file_placement(name: str) -> Placement:
    """Where the rank files put tensor `name` (convert.parallel's placement), as a DTensor placement."""
    where = placement(name)
    if where.rank0:
        return Partial()
    return Replicate() if where.dim is None else Shard(where.dim)


def _restore_buffers(model: Transformer, device: str) -> None:
    """The buffers no file holds, which the meta device left without values: rotary tables, routers' load counts."""
    config = model.config
    if model.rope is not None:
        model.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.yarn).to(device)
    for module in model.modules():
        if isinstance(module, Router):
            module.load = torch.zeros_like(module.expert_bias)
    empty = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if empty:
        raise RuntimeError(f"tensor parallelism: no values for the buffers {', '.join(empty)}")
