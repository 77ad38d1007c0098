"""The Llama family with experts (`mixtral`, `qwen2_moe`, `qwen3_moe`): name tables, config readers and writers.

Each is the Llama body (see `common`) with a MoE block of softmax top-k experts in its
expert layers: Mixtral's in every layer, the Qwen models' in the layers that
`_qwen_layer_kinds` picks, with Qwen2-MoE's sigmoid-gated shared expert beside the
routed ones.
"""

from __future__ import annotations

from typing import Any

from mistura.config import ModelConfig, MoEConfig
from mistura.convert.families.common import (
    LLAMA_BODY_NAMES,
    LLAMA_NAMES,
    ROUTED_EXPERTS_NAMES,
    SWIGLU_NAMES,
    _check_full_attention,
    _expect,
    _in_layers,
    _llama_attention,
    _llama_fields,
    _llama_hf_fields,
    _qwen_sliding_window,
    _require,
    _within,
)
from mistura.convert.families.registry import HFModelType, register
from mistura.convert.mapping import Names
from mistura.errors import ConfigError

# Mixtral's MoE block (`block_sparse_moe`); its experts' linears keep the names of Mistral's code.
MIXTRAL_MOE_NAMES: dict[str, str] = {
    "gate.weight": "router.gate.weight",
    "experts.{e}.w1.weight": "experts.gate_proj",
    "experts.{e}.w3.weight": "experts.up_proj",
    "experts.{e}.w2.weight": "experts.down_proj",
}

# Qwen2-MoE's block adds a shared expert whose output a sigmoid gate scales.
QWEN2_MOE_NAMES: dict[str, str] = (
    ROUTED_EXPERTS_NAMES
    | _within("shared_expert.", "shared.", SWIGLU_NAMES)
    | {"shared_expert_gate.weight": "shared_gate.weight"}
)

# The whole models' tables. The Qwen models keep a dense SwiGLU MLP in their dense layers.
MIXTRAL_MODEL_NAMES: Names = LLAMA_BODY_NAMES | _in_layers("block_sparse_moe", MIXTRAL_MOE_NAMES)
QWEN2_MOE_MODEL_NAMES: Names = LLAMA_NAMES | _in_layers("mlp", QWEN2_MOE_NAMES)
QWEN3_MOE_MODEL_NAMES: Names = LLAMA_NAMES | _in_layers("mlp", ROUTED_EXPERTS_NAMES)


def _mixtral_config(hf: dict[str, Any]) -> ModelConfig:
    """Mixtral: Mistral's Llama-like body with a MoE in every layer, softmax top-k renormalised."""
    hf = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, **hf}  # MixtralConfig's defaults where Llama's differ
    _check_full_attention(hf, hf.get("sliding_window"))
    moe = dict(
        n_experts=_require(hf, "num_local_experts"),
        top_k=_require(hf, "num_experts_per_tok"),
        d_expert=_require(hf, "intermediate_size"),
        norm_topk=True,
    )
    return ModelConfig.from_dict(dict(_llama_fields(hf), moe=moe))


def _qwen2_moe_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen2-MoE (Qwen1.5-MoE): biases on q/k/v only, and a sigmoid-gated shared expert
    beside the routed ones."""
    fields = _qwen_moe_fields(hf)
    fields["moe"] |= dict(d_shared=_require(hf, "shared_expert_intermediate_size"), shared_gate=True)
    return ModelConfig.from_dict(dict(fields, qkv_bias=hf.get("qkv_bias", True)))


def _qwen3_moe_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen3-MoE: no biases, an RMSNorm on every query and key head, no shared expert."""
    _expect(hf, "attention_bias", False, (False,))
    return ModelConfig.from_dict(dict(_qwen_moe_fields(hf), qk_norm=True))


def _qwen_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """What Qwen2-MoE and Qwen3-MoE share: softmax top-k experts, renormalised when
    norm_topk_prob, in the layers that `_qwen_layer_kinds` picks; the others keep a dense
    MLP of intermediate_size channels."""
    _check_full_attention(hf, _qwen_sliding_window(hf))
    moe = dict(
        # Qwen3MoeConfig aliases num_experts to num_local_experts, the key that it saves.
        n_experts=_require(hf, "num_local_experts" if "num_local_experts" in hf else "num_experts"),
        top_k=_require(hf, "num_experts_per_tok"),
        d_expert=_require(hf, "moe_intermediate_size"),
        norm_topk=hf.get("norm_topk_prob", False),
    )
    return dict(_llama_fields(hf), layer_mlp=_qwen_layer_kinds(hf), moe=moe)


def _qwen_layer_kinds(hf: dict[str, Any]) -> list[str]:
    """Layer i has experts unless listed in mlp_only_layers, and only every decoder_sparse_step-th."""
    dense = set(hf.get("mlp_only_layers") or ())
    step = hf.get("decoder_sparse_step", 1)
    n_layer = _require(hf, "num_hidden_layers")
    return ["dense" if i in dense or (i + 1) % step else "moe" for i in range(n_layer)]


def _mixtral_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_mixtral_config`: the experts' width as intermediate_size."""
    moe = _experts(config, "mixtral")
    return dict(
        _llama_hf_fields(config),
        intermediate_size=moe.d_expert,
        num_local_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        sliding_window=None,
    )


def _qwen2_moe_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_qwen2_moe_config`."""
    fields = _qwen_moe_hf_fields(config, "qwen2_moe")
    return dict(fields, shared_expert_intermediate_size=config.moe.d_shared, qkv_bias=config.qkv_bias)


def _qwen3_moe_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_qwen3_moe_config`."""
    return dict(_qwen_moe_hf_fields(config, "qwen3_moe"), attention_bias=False)


def _qwen_moe_hf_fields(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """The inverse of `_qwen_moe_fields`: the dense layers listed in mlp_only_layers."""
    moe = _experts(config, model_type)
    return dict(
        _llama_hf_fields(config),
        num_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.d_expert,
        norm_topk_prob=moe.norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, kind in enumerate(config.layer_mlp) if kind == "dense"],
        use_sliding_window=False,
    )


def _experts(config: ModelConfig, model_type: str) -> MoEConfig:
    """`config`'s experts, or a ConfigError where it has none for `model_type` to hold."""
    if config.moe is None:
        raise ConfigError(f"Hugging Face's {model_type} has experts; this config has none (no model.moe)")
    return config.moe


def _export_type(config: ModelConfig) -> str | None:
    """With RoPE, a model with experts is Qwen2-MoE's when a gate scales its shared expert,
    Qwen3-MoE's with q/k norms, Mixtral's otherwise."""
    if not _llama_attention(config) or set(config.layer_mlp) == {"dense"}:
        return None
    if config.moe.shared_gate:
        return "qwen2_moe"
    return "qwen3_moe" if config.qk_norm else "mixtral"


register(
    _export_type,
    mixtral=HFModelType(_mixtral_config, _mixtral_hf, "MixtralForCausalLM", MIXTRAL_MODEL_NAMES),
    qwen2_moe=HFModelType(_qwen2_moe_config, _qwen2_moe_hf, "Qwen2MoeForCausalLM", QWEN2_MOE_MODEL_NAMES),
    qwen3_moe=HFModelType(_qwen3_moe_config, _qwen3_moe_hf, "Qwen3MoeForCausalLM", QWEN3_MOE_MODEL_NAMES),
)
