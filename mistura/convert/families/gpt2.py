"""GPT-2 (`gpt2`): its name table, config reader and config writer.

GPT-2's `Conv1D` stores its linears as (in, out), hence the transposed names, and its
`c_attn` holds q, k and v fused.
"""

from __future__ import annotations

from typing import Any

from mistura.config import ModelConfig
from mistura.convert.families.common import _expect, _require, _sizes, _sizes_hf
from mistura.convert.families.registry import HFModelType, register
from mistura.convert.mapping import Names

GPT2_NAMES: Names = {
    "transformer.wte.weight": "tok_emb.weight",
    "transformer.wpe.weight": "pos_emb.weight",
    "transformer.h.{i}.ln_1.weight": "blocks.{i}.attn_norm.weight",
    "transformer.h.{i}.ln_1.bias": "blocks.{i}.attn_norm.bias",
    "transformer.h.{i}.attn.c_attn.weight": (
        "blocks.{i}.attn.q_proj.weight",
        "blocks.{i}.attn.k_proj.weight",
        "blocks.{i}.attn.v_proj.weight",
    ),
    "transformer.h.{i}.attn.c_attn.bias": (
        "blocks.{i}.attn.q_proj.bias",
        "blocks.{i}.attn.k_proj.bias",
        "blocks.{i}.attn.v_proj.bias",
    ),
    "transformer.h.{i}.attn.c_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "transformer.h.{i}.attn.c_proj.bias": "blocks.{i}.attn.o_proj.bias",
    "transformer.h.{i}.ln_2.weight": "blocks.{i}.mlp_norm.weight",
    "transformer.h.{i}.ln_2.bias": "blocks.{i}.mlp_norm.bias",
    "transformer.h.{i}.mlp.c_fc.weight": "blocks.{i}.mlp.up_proj.weight",
    "transformer.h.{i}.mlp.c_fc.bias": "blocks.{i}.mlp.up_proj.bias",
    "transformer.h.{i}.mlp.c_proj.weight": "blocks.{i}.mlp.down_proj.weight",
    "transformer.h.{i}.mlp.c_proj.bias": "blocks.{i}.mlp.down_proj.bias",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.ln_f.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
}

# The config.json keys of GPT-2's sizes, which every config must give, and their `ModelConfig` fields.
GPT2_SIZES: dict[str, str] = {
    "vocab_size": "vocab_size",
    "n_positions": "max_seq_len",
    "n_layer": "n_layer",
    "n_embd": "d_model",
    "n_head": "n_head",
}

# GPT-2's activations as mistura's MLP kinds: "gelu_new" and "gelu_pytorch_tanh" are the
# same function, GELU's tanh approximation; "gelu" is the exact one.
GPT2_MLPS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    """GPT-2: pre-LayerNorm, GELU (tanh-approximated, as released), learned positions, biases everywhere."""
    _expect(hf, "activation_function", "gelu_new", tuple(GPT2_MLPS))
    _expect(hf, "scale_attn_weights", True, (True,))
    _expect(hf, "scale_attn_by_inverse_layer_idx", False, (False,))
    _expect(hf, "add_cross_attention", False, (False,))
    d_model = _require(hf, "n_embd")
    return ModelConfig.from_dict(
        dict(
            name="hf-gpt2",
            **_sizes(hf, GPT2_SIZES),
            d_ff=hf.get("n_inner") or 4 * d_model,
            mlp=GPT2_MLPS[hf.get("activation_function", "gelu_new")],
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position="learned",
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    )


def _gpt2_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_gpt2_config`."""
    return dict(
        _sizes_hf(config, GPT2_SIZES),
        n_inner=config.d_ff,
        activation_function="gelu" if config.mlp == "gelu" else "gelu_new",
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attn_pdrop=config.attn_dropout,
        resid_pdrop=config.resid_dropout,
        embd_pdrop=config.resid_dropout,
    )


def _export_type(config: ModelConfig) -> str | None:
    """Learned positions are GPT-2's."""
    return "gpt2" if config.position == "learned" else None


register(
    _export_type,
    gpt2=HFModelType(
        read_config=_gpt2_config,
        write_config=_gpt2_hf,
        architecture="GPT2LMHeadModel",
        names=GPT2_NAMES,
        prefix="transformer.",
        transposed=frozenset(
            {
                "transformer.h.{i}.attn.c_attn.weight",
                "transformer.h.{i}.attn.c_proj.weight",
                "transformer.h.{i}.mlp.c_fc.weight",
                "transformer.h.{i}.mlp.c_proj.weight",
            }
        ),
        # Causal-mask buffers, saved beside the weights by older transformers releases.
        ignored=("transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias"),
    ),
)
