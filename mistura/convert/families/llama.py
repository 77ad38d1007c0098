"""The dense Llama family (`llama`, `mistral`, `qwen2`): config readers and writers.

All three store their tensors under `LLAMA_NAMES` (see `common`): RMSNorm, SwiGLU, RoPE,
grouped-query attention. They differ in their biases and in how they spell a sliding
window, which mistura supports only as wide as the whole context.
"""

from __future__ import annotations

from typing import Any

from mistura.config import ModelConfig
from mistura.convert.families.common import (
    LLAMA_NAMES,
    _check_full_attention,
    _llama_attention,
    _llama_fields,
    _llama_hf_fields,
    _qwen_sliding_window,
)
from mistura.convert.families.registry import HFModelType, register
from mistura.errors import ConfigError

# Old Llama checkpoints saved each layer's rotary frequencies beside the weights.
LLAMA_IGNORED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)


def _llama_config(hf: dict[str, Any]) -> ModelConfig:
    """Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, usually no biases."""
    bias = hf.get("attention_bias", False)
    if hf.get("mlp_bias", False) != bias:
        raise ConfigError(
            f"llama config: attention_bias={bias} but mlp_bias={hf.get('mlp_bias', False)}; "
            "mistura's `bias` switches the biases of attention and MLP together"
        )
    return ModelConfig.from_dict(dict(_llama_fields(hf), bias=bias))


def _mistral_config(hf: dict[str, Any]) -> ModelConfig:
    """Mistral: Llama without biases, with a sliding window that must span the whole context."""
    _check_full_attention(hf, hf.get("sliding_window", 4096))  # MistralConfig's default window
    return ModelConfig.from_dict(_llama_fields(hf))


def _qwen2_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen2: Llama with biases on q, k and v only."""
    _check_full_attention(hf, _qwen_sliding_window(hf))
    return ModelConfig.from_dict(dict(_llama_fields(hf), qkv_bias=True))


def _llama_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_llama_config`."""
    return dict(_llama_hf_fields(config), attention_bias=config.bias, mlp_bias=config.bias)


def _mistral_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_mistral_config`: no sliding window."""
    return dict(_llama_hf_fields(config), sliding_window=None)


def _qwen2_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_qwen2_config`: no sliding window."""
    return dict(_llama_hf_fields(config), use_sliding_window=False)


def _export_type(config: ModelConfig) -> str | None:
    """With RoPE, a dense model is Llama's, or Qwen2's when only q, k and v have biases."""
    if not _llama_attention(config) or set(config.layer_mlp) != {"dense"}:
        return None
    return "qwen2" if config.qkv_bias and not config.bias else "llama"


register(
    _export_type,
    llama=HFModelType(_llama_config, _llama_hf, "LlamaForCausalLM", LLAMA_NAMES, ignored=LLAMA_IGNORED),
    mistral=HFModelType(_mistral_config, _mistral_hf, "MistralForCausalLM", LLAMA_NAMES),
    qwen2=HFModelType(_qwen2_config, _qwen2_hf, "Qwen2ForCausalLM", LLAMA_NAMES),
)
