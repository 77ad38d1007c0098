"""What several families share: name tables, the decoder's config fields and RoPE settings both ways, config checks.

Tables of a sub-module (a SwiGLU MLP, a MoE block) are written relative to it and placed
in the layers by `_in_layers`. The Llama body and the SwiGLU MLP serve Llama, Mistral,
Qwen2, the Qwen-MoE family and DeepSeek-V3; the routed experts' table serves Qwen-MoE
and DeepSeek-V3. RoPE is read as plain (`_rope_theta`, the Llama family's) or, where a
family allows YaRN (DeepSeek-V3 so far), with its YaRN settings (`_rope_fields`).

Transformers 5 keeps the experts of these models stacked in memory (gate and up fused in
`experts.gate_up_proj`), but `save_pretrained` writes them back one by one, as every
checkpoint on the Hub holds them; that per-expert layout is the one read here.
"""

from __future__ import annotations

from typing import Any

import torch

from mistura.config import ModelConfig
from mistura.convert.mapping import Names
from mistura.errors import ConfigError
from mistura.model.rope import yarn_mscale


def interleaved_rows(heads: int, plain: int, rotary: int) -> torch.Tensor:
    """Rows of `heads` heads of `plain` channels without position then `rotary` rotary ones, in mistura's order
    from a layout that rotates pairs (2i, 2i + 1): each head's unrotated rows, then its even rotary rows, then
    its odd ones (mistura pairs (i, i + rotary/2))."""
    pairs = torch.cat((torch.arange(0, rotary, 2), torch.arange(1, rotary, 2)))  # (rotary,)
    head = torch.cat((torch.arange(plain), plain + pairs))  # (plain + rotary,)
    return (torch.arange(heads)[:, None] * (plain + rotary) + head).flatten()  # (heads * (plain + rotary),)


def _within(hf_prefix: str, prefix: str, names: dict[str, str]) -> dict[str, str]:
    """A sub-module's table placed under a prefix on each side."""
    return {hf_prefix + hf: prefix + ours for hf, ours in names.items()}


def _in_layers(hf_module: str, names: dict[str, str]) -> dict[str, str]:
    """An MLP's table (dense or MoE) placed in the MLP slot of every layer; Hugging Face
    names that slot `hf_module`."""
    return _within(f"model.layers.{{i}}.{hf_module}.", "blocks.{i}.mlp.", names)


# A SwiGLU MLP: Llama's, Qwen's dense layers, the shared experts of Qwen2-MoE and DeepSeek.
# The bias entries only match when the config has biases (Llama's mlp_bias).
SWIGLU_NAMES: dict[str, str] = {
    "gate_proj.weight": "gate_proj.weight",
    "gate_proj.bias": "gate_proj.bias",
    "up_proj.weight": "up_proj.weight",
    "up_proj.bias": "up_proj.bias",
    "down_proj.weight": "down_proj.weight",
    "down_proj.bias": "down_proj.bias",
}

# Everything of a Llama-like model but its MLPs. Bias entries only match when the config
# has them (attention_bias, Qwen's qkv_bias); the q/k norms only with qk_norm (Qwen3).
LLAMA_BODY_NAMES: Names = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blocks.{i}.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "blocks.{i}.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "blocks.{i}.attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "blocks.{i}.attn.o_proj.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "blocks.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blocks.{i}.attn.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

LLAMA_NAMES: Names = LLAMA_BODY_NAMES | _in_layers("mlp", SWIGLU_NAMES)

# A MoE block's router and routed experts, as Qwen-MoE and DeepSeek checkpoints name them.
ROUTED_EXPERTS_NAMES: dict[str, str] = {
    "gate.weight": "router.gate.weight",
    "experts.{e}.gate_proj.weight": "experts.gate_proj",
    "experts.{e}.up_proj.weight": "experts.up_proj",
    "experts.{e}.down_proj.weight": "experts.down_proj",
}


# The config.json keys of the decoder's sizes, which every config must give, and their `ModelConfig` fields.
DECODER_SIZES: dict[str, str] = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_seq_len",
    "num_hidden_layers": "n_layer",
    "hidden_size": "d_model",
    "num_attention_heads": "n_head",
    "intermediate_size": "d_ff",
}


def _llama_attention(config: ModelConfig) -> bool:
    """Whether `config` attends as the Llama family does: rotary positions, no latent attention."""
    return config.mla is None and config.position == "rope"


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields of the Llama family: RMSNorm, SwiGLU, RoPE, grouped-query attention."""
    return dict(
        _decoder_fields(hf),
        n_kv_head=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        rope_theta=_rope_theta(hf),
    )


def _decoder_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """What the Llama family and DeepSeek-V3 share whatever their attention: RMSNorm, a SwiGLU MLP, rotary positions."""
    _expect(hf, "hidden_act", "silu", ("silu",))
    return dict(
        name=f"hf-{hf['model_type']}",
        **_sizes(hf, DECODER_SIZES),
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope",
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _llama_hf_fields(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_llama_fields`."""
    return dict(
        _decoder_hf_fields(config),
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        # transformers 5 reads rope_parameters, earlier releases rope_theta.
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rope_theta=config.rope_theta,
    )


def _decoder_hf_fields(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_decoder_fields`."""
    return dict(
        _sizes_hf(config, DECODER_SIZES),
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_dropout=config.attn_dropout,
    )


def _sizes(hf: dict[str, Any], sizes: dict[str, str]) -> dict[str, Any]:
    """The `ModelConfig` fields of `sizes` (config.json key -> field), each of which config.json must give."""
    return {field: _require(hf, key) for key, field in sizes.items()}


def _sizes_hf(config: ModelConfig, sizes: dict[str, str]) -> dict[str, Any]:
    """The inverse of `_sizes`: config.json's values of `sizes`, in its order."""
    return {key: getattr(config, field) for key, field in sizes.items()}


def _qwen_sliding_window(hf: dict[str, Any]) -> int | None:
    """Qwen's models only slide their window with use_sliding_window."""
    return hf.get("sliding_window") if hf.get("use_sliding_window") else None


def _check_full_attention(hf: dict[str, Any], window: int | None) -> None:
    """mistura attends over the whole context: a sliding window as wide as it changes nothing."""
    if window is not None and window < _require(hf, "max_position_embeddings"):
        raise ConfigError(
            f"{hf['model_type']} config: sliding_window={window} is not supported "
            f"(mistura attends over the whole context, max_position_embeddings={hf['max_position_embeddings']})"
        )


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE's base, refusing scaled variants (linear, dynamic, yarn, llama3, ...)."""
    rope = _rope_parameters(hf)
    if rope["rope_type"] != "default":
        raise ConfigError(
            f"{hf['model_type']} config: RoPE scaling {rope['rope_type']!r} is not supported yet "
            "(only plain RoPE, rope_type 'default')"
        )
    return rope["rope_theta"]


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, and with rope_type 'yarn' the `YaRNConfig` fields, as Hugging Face's `_compute_yarn_parameters`
    and DeepseekV3Attention's softmax scale read them."""
    rope = _rope_parameters(hf)
    if rope["rope_type"] == "default":
        return dict(rope_theta=rope["rope_theta"])
    if rope["rope_type"] != "yarn":
        raise ConfigError(
            f"{hf['model_type']} config: RoPE scaling {rope['rope_type']!r} is not supported "
            "(plain RoPE, rope_type 'default', or 'yarn')"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(
            f"{hf['model_type']} config: partial_rotary_factor={rope['partial_rotary_factor']} is not supported"
        )
    if rope.get("factor") is None:
        raise ConfigError(f"{hf['model_type']} config: YaRN's rope_parameters lack its 'factor'")
    factor, max_len = rope["factor"], _require(hf, "max_position_embeddings")
    # A top-level original_max_position_embeddings (Phi-3's place for it) wins over rope_parameters'.
    original = hf.get("original_max_position_embeddings", rope.get("original_max_position_embeddings", max_len))
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim") or 0.0
    attention_factor = rope.get("attention_factor")
    if attention_factor is None and mscale is None and mscale_all_dim:
        # Hugging Face takes the mscale ratio only when both are given, mscale(factor) otherwise; mistura's
        # default mscale of 1 would take the ratio.
        attention_factor = yarn_mscale(factor)
    yarn = dict(
        factor=factor,
        original_max_seq_len=original,
        beta_fast=rope.get("beta_fast") or 32.0,
        beta_slow=rope.get("beta_slow") or 1.0,
        mscale=1.0 if mscale is None else mscale,
        mscale_all_dim=mscale_all_dim,
        attention_factor=attention_factor,
        truncate=rope.get("truncate", True),
    )
    return dict(rope_theta=rope["rope_theta"], yarn=yarn)


def _rope_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_rope_fields`: plain RoPE, or YaRN under the names Hugging Face reads."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    yarn = config.yarn
    if yarn is None:
        return rope
    rope |= dict(
        rope_type="yarn",
        factor=yarn.factor,
        original_max_position_embeddings=yarn.original_max_seq_len,
        beta_fast=yarn.beta_fast,
        beta_slow=yarn.beta_slow,
        mscale=yarn.mscale,
        mscale_all_dim=yarn.mscale_all_dim,
        truncate=yarn.truncate,
    )
    return rope if yarn.attention_factor is None else rope | {"attention_factor": yarn.attention_factor}


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE's settings, its kind under rope_type and its base under rope_theta.

    transformers 5 keeps RoPE settings in `rope_parameters`, with the theta inside;
    older configs have a top-level `rope_theta` and an optional `rope_scaling`, whose
    kind is `rope_type` (or `type` in the oldest ones).
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    return dict(rope, rope_type=kind, rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf: dict[str, Any], key: str) -> Any:
    """config.json's value of `key`, or a ConfigError where it is missing or null."""
    if hf.get(key) is None:
        raise ConfigError(f"{hf['model_type']} config: missing '{key}'")
    return hf[key]


def _expect(hf: dict[str, Any], key: str, default: Any, supported: tuple[Any, ...]) -> None:
    """A ConfigError unless config.json's `key` (`default` where absent) is one of the `supported` values."""
    value = hf.get(key, default)
    if value not in supported:
        raise ConfigError(
            f"{hf['model_type']} config: {key}={value!r} is not supported "
            f"(mistura implements {' or '.join(map(repr, supported))})"
        )
