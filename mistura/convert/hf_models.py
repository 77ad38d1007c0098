"""What mistura knows about each Hugging Face `model_type`: a config reader and a name table.

A name table maps Hugging Face parameter names, with `{i}` for the layer index, to
mistura names. Most entries are renames. A tuple of targets marks a fused tensor, split
along its first dimension in the order given (GPT-2's `c_attn` holds q, k, then v).
`transposed` lists the names stored as (in, out), the transpose of `nn.Linear`, as GPT-2's
`Conv1D` does. The tables are plain dicts, so export can invert them.

A config reader turns config.json into a `ModelConfig`. An option that changes the
computation but that mistura does not implement raises ConfigError: building a slightly
different model without a word would be worse.

A new model type is one more `HFModelType` entry in `MODEL_TYPES`. Mistral, for one,
would reuse `LLAMA_NAMES` with its own config reader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mistura.config import ModelConfig
from mistura.errors import ConfigError


@dataclass(frozen=True)
class HFModelType:
    """How to read one Hugging Face `model_type`."""

    read_config: Callable[[dict[str, Any]], ModelConfig]
    names: dict[str, str | tuple[str, ...]]  # HF template -> mistura template(s)
    prefix: str  # what *ForCausalLM puts before the base model's names
    transposed: frozenset[str] = frozenset()  # HF templates stored as (in, out)
    ignored: tuple[str, ...] = ()  # HF templates of buffers that hold no weights


GPT2_NAMES: dict[str, str | tuple[str, ...]] = {
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

# Bias entries only match when the config has biases (attention_bias and mlp_bias).
LLAMA_NAMES: dict[str, str | tuple[str, ...]] = {
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
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "blocks.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.up_proj.bias": "blocks.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.down_proj.bias": "blocks.{i}.mlp.down_proj.bias",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    """GPT-2: pre-LayerNorm, tanh-approximated GELU, learned positions, biases everywhere."""
    # "gelu_new" and "gelu_pytorch_tanh" are the same function, GELU's tanh approximation.
    _expect(hf, "activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"))
    _expect(hf, "scale_attn_weights", True, (True,))
    _expect(hf, "scale_attn_by_inverse_layer_idx", False, (False,))
    _expect(hf, "add_cross_attention", False, (False,))
    d_model = _require(hf, "n_embd")
    return ModelConfig.from_dict(
        dict(
            name="hf-gpt2",
            vocab_size=_require(hf, "vocab_size"),
            max_seq_len=_require(hf, "n_positions"),
            n_layer=_require(hf, "n_layer"),
            d_model=d_model,
            n_head=_require(hf, "n_head"),
            d_ff=hf.get("n_inner") or 4 * d_model,
            mlp="gelu_tanh",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position="learned",
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    )


def _llama_config(hf: dict[str, Any]) -> ModelConfig:
    """Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, usually no biases."""
    _expect(hf, "hidden_act", "silu", ("silu",))
    bias = hf.get("attention_bias", False)
    if hf.get("mlp_bias", False) != bias:
        raise ConfigError(
            f"llama config: attention_bias={bias} but mlp_bias={hf.get('mlp_bias', False)}; "
            "mistura's `bias` switches the biases of attention and MLP together"
        )
    return ModelConfig.from_dict(
        dict(
            name="hf-llama",
            vocab_size=_require(hf, "vocab_size"),
            max_seq_len=_require(hf, "max_position_embeddings"),
            n_layer=_require(hf, "num_hidden_layers"),
            d_model=_require(hf, "hidden_size"),
            n_head=_require(hf, "num_attention_heads"),
            n_kv_head=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            d_ff=_require(hf, "intermediate_size"),
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            position="rope",
            rope_theta=_rope_theta(hf),
            bias=bias,
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE's base, refusing scaled variants (linear, dynamic, yarn, llama3, ...).

    transformers 5 keeps RoPE settings in `rope_parameters`, with the theta inside;
    older configs have a top-level `rope_theta` and an optional `rope_scaling`, whose
    kind is `rope_type` (or `type` in the oldest ones).
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(
            f"{hf['model_type']} config: RoPE scaling {kind!r} is not supported yet "
            "(only plain RoPE, rope_type 'default')"
        )
    return rope.get("rope_theta", hf.get("rope_theta", 10000.0))


def _require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{hf['model_type']} config: missing '{key}'")
    return hf[key]


def _expect(hf: dict[str, Any], key: str, default: Any, supported: tuple[Any, ...]) -> None:
    value = hf.get(key, default)
    if value not in supported:
        raise ConfigError(
            f"{hf['model_type']} config: {key}={value!r} is not supported "
            f"(mistura implements {' or '.join(map(repr, supported))})"
        )


MODEL_TYPES: dict[str, HFModelType] = {
    "gpt2": HFModelType(
        read_config=_gpt2_config,
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
    "llama": HFModelType(
        read_config=_llama_config,
        names=LLAMA_NAMES,
        prefix="model.",
        ignored=("model.layers.{i}.self_attn.rotary_emb.inv_freq",),  # old checkpoints saved it
    ),
}


def find_model_type(name: Any) -> HFModelType:
    """The entry of MODEL_TYPES for `name`, or a ConfigError listing the supported ones."""
    if name not in MODEL_TYPES:
        raise ConfigError(
            f"Hugging Face model_type {name!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return MODEL_TYPES[name]
