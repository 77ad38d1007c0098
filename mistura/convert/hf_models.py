"""What mistura knows about each Hugging Face `model_type`: a name table, a config reader and a config writer.

A name table maps Hugging Face parameter names, with `{i}` for the layer index, to
mistura names. Most entries are renames. A tuple of targets marks a fused tensor, split
along its first dimension in the order given (GPT-2's `c_attn` holds q, k, then v).
`{e}` stands for the expert index: checkpoints store each routed expert's linears on
their own, `experts.{e}.gate_proj.weight` (F, D), and mistura stacks the experts' slices
into one (E, F, D) tensor. `transposed` lists the names stored as (in, out), the
transpose of `nn.Linear`, as GPT-2's `Conv1D` does. An entry applies only where the
config has its target: a bias only with biases, the dense MLP's names only in dense
layers, the experts' only in expert layers. The tables are plain dicts that
`mistura.convert.mapping` reads both ways: import and export share them.

Tables of a sub-module (a SwiGLU MLP, a MoE block) are written relative to it and placed
in the layers by `_in_layers`; `DEEPSEEK_V3_MOE_NAMES` also serves on its own, to load one
DeepSeek-V3 MoE block into a mistura `MoELayer`.

Transformers 5 keeps the experts of these models stacked in memory (gate and up fused in
`experts.gate_up_proj`), but `save_pretrained` writes them back one by one, as every
checkpoint on the Hub holds them; that per-expert layout is the one read here.

A config reader turns config.json into a `ModelConfig`. An option that changes the
computation but that mistura does not implement raises ConfigError: building a slightly
different model without a word would be worse. A config writer does the inverse, for
export; it need not refuse anything itself, since `mistura.convert.hf.hf_config` reads
what it wrote back with the reader and refuses any computed field that changed.

Where the layout of the stored tensors depends on config.json, two more functions of it
say how: `row_orders`, the rows that mistura orders otherwise (DeepSeek-V3's interleaved
rotary channels), and `passed_over`, stored modules that mistura does not run
(DeepSeek-V3's multi-token-prediction layers).

A new model type is one more `HFModelType` entry in `MODEL_TYPES`: a table (often made of
existing ones: Mistral and Qwen2 reuse `LLAMA_NAMES`), a reader and a writer, plus a
line in `model_type_for` if export should pick it unasked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mistura.config import ModelConfig, MoEConfig
from mistura.convert.mapping import Names
from mistura.errors import ConfigError
from mistura.model.rope import yarn_mscale


@dataclass(frozen=True)
class HFModelType:
    """How to read and write one Hugging Face `model_type`."""

    read_config: Callable[[dict[str, Any]], ModelConfig]
    write_config: Callable[[ModelConfig], dict[str, Any]]  # config.json fields, bar model_type, dtype, token ids
    architecture: str  # the causal-LM class config.json names, for AutoModelForCausalLM
    names: Names
    prefix: str = "model."  # what *ForCausalLM puts before the base model's names
    transposed: frozenset[str] = frozenset()  # HF templates stored as (in, out)
    ignored: tuple[str, ...] = ()  # HF templates of buffers that hold no weights
    # HF template -> the order of its rows in mistura (ours = hf[rows]), for a config.json and its ModelConfig.
    row_orders: Callable[[dict[str, Any], ModelConfig], dict[str, torch.Tensor]] = lambda hf, config: {}
    # Prefixes of stored HF names that import passes over, for a config.json and its ModelConfig.
    passed_over: Callable[[dict[str, Any], ModelConfig], tuple[str, ...]] = lambda hf, config: ()


def _within(hf_prefix: str, prefix: str, names: dict[str, str]) -> dict[str, str]:
    """A sub-module's table placed under a prefix on each side."""
    return {hf_prefix + hf: prefix + ours for hf, ours in names.items()}


def _in_layers(hf_module: str, names: dict[str, str]) -> dict[str, str]:
    """An MLP's table (dense or MoE) placed in the MLP slot of every layer; Hugging Face
    names that slot `hf_module`."""
    return _within(f"model.layers.{{i}}.{hf_module}.", "blocks.{i}.mlp.", names)


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
            vocab_size=_require(hf, "vocab_size"),
            max_seq_len=_require(hf, "n_positions"),
            n_layer=_require(hf, "n_layer"),
            d_model=d_model,
            n_head=_require(hf, "n_head"),
            d_ff=hf.get("n_inner") or 4 * d_model,
            mlp=GPT2_MLPS[hf.get("activation_function", "gelu_new")],
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position="learned",
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    )


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
            **_deepseek_v3_rope(hf),
            mla=mla,
            first_dense_layers=hf["first_k_dense_replace"] if sparse else 0,
            moe=deepseek_v3_moe_fields(hf) if sparse else None,
        )
    )


def _deepseek_v3_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, and with rope_type 'yarn' the `YaRNConfig` fields, as Hugging Face's `_compute_yarn_parameters`
    and DeepseekV3Attention's softmax scale read them."""
    rope = _rope_parameters(hf)
    if rope["rope_type"] == "default":
        return dict(rope_theta=rope["rope_theta"])
    if rope["rope_type"] != "yarn":
        raise ConfigError(
            f"deepseek_v3 config: RoPE scaling {rope['rope_type']!r} is not supported "
            "(plain RoPE, rope_type 'default', or 'yarn')"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"deepseek_v3 config: partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
    if rope.get("factor") is None:
        raise ConfigError("deepseek_v3 config: YaRN's rope_parameters lack its 'factor'")
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
    dr = mla.qk_rope_head_dim
    pairs = torch.cat((torch.arange(0, dr, 2), torch.arange(1, dr, 2)))  # (D_rope,)
    head = torch.cat((torch.arange(mla.qk_nope_head_dim), mla.qk_nope_head_dim + pairs))  # (D_nope + D_rope,)
    query = (torch.arange(config.n_head)[:, None] * mla.qk_head_dim + head).flatten()  # (H * (D_nope + D_rope),)
    latent = torch.cat((torch.arange(mla.kv_lora_rank), mla.kv_lora_rank + pairs))  # (r + D_rope,)
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
        vocab_size=_require(hf, "vocab_size"),
        max_seq_len=_require(hf, "max_position_embeddings"),
        n_layer=_require(hf, "num_hidden_layers"),
        d_model=_require(hf, "hidden_size"),
        n_head=_require(hf, "num_attention_heads"),
        d_ff=_require(hf, "intermediate_size"),
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope",
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


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


def _gpt2_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_len,
        n_layer=config.n_layer,
        n_embd=config.d_model,
        n_head=config.n_head,
        n_inner=config.d_ff,
        activation_function="gelu" if config.mlp == "gelu" else "gelu_new",
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attn_pdrop=config.attn_dropout,
        resid_pdrop=config.resid_dropout,
        embd_pdrop=config.resid_dropout,
    )


def _llama_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(_llama_hf_fields(config), attention_bias=config.bias, mlp_bias=config.bias)


def _mistral_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(_llama_hf_fields(config), sliding_window=None)


def _qwen2_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(_llama_hf_fields(config), use_sliding_window=False)


def _mixtral_hf(config: ModelConfig) -> dict[str, Any]:
    moe = _experts(config, "mixtral")
    return dict(
        _llama_hf_fields(config),
        intermediate_size=moe.d_expert,
        num_local_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        sliding_window=None,
    )


def _qwen2_moe_hf(config: ModelConfig) -> dict[str, Any]:
    fields = _qwen_moe_hf_fields(config, "qwen2_moe")
    return dict(fields, shared_expert_intermediate_size=config.moe.d_shared, qkv_bias=config.qkv_bias)


def _qwen3_moe_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(_qwen_moe_hf_fields(config, "qwen3_moe"), attention_bias=False)


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
        rope_parameters=_deepseek_v3_rope_hf(config),
        rope_theta=config.rope_theta,
        rope_interleave=False,
        first_k_dense_replace=kinds.index("moe") if "moe" in kinds else config.n_layer,
        num_nextn_predict_layers=0,
    )
    return fields if config.moe is None else fields | _deepseek_v3_moe_hf(config.moe)


def _deepseek_v3_rope_hf(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `_deepseek_v3_rope`: plain RoPE, or YaRN under the names Hugging Face reads."""
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
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_seq_len,
        num_hidden_layers=config.n_layer,
        hidden_size=config.d_model,
        num_attention_heads=config.n_head,
        intermediate_size=config.d_ff,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_dropout=config.attn_dropout,
    )


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
    if config.moe is None:
        raise ConfigError(f"Hugging Face's {model_type} has experts; this config has none (no model.moe)")
    return config.moe


def model_type_for(config: ModelConfig) -> str:
    """The Hugging Face model_type with `config`'s architecture, told by its structure alone.

    Latent attention is DeepSeek-V3's. Learned positions are GPT-2's. With RoPE, a dense
    model is Llama's, or Qwen2's when only q, k and v have biases; a model with experts is
    Qwen2-MoE's when a gate scales its shared expert, Qwen3-MoE's with q/k norms, Mixtral's
    otherwise. The choice may still miss a feature: `mistura.convert.hf.hf_config` checks.
    """
    if config.mla is not None:
        return "deepseek_v3"
    if config.position == "learned":
        return "gpt2"
    if set(config.layer_mlp) == {"dense"}:
        return "qwen2" if config.qkv_bias and not config.bias else "llama"
    if config.moe.shared_gate:
        return "qwen2_moe"
    return "qwen3_moe" if config.qk_norm else "mixtral"


MODEL_TYPES: dict[str, HFModelType] = {
    "gpt2": HFModelType(
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
    "llama": HFModelType(
        read_config=_llama_config,
        write_config=_llama_hf,
        architecture="LlamaForCausalLM",
        names=LLAMA_NAMES,
        ignored=("model.layers.{i}.self_attn.rotary_emb.inv_freq",),  # old checkpoints saved it
    ),
    "mistral": HFModelType(
        read_config=_mistral_config,
        write_config=_mistral_hf,
        architecture="MistralForCausalLM",
        names=LLAMA_NAMES,
    ),
    "qwen2": HFModelType(
        read_config=_qwen2_config,
        write_config=_qwen2_hf,
        architecture="Qwen2ForCausalLM",
        names=LLAMA_NAMES,
    ),
    "mixtral": HFModelType(
        read_config=_mixtral_config,
        write_config=_mixtral_hf,
        architecture="MixtralForCausalLM",
        names=LLAMA_BODY_NAMES | _in_layers("block_sparse_moe", MIXTRAL_MOE_NAMES),
    ),
    "qwen2_moe": HFModelType(
        read_config=_qwen2_moe_config,
        write_config=_qwen2_moe_hf,
        architecture="Qwen2MoeForCausalLM",
        names=LLAMA_NAMES | _in_layers("mlp", QWEN2_MOE_NAMES),
    ),
    "qwen3_moe": HFModelType(
        read_config=_qwen3_moe_config,
        write_config=_qwen3_moe_hf,
        architecture="Qwen3MoeForCausalLM",
        names=LLAMA_NAMES | _in_layers("mlp", ROUTED_EXPERTS_NAMES),
    ),
    "deepseek_v3": HFModelType(
        read_config=_deepseek_v3_config,
        write_config=_deepseek_v3_hf,
        architecture="DeepseekV3ForCausalLM",
        names=DEEPSEEK_V3_NAMES,
        row_orders=_deepseek_v3_rows,
        passed_over=_deepseek_v3_mtp,
    ),
}


def find_model_type(name: Any) -> HFModelType:
    """The entry of MODEL_TYPES for `name`, or a ConfigError listing the supported ones."""
    if name is None:
        raise ConfigError("config.json names no model_type: not a Hugging Face model config")
    if name not in MODEL_TYPES:
        raise ConfigError(
            f"Hugging Face model_type {name!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return MODEL_TYPES[name]
