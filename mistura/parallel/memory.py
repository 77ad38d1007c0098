"""Per-GPU memory and communication of a parallel training layout, on paper (`mistura plan --memory`).

Layout (torchtitan, DeepSeek-V3): G GPUs = dp x tp.
- tp, Megatron tensor parallelism, splits the tensors `mistura.convert.parallel` splits: attention
  projections by whole heads (GQA q/k/v and MLA's q/q_b and kv_b column-wise, o row-wise), the
  dense and shared-expert MLP matrices, and the embedding and lm_head by vocabulary. Norms,
  routers, MLA's down projections (q_a, kv_a), row-parallel biases and learned positions are
  replicated.
- ep, expert parallelism, divides dp and n_experts: each of ep ranks holds n_experts / ep whole
  routed experts (no tensor parallelism inside experts).
- data parallel: ddp replicates what a tp/ep rank holds; fsdp (ZeRO-3, FSDP2 fully_shard) shards
  parameters, gradients and optimizer state over the dp ranks, the routed experts over the
  dp / ep ranks that hold the same experts.

Parameters per GPU, with P_rep, P_tp (tp-split, embeddings included) and P_exp counted by walking
a model built on the meta device:

    ddp:   P_rep + P_tp / tp + P_exp / ep
    fsdp:  (P_rep + P_tp / tp) / dp + (P_exp / ep) / (dp / ep)

Bytes per parameter, w = 2 (bf16) or 4 (fp32): parameters w, gradients w, AdamW 8 (two fp32
moments) + 4 for the fp32 master copy in bf16: the ZeRO paper's 2 + 2 + 12 in mixed precision.
FSDP's transient buffers (a layer's gathered parameters and unsharded gradients) are left out.

Activations of one micro-batch of B sequences of S tokens (Korthikanti et al. 2022, section 4:
s b h (10 + 24 / t) bytes per layer in 16 bits with tensor parallelism and without the attention
scores, which SDPA's fused kernels do not keep), with its widths made the model's own:

    layer:   B S (10 h + 2 (W_attn + m F) / t + 2 K (h + 3 F_e))   bytes in 16 bits, x 2 in fp32
    10 h     the paper's unsplit part: attention and MLP inputs, the norms' inputs, dropout masks
    W_attn   q + k + v + o-input widths (4 h for multi-head attention)
    F, m     dense layers: d_ff with m = 2 values per channel (GELU: its input and output) or
             3 (SwiGLU: gate, up, their product); MoE layers: d_shared with m = 3
    K, F_e   routed experts, not split by tp, each keeping its token's gathered input (h) and
             3 d_expert: MoE layers K = top_k (activations scale with top_k; ep moves them
             between ranks but a rank still processes B S top_k on average), "moc" layers
             K = n_experts (every token runs all experts); dense layers K = 0
    logits   B S vocab_size / tp x 4 bytes (fp32 for the loss)

A dense GELU layer with d_ff = 4 h and multi-head attention gives the paper's 34 s b h at t = 1.
With activation checkpointing a layer keeps only its input, 2 B S h bytes (16 bits), plus one
layer's full activations while it is recomputed.

Communication per GPU, in bytes sent by ring algorithms:

    dp, per optimizer step (gradients reduced once a step; with gradient accumulation fsdp's
        all-gathers repeat every micro-batch), w bytes per value:
        ddp:  2 (n - 1) / n x gradient bytes of a shard           all-reduce
        fsdp: 3 (n - 1) / n x parameter bytes of a shard          all-gather forward and backward,
                                                                  reduce-scatter of gradients
        summed over the tp rank's shard (n = dp) and its experts (n = dp / ep)
    tp, per micro-batch: 4 n_layer x 2 (t - 1) / t x B S h w      2 all-reduces forward, 2 backward
    ep, per micro-batch: 4 n_moe x (e - 1) / e x B S top_k h w    all-to-all dispatch and combine,
                                                                  forward and backward
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Literal

import torch

from mistura.config import ModelConfig
from mistura.convert.parallel import COLUMN_PARALLEL, EXPERT_PARALLEL, ROW_PARALLEL, VOCAB_PARALLEL
from mistura.errors import ConfigError
from mistura.model import Transformer

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
ADAM_MOMENT_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # fp32 master copy of 16-bit parameters
LOGIT_BYTES = 4  # the loss reads fp32 logits
GIB, MIB = 2**30, 2**20


@dataclass(frozen=True)
class Layout:
    """gpus = dp x tp; routed experts over ep of the dp ranks; one micro-batch of micro_batch x seq_len tokens."""

    gpus: int
    seq_len: int
    tp: int = 1
    ep: int = 1
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    dtype: Literal["bf16", "fp32"] = "bf16"
    micro_batch: int = 1
    activation_checkpointing: bool = False

    @property
    def dp(self) -> int:
        return self.gpus // self.tp


@dataclass(frozen=True)
class ParameterCounts:
    """A model's parameters by how a layout places them; a tied lm_head counts once."""

    experts: int  # routed experts' stacked weights: split by ep
    vocab: int  # token embedding and lm_head: split by tp along the vocabulary
    split: int  # attention projections, dense and shared MLP matrices: split by tp
    replicated: int  # norms, routers, MLA's down projections, row-parallel biases, learned positions

    @property
    def total(self) -> int:
        return self.experts + self.vocab + self.split + self.replicated


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU: memory held, and communication sent."""

    counts: ParameterCounts
    parameters: float
    gradients: float
    optimizer: float
    activations: float  # one micro-batch
    data_parallel: float  # per optimizer step
    tensor_parallel: float  # per micro-batch
    expert_parallel: float  # per micro-batch

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations


def count_parameters(config: ModelConfig) -> ParameterCounts:
    """The parameters of `Transformer(config)` by category, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    counts = {field.name: 0 for field in fields(ParameterCounts)}
    for name, parameter in model.named_parameters():  # a tied lm_head is yielded once, as tok_emb
        counts[category(name)] += parameter.numel()
    return ParameterCounts(**counts)


def category(name: str) -> str:
    """The ParameterCounts field of a parameter, by its name in the model."""
    module, _, kind = re.sub(r"^blocks\.\d+\.", "", name).rpartition(".")
    if module in EXPERT_PARALLEL:
        return "experts"
    if module in VOCAB_PARALLEL:
        return "vocab"
    if module in COLUMN_PARALLEL or (module in ROW_PARALLEL and kind == "weight"):
        return "split"
    return "replicated"


def memory_plan(config: ModelConfig, layout: Layout) -> MemoryPlan:
    """Per-GPU memory and communication of training `config` in `layout` (see the module docstring)."""
    check_layout(config, layout)
    counts = count_parameters(config)
    w = DTYPE_BYTES[layout.dtype]
    # A tp rank's parameters and its experts, each with the number of dp ranks that hold a copy.
    shards = [
        (counts.replicated + (counts.split + counts.vocab) / layout.tp, layout.dp),
        (counts.experts / layout.ep, layout.dp // layout.ep),
    ]
    fsdp = layout.data_parallel == "fsdp"
    params = sum(n / ranks if fsdp else n for n, ranks in shards)
    optimizer_bytes = ADAM_MOMENT_BYTES + (MASTER_BYTES if w == 2 else 0)
    rounds = 3 if fsdp else 2
    tokens_h = layout.micro_batch * layout.seq_len * config.d_model * w
    t, e = layout.tp, layout.ep
    n_moe = config.layer_mlp.count("moe")
    return MemoryPlan(
        counts=counts,
        parameters=params * w,
        gradients=params * w,
        optimizer=params * optimizer_bytes,
        activations=activation_bytes(config, layout),
        data_parallel=sum(rounds * (ranks - 1) / ranks * n * w for n, ranks in shards),
        tensor_parallel=4 * config.n_layer * 2 * (t - 1) / t * tokens_h,
        expert_parallel=4 * n_moe * (e - 1) / e * tokens_h * (config.moe.top_k if n_moe else 0),
    )


def activation_bytes(config: ModelConfig, layout: Layout) -> float:
    """Activations one GPU keeps for backward over one micro-batch, logits included."""
    layers = [layer_bytes_per_token(config, kind, layout.tp) for kind in config.layer_mlp]
    if layout.activation_checkpointing:
        kept = 2 * config.d_model * config.n_layer + max(layers)
    else:
        kept = sum(layers)
    logits = LOGIT_BYTES * config.vocab_size / layout.tp
    return layout.micro_batch * layout.seq_len * (kept * DTYPE_BYTES[layout.dtype] / 2 + logits)


def layer_bytes_per_token(config: ModelConfig, kind: str, tp: int) -> float:
    """What one layer of MLP kind `kind` keeps per token, in bytes at 16 bits (Korthikanti et al.)."""
    h = config.d_model
    if kind == "dense":
        split_mlp, routed = (3 if config.mlp == "swiglu" else 2) * config.d_ff, 0
    else:
        moe = config.moe
        experts_per_token = moe.top_k if kind == "moe" else moe.n_experts
        split_mlp, routed = 3 * moe.d_shared, experts_per_token * (h + 3 * moe.d_expert)
    return 2 * (5 * h + (attention_width(config) + split_mlp) / tp + routed)


def attention_width(config: ModelConfig) -> int:
    """Channels per token of the queries, keys, values and the output projection's input."""
    if config.mla is not None:
        return 2 * config.n_head * (config.mla.qk_head_dim + config.mla.v_head_dim)
    return 2 * (config.n_head + config.n_kv_head) * config.head_dim


def check_layout(config: ModelConfig, layout: Layout) -> None:
    """ConfigError, naming the culprit, unless `layout` can train `config`."""
    for name in ("gpus", "tp", "ep", "micro_batch", "seq_len"):
        if getattr(layout, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(layout, name)}")
    if layout.dtype not in DTYPE_BYTES:
        raise ConfigError(f"--dtype: bf16 or fp32, got {layout.dtype!r}")
    if layout.data_parallel not in ("fsdp", "ddp"):
        raise ConfigError(f"--data-parallel: fsdp or ddp, got {layout.data_parallel!r}")
    if layout.seq_len > config.max_seq_len:
        raise ConfigError(f"--seq-len: {layout.seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    if layout.gpus % layout.tp:
        raise ConfigError(f"--tp: {layout.tp} does not divide --gpus={layout.gpus}")
    kinds = set(config.layer_mlp)
    if "moc" in kinds and layout.tp * layout.ep > 1:
        raise ConfigError(
            "--tp / --ep: collaborative-experts ('moc') layers cannot be split: every token runs all experts"
        )
    if layout.ep > 1:
        if "moe" not in kinds:
            raise ConfigError(f"--ep: {layout.ep} expert-parallel ranks need routed experts; {config.name} has none")
        if layout.dp % layout.ep:
            raise ConfigError(f"--ep: {layout.ep} does not divide the data-parallel size dp = gpus / tp = {layout.dp}")
        if config.moe.n_experts % layout.ep:
            raise ConfigError(f"--ep: {layout.ep} does not divide model.moe.n_experts={config.moe.n_experts}")
    widths = {"n_head": config.n_head, "n_kv_head": config.n_kv_head, "vocab_size": config.vocab_size}
    if "dense" in kinds:
        widths["d_ff"] = config.d_ff
    if "moe" in kinds and config.moe.d_shared:
        widths["moe.d_shared"] = config.moe.d_shared
    for field, value in widths.items():
        if value % layout.tp:
            raise ConfigError(f"--tp: {layout.tp} does not divide model.{field}={value}")


def describe(config: ModelConfig, layout: Layout, plan: MemoryPlan) -> str:
    """The plan as a table in GiB, under lines stating the layout and the parameters."""
    counts, B, S = plan.counts, layout.micro_batch, layout.seq_len
    recompute = "with" if layout.activation_checkpointing else "no"
    lines = [
        f"layout: {layout.gpus} GPUs = dp {layout.dp} x tp {layout.tp}, ep {layout.ep}; {layout.data_parallel}, "
        f"{layout.dtype}; micro-batch {B} x {S:,} tokens; {recompute} activation checkpointing",
        f"model: {config.name}, {counts.total:,} parameters = {counts.experts:,} routed experts (split by ep)",
        f"       + {counts.vocab:,} embeddings/head + {counts.split:,} matrices (split by tp) "
        f"+ {counts.replicated:,} replicated",
    ]
    rows = [
        ("memory per GPU", None),
        ("parameters", plan.parameters),
        ("gradients", plan.gradients),
        ("optimizer state (AdamW)", plan.optimizer),
        ("activations (one micro-batch)", plan.activations),
        ("total", plan.total),
        ("communication sent per GPU", None),
        (f"data parallel ({layout.data_parallel}, per step)", plan.data_parallel),
        ("tensor parallel (per micro-batch)", plan.tensor_parallel),
        ("expert parallel (per micro-batch)", plan.expert_parallel),
    ]
    unit, scale = ("GiB", GIB) if max(value or 0 for _, value in rows) >= GIB else ("MiB", MIB)  # CPU-sized: MiB
    for label, value in rows:
        if value is None:
            lines += ["", f"{label:<36} {unit:>10}"]
        else:
            lines.append(f"{label:<36} {value / scale:>10.2f}")
    lines.append(f"(dp: gradients reduced once per optimizer step; tp, ep: per micro-batch of {B} x {S:,} tokens)")
    return "\n".join(lines)
