"""DeepSeek-V3 (`deepseek_v3`): its name tables, config reader and config writer.

Multi-head latent attention, dense SwiGLU MLPs in the first layers and DeepSeekMoE blocks
in the others. `DEEPSEEK_V3_MOE_NAMES` and `deepseek_v3_moe_fields` also serve on their
own, to load one DeepSeek-V3 MoE block into a mistura `MoELayer`. The stored rotary rows
are reordered on the way (`_deepseek_v3_rows`) and the multi-token-prediction layers
passed over (`_deepseek_v3_mtp`).
"""

from __future__ import annotations

from typing import Any

import torch

from mistura.config import ModelConfig, MoEConfig
from mistura.convert.families.common import (
    LLAMA_NAMES,
    ROUTED_EXPERTS_NAMES,
    SWIGLU_NAMES,
    _decoder_fields,
    _decoder_hf_fields,
    _expect,
    _in_layers,
    _require,
    _rope_fields,
    _rope_hf,
    _within,
    interleaved_rows,
)
from mistura.convert.families.registry import HFModelType, register
from mistura.convert.mapping import Names
from mistura.errors import ConfigError

# DeepSeek-V3's MoE block (`DeepseekV3MoE`): the router's e_score_correction_bias is
# mistura's selection bias, and the n_shared_experts shared experts are one SwiGLU of
# n_shared_experts * moe_intermediate_size channels.
DEEPSEEK_V3_MOE_NAMES: dict[str, str] = (
    ROUTED_EXPERTS_NAMES
    | {"gate.e_score_correction_bias": "router.expert_bias"}
    | _within("shared_experts.", "shared.", SWIGLU_NAMES)
)

# DeepSeek-V3's attention (`DeepseekV3Attention`), multi-head latent attention: the queries
# from q_proj, or with q_lora_rank through q_a_proj -> q_a_layernorm -> q_b_proj (only the
# path the config has matches); the key/value latent and the shared rotary key from
# kv_a_proj_with_mqa, its latent part normalised by kv_a_layernorm and expanded by kv_b_proj.
MLA_NAMES: dict[str, str] = {
    "q_proj.weight": "q_proj.weight",
    "q_a_proj.weight": "q_a_proj.weight",
    "q_a_layernorm.weight": "q_a_norm.weight",
    "q_b_proj.weight": "q_b_proj.weight",
    "kv_a_proj_with_mqa.weight": "kv_a_proj.weight",
    "kv_a_layernorm.weight": "kv_a_norm.weight",
    "kv_b_proj.weight": "kv_b_proj.weight",
    "o_proj.weight": "o_proj.weight",
}

# DeepSeek-V3: the Llama body and dense MLP (the first first_k_dense_replace layers), MLA, and
# the MoE block in the other layers.
DEEPSEEK_V3_NAMES: Names = (
    LLAMA_NAMES
    | _within("model.layers.{i}.self_attn.", "blocks.{i}.attn.", MLA_NAMES)
    | _in_layers("mlp", DEEPSEEK_V3_MOE_NAMES)
)

# DeepseekV3Config's defaults, DeepSeek-V3's own values, for the options a config.json may leave out.
_DEEPSEEK_V3_DEFAULTS: dict[str, Any] = dict(
    q_lora_rank=1536,
    first_k_dense_replace=3,
    n_group=8,
    topk_group=4,
    rms_norm_eps=1e-6,
    rope_interleave=True,
    num_nextn_predict_layers=1,
)


def _deepseek_v3_config(hf: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V3: multi-head latent attention with (optionally YaRN-extended) decoupled RoPE, dense
    SwiGLU MLPs in the first first_k_dense_replace layers, DeepSeekMoE blocks in the others."""
    hf = {**_DEEPSEEK_V3_DEFAULTS, **hf}
    _expect(hf, "attention_bias", False, (False,))
    # Hugging Face's DeepseekV3 ignores moe_layer_freq and DeepSeek's own code does not: only 1 means the same to both.
    _expect(hf, "moe_layer_freq", 1, (1,))
    heads = _require(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ConfigError(
            f"deepseek_v3 config: num_key_value_heads={kv_heads} differs from num_attention_heads={heads}; "
            "latent attention expands a key and a value for every query head (Hugging Face's model fails on it too)"
        )
    if hf["rms_norm_eps"] != 1e-6:
        raise ConfigError(
            f"deepseek_v3 config: rms_norm_eps={hf['rms_norm_eps']} is not supported: Hugging Face's DeepseekV3 "
            "normalises the query and key/value latents with eps 1e-6 whatever rms_norm_eps says, mistura with "
            "rms_norm_eps; the two agree only at 1e-6"
        )
    sparse = _require(hf, "first_k_dense_replace") < _require(hf, "num_hidden_layers")
    mla = dict(
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=_require(hf, "kv_lora_rank"),
        qk_nope_head_dim=_require(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=_require(hf, "qk_rope_head_dim"),
        v_head_dim=_require(hf, "v_head_dim"),
    )
    return ModelConfig.from_dict(
        dict(
            _decoder_fields(hf),
            **_rope_fields(hf),
            mla=mla,
            first_dense_layers=hf["first_k_dense_replace"] if sparse else 0,
            moe=deepseek_v3_moe_fields(hf) if sparse else None,
        )
    )


def _deepseek_v3_rows(hf: dict[str, Any], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The query and rotary-key rows of a DeepSeek-V3 checkpoint in mistura's order.

    With rope_interleave (DeepseekV3Config's default, the layout of DeepSeek's checkpoints),
    Hugging Face rotates a head's rotary channels in pairs (2i, 2i + 1); mistura pairs
    (i, i + D_rope/2). Taking the even rotary rows first, then the odd ones, turns one
    pairing into the other: within each head's rotary rows of q_proj (or q_b_proj), whose
    rows are [nope, rope] head after head, and in the last D_rope rows of
    kv_a_proj_with_mqa, the shared rotary key. Queries and keys move alike, so every
    attention score stays the same. Export writes rope_interleave false with the rows in
    mistura's order: an interleaved checkpoint taken through mistura comes back with the
    same outputs and its rotary rows de-interleaved.
    """
    if not hf.get("rope_interleave", _DEEPSEEK_V3_DEFAULTS["rope_interleave"]):
        return {}
    mla = config.mla
    query = interleaved_rows(config.n_head, mla.qk_nope_head_dim, mla.qk_rope_head_dim)  # (H * (D_nope + D_rope),)
    latent = interleaved_rows(1, mla.kv_lora_rank, mla.qk_rope_head_dim)  # (r + D_rope,)
    q_proj = "q_proj" if mla.q_lora_rank is None else "q_b_proj"
    return {
        f"model.layers.{{i}}.self_attn.{q_proj}.weight": query,
        "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight": latent,
    }


def _deepseek_v3_mtp(hf: dict[str, Any], config: ModelConfig) -> tuple[str, ...]:
    """The multi-token-prediction modules of a DeepSeek-V3 checkpoint, passed over on import.

    DeepSeek-V3 stores num_nextn_predict_layers of them as the layers after the last
    decoder layer (`model.layers.61.*`). They draft further tokens for speculative
    decoding and take no part in the model's own logits; Hugging Face's
    DeepseekV3ForCausalLM leaves them out too (`_keys_to_ignore_on_load_unexpected`).
    A stored layer beyond those is still unexpected.
    """
    count = hf.get("num_nextn_predict_layers", _DEEPSEEK_V3_DEFAULTS["num_nextn_predict_layers"])
    return tuple(f"model.layers.{i}." for i in range(config.n_layer, config.n_layer + count))


def deepseek_v3_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The `MoEConfig` fields of a DeepSeek-V3 config.json.

    Sigmoid scores; the stored selection bias added to choose, first the topk_group best
    of n_group expert groups, then the top-k experts in them; the chosen unbiased scores
    renormalised and times routed_scaling_factor; the n_shared_experts shared experts as
    one SwiGLU as wide as all of them. The MoE blocks load with `DEEPSEEK_V3_MOE_NAMES`.
    """
    hf = {**_DEEPSEEK_V3_DEFAULTS, **hf}
    _expect(hf, "scoring_func", "sigmoid", ("sigmoid",))
    _expect(hf, "topk_method", "noaux_tc", ("noaux_tc",))
    d_expert = _require(hf, "moe_intermediate_size")
    n_experts, n_groups = _require(hf, "n_routed_experts"), hf["n_group"] or 1
    if n_experts // n_groups < 2:
        raise ConfigError(
            f"deepseek_v3 config: n_group={n_groups} leaves fewer than two of the n_routed_experts={n_experts} "
            "experts in a group; Hugging Face's router ranks the groups by the sum of their two best scores"
        )
    return dict(
        n_experts=n_experts,
        top_k=_require(hf, "num_experts_per_tok"),
        d_expert=d_expert,
        scoring="sigmoid",
        norm_topk=hf.get("norm_topk_prob", True),
        route_scale=hf.get("routed_scaling_factor", 2.5),
        n_groups=n_groups,
        topk_groups=hf["topk_group"] or 1,
        d_shared=hf.get("n_shared_experts", 1) * d_expert,
        # The stored selection bias is used as it is; moving it further (DeepSeek-V3 pre-trained
        # with a rate of 0.001) is a training choice: set model.moe.balance_bias_rate to fine-tune.
        balance_bias_rate=0.0,
    )


def _deepseek_v3_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_deepseek_v3_config`, with the rotary rows in mistura's order (rope_interleave false)
    and no multi-token-prediction layers."""
    mla = config.mla
    if mla is None:
        raise ConfigError("Hugging Face's deepseek_v3 has latent attention; this config has none (no model.mla)")
    kinds = list(config.layer_mlp)
    fields = dict(
        _decoder_hf_fields(config),
        num_key_value_heads=config.n_head,
        attention_bias=False,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        rope_parameters=_rope_hf(config),
        rope_theta=config.rope_theta,
        rope_interleave=False,
        first_k_dense_replace=kinds.index("moe") if "moe" in kinds else config.n_layer,
        num_nextn_predict_layers=0,
    )
    return fields if config.moe is None else fields | _deepseek_v3_moe_hf(config.moe)


def _deepseek_v3_moe_hf(moe: MoEConfig) -> dict[str, Any]:
    """The inverse of `deepseek_v3_moe_fields`: the shared experts counted in routed experts' widths."""
    if moe.d_shared % moe.d_expert:
        raise ConfigError(
            f"Hugging Face's deepseek_v3 counts its shared experts in routed experts: moe.d_shared={moe.d_shared} "
            f"is not a multiple of moe.d_expert={moe.d_expert}"
        )
    return dict(
        n_routed_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.d_expert,
        n_shared_experts=moe.d_shared // moe.d_expert,
        scoring_func=moe.scoring,
        topk_method="noaux_tc",
        norm_topk_prob=moe.norm_topk,
        routed_scaling_factor=moe.route_scale,
        n_group=moe.n_groups,
        topk_group=moe.topk_groups,
    )


def _export_type(config: ModelConfig) -> str | None:
    """Latent attention is DeepSeek-V3's."""
    return "deepseek_v3" if config.mla is not None else None


register(
    _export_type,
    deepseek_v3=HFModelType(
        read_config=_deepseek_v3_config,
        write_config=_deepseek_v3_hf,
        architecture="DeepseekV3ForCausalLM",
        names=DEEPSEEK_V3_NAMES,
        row_orders=_deepseek_v3_rows,
        passed_over=_deepseek_v3_mtp,
    ),
)
