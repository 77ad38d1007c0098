"""A GGUF file's key-value pairs: the {arch}.* keys written from a ModelConfig, and read back into one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gguf

from mistura.config import ModelConfig
from mistura.convert.gguf.names import T, tensor_name
from mistura.errors import CheckpointError, ConfigError

K = gguf.Keys
GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}


class Metadata:
    """A GGUF file's key-value pairs, looked up by `gguf.Keys` templates: meta[K.LLM.BLOCK_COUNT]."""

    def __init__(self, fields: dict[str, Any], arch: str):
        self.fields, self.arch = fields, arch

    def __getitem__(self, key: str) -> Any:
        name = key.format(arch=self.arch)
        if self.fields.get(name) is None:
            raise CheckpointError(f"the GGUF file lacks the metadata key {name}")
        return self.fields[name]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key.format(arch=self.arch), default)


def write_metadata(writer: gguf.GGUFWriter, config: ModelConfig, arch: str) -> None:
    """The {arch}.* keys: sizes, heads, norm, rotary embedding, experts."""
    writer.add_name(config.name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if config.mla is None:
        writer.add_head_count_kv(config.n_kv_head)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    else:
        _write_mla(writer, config)
    moe = config.moe
    # llama.cpp's llama reads its experts' width as feed_forward_length.
    writer.add_feed_forward_length(moe.d_expert if moe is not None and arch == "llama" else config.d_ff)
    if config.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(config.norm_eps)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    if config.position == "rope":
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)  # with latent attention, qk_rope_head_dim
    if config.yarn is not None:
        _write_yarn(writer, config)
    if moe is not None:
        writer.add_expert_count(moe.n_experts)
        writer.add_expert_used_count(moe.top_k)
        writer.add_expert_feed_forward_length(moe.d_expert)
        if moe.d_shared:
            writer.add_expert_shared_feed_forward_length(moe.d_shared)
    if arch == "deepseek2":
        _write_deepseek_moe(writer, config)


def _write_yarn(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """YaRN as llama.cpp reads it (archs.check_yarn refuses what it would compute otherwise). Its deepseek2 reads
    yarn_log_multiplier as 0.1 x mscale_all_dim, the convention of llama.cpp's own converter."""
    yarn = config.yarn
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(yarn.factor)
    writer.add_rope_scaling_orig_ctx_len(yarn.original_max_seq_len)
    if yarn.mscale_all_dim:
        writer.add_rope_scaling_yarn_log_mul(0.1 * yarn.mscale_all_dim)


def yarn_fields(meta: Metadata) -> dict[str, Any] | None:
    """model.yarn from the rope.scaling.* keys, as llama.cpp computes them: None without scaling; a ConfigError
    for scaling other than YaRN, and for YaRN that mistura computes otherwise (archs.check_yarn's cases)."""
    kind = meta.get(K.Rope.SCALING_TYPE, "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise ConfigError(f"rope.scaling.type {kind!r} is not supported (YaRN only)")
    arch, mscale_all_dim = meta.arch, round(meta.get(K.Rope.SCALING_YARN_LOG_MUL, 0.0) / 0.1, 6)
    if bool(mscale_all_dim) != (arch == "deepseek2"):
        raise ConfigError(
            f"YaRN in llama.cpp's {arch} {'without' if arch == 'deepseek2' else 'with'} "
            "rope.scaling.yarn_log_multiplier is not supported"
        )
    return dict(
        factor=meta[K.Rope.SCALING_FACTOR],
        original_max_seq_len=meta[K.Rope.SCALING_ORIG_CTX_LEN],
        mscale=mscale_all_dim or 1.0,
        mscale_all_dim=mscale_all_dim,
    )


def _write_mla(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """Latent attention as llama.cpp's deepseek2 runs it absorbed: multi-query attention over the latent
    (one key head of r + D_rope channels, values its first r), then each head's widths once expanded."""
    mla = config.mla
    writer.add_q_lora_rank(mla.q_lora_rank or 0)  # 0: queries from attn_q
    writer.add_kv_lora_rank(mla.kv_lora_rank)
    writer.add_head_count_kv(1)
    writer.add_key_length(mla.kv_lora_rank + mla.qk_rope_head_dim)
    writer.add_value_length(mla.kv_lora_rank)
    writer.add_key_length_mla(mla.qk_head_dim)
    writer.add_value_length_mla(mla.v_head_dim)


def _write_deepseek_moe(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """deepseek2's routing keys: leading dense layers, shared experts counted in routed experts' widths,
    score function, renormalisation, scale, and the expert groups where they limit the choice."""
    moe, kinds = config.moe, list(config.layer_mlp)
    writer.add_leading_dense_block_count(kinds.index("moe") if "moe" in kinds else config.n_layer)
    if moe is None:  # every layer dense: llama.cpp still reads the expert widths
        writer.add_expert_feed_forward_length(0)
        writer.add_expert_shared_count(0)
        return
    writer.add_expert_shared_count(moe.d_shared // moe.d_expert)
    writer.add_expert_weights_scale(moe.route_scale)
    writer.add_expert_weights_norm(moe.norm_topk)
    writer.add_expert_gating_func(GATING[moe.scoring])
    if moe.topk_groups < moe.n_groups:  # all groups eligible: no limit, and llama.cpp wants none written
        writer.add_expert_group_count(moe.n_groups)
        writer.add_expert_group_used_count(moe.topk_groups)


def _common_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    """The fields every architecture stores alike."""
    return dict(
        name=meta.get(K.General.NAME, "gguf"),
        max_seq_len=meta[K.LLM.CONTEXT_LENGTH],
        n_layer=meta[K.LLM.BLOCK_COUNT],
        d_model=meta[K.LLM.EMBEDDING_LENGTH],
        n_head=meta[K.Attention.HEAD_COUNT],
        tie_embeddings=tensor_name(T.OUTPUT) not in tensors,
    )


def llama_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    """Llama, and the Qwen architectures with RoPE in halves; MoE fields where expert_count is set."""
    block = tensor_name(T.ATTN_OUT, "bias").format(i=0)
    heads = meta[K.Attention.HEAD_COUNT]
    fields = dict(
        _common_fields(meta, tensors),
        n_kv_head=meta.get(K.Attention.HEAD_COUNT_KV, heads),
        head_dim=meta.get(K.Attention.KEY_LENGTH, meta[K.LLM.EMBEDDING_LENGTH] // heads),
        d_ff=meta[K.LLM.FEED_FORWARD_LENGTH],
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=meta[K.Attention.LAYERNORM_RMS_EPS],
        position="rope",
        rope_theta=meta.get(K.Rope.FREQ_BASE, 10000.0),
        bias=block in tensors,
        qkv_bias=tensor_name(T.ATTN_Q, "bias").format(i=0) in tensors,
        qk_norm=tensor_name(T.ATTN_Q_NORM).format(i=0) in tensors,
        yarn=yarn_fields(meta),
    )
    if meta.get(K.LLM.EXPERT_COUNT):
        fields["moe"] = dict(n_experts=meta[K.LLM.EXPERT_COUNT], top_k=meta[K.LLM.EXPERT_USED_COUNT])
    return fields


def mixtral_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    fields = llama_fields(meta, tensors)
    if "moe" in fields:
        fields["moe"] |= dict(d_expert=meta[K.LLM.FEED_FORWARD_LENGTH], norm_topk=True)
    return fields


def qwen_moe_fields(norm_topk: bool) -> Callable[[Metadata, set[str]], dict[str, Any]]:
    def fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
        result = llama_fields(meta, tensors)
        if "moe" not in result:
            raise CheckpointError("a Qwen-MoE GGUF file without expert_count")
        result["moe"] |= dict(d_expert=meta[K.LLM.EXPERT_FEED_FORWARD_LENGTH], norm_topk=norm_topk)
        if meta.get(K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH):
            result["moe"] |= dict(d_shared=meta[K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH], shared_gate=True)
        return result

    return fields


def deepseek2_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    """Latent attention as `_write_mla` writes it, and DeepSeekMoE blocks after the leading dense layers."""
    if meta.get(K.Attention.KEY_LENGTH_MLA) is None:
        raise ConfigError("a deepseek2 GGUF file without attention.key_length_mla (llama.cpp's legacy layout)")
    rope = meta[K.Rope.DIMENSION_COUNT]
    fields = dict(
        _common_fields(meta, tensors),
        d_ff=meta[K.LLM.FEED_FORWARD_LENGTH],
        norm_eps=meta[K.Attention.LAYERNORM_RMS_EPS],
        rope_theta=meta.get(K.Rope.FREQ_BASE, 10000.0),
        yarn=yarn_fields(meta),
        mla=dict(
            q_lora_rank=meta[K.Attention.Q_LORA_RANK] or None,
            kv_lora_rank=meta[K.Attention.KV_LORA_RANK],
            qk_nope_head_dim=meta[K.Attention.KEY_LENGTH_MLA] - rope,
            qk_rope_head_dim=rope,
            v_head_dim=meta[K.Attention.VALUE_LENGTH_MLA],
        ),
        first_dense_layers=meta.get(K.LLM.LEADING_DENSE_BLOCK_COUNT, 0),
    )
    if meta.get(K.LLM.EXPERT_COUNT):
        d_expert, groups = meta[K.LLM.EXPERT_FEED_FORWARD_LENGTH], meta.get(K.LLM.EXPERT_GROUP_COUNT) or 1
        gating = meta.get(K.LLM.EXPERT_GATING_FUNC, gguf.ExpertGatingFuncType.SOFTMAX)
        scoring = {kind: name for name, kind in GATING.items()}.get(gating)
        if scoring is None:
            raise ConfigError(f"deepseek2 expert_gating_func {gating} is not supported (softmax or sigmoid only)")
        fields["moe"] = dict(
            n_experts=meta[K.LLM.EXPERT_COUNT],
            top_k=meta[K.LLM.EXPERT_USED_COUNT],
            d_expert=d_expert,
            scoring=scoring,
            norm_topk=bool(meta.get(K.LLM.EXPERT_WEIGHTS_NORM, False)),
            route_scale=meta.get(K.LLM.EXPERT_WEIGHTS_SCALE) or 1.0,  # llama.cpp: 0 does not scale
            n_groups=groups,
            topk_groups=meta.get(K.LLM.EXPERT_GROUP_USED_COUNT) or groups,
            d_shared=meta[K.LLM.EXPERT_SHARED_COUNT] * d_expert,
        )
    return fields


def gpt2_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    return dict(
        _common_fields(meta, tensors),
        d_ff=meta[K.LLM.FEED_FORWARD_LENGTH],
        mlp="gelu_tanh",
        norm="layernorm",
        norm_eps=meta[K.Attention.LAYERNORM_EPS],
        position="learned",
        bias=True,
    )
