"""The llama.cpp architectures that run mistura models: name tables, the checks on export, metadata both ways.

Each `Arch` holds a name table from GGUF tensor names to mistura names (`mapping.Names`,
`{i}` for the layer), read by `mapping.TensorMap` as the Hugging Face tables are. GGUF
names come from the `gguf` package's own table (`gguf.TENSOR_NAMES`), and every one of
them is a tensor llama.cpp's architecture knows (`gguf.MODEL_TENSORS`). A GGUF tensor's
numpy shape is PyTorch's (out, in): nothing is transposed. Experts are stacked on both
sides, (E, out, in).

| mistura model | Hugging Face type | llama.cpp arch |
| --- | --- | --- |
| dense Llama / Mistral | llama, mistral | llama |
| dense, biases on q/k/v only | qwen2 | qwen2 |
| learned positions | gpt2 | gpt2 |
| softmax top-k experts in every layer | mixtral | llama (with experts) |
| + Qwen2-MoE's gated shared expert | qwen2_moe | qwen2moe |
| + Qwen3's q/k norms | qwen3_moe | qwen3moe |
| latent attention, DeepSeekMoE after dense layers | deepseek_v3 | deepseek2 |

`arch_for` first asks `mistura.convert.hf.hf_config` whether the Hugging Face model type
expresses the model (which refuses collaborative experts, the adaptive RMSNorm, logit
soft-capping, ...), then checks what llama.cpp's code for the architecture fixes where
Hugging Face's config has an option. `llama` and `deepseek2` pair rotary channels
(2i, 2i + 1), mistura and the Qwen architectures (i, i + D/2): their rotary query and key
rows are permuted (`rotary_rows`), as llama.cpp's own converter permutes Hugging Face's
Llama (DeepSeek's checkpoints are stored interleaved already).

`deepseek2` runs latent attention absorbed, as mistura's `LatentCache` path does: it
caches the latent and the rotary key, and reads kv_b_proj as two per-head tensors
(`stored_tensors`), attn_k_b for the queries and attn_v_b for the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from mistura.config import ModelConfig
from mistura.convert.families import model_type_for
from mistura.convert.hf import hf_config
from mistura.convert.mapping import Names
from mistura.errors import CheckpointError, ConfigError

T = gguf.MODEL_TENSOR
K = gguf.Keys


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


def _name(tensor: gguf.MODEL_TENSOR, suffix: str = "weight") -> str:
    """A GGUF tensor name, `{i}` for the layer: _name(T.ATTN_Q, "bias") == "blk.{i}.attn_q.bias"."""
    return f"{gguf.TENSOR_NAMES[tensor].format(bid='{i}')}.{suffix}"


def _weight_and_bias(tensor: gguf.MODEL_TENSOR, ours: str) -> dict[str, str]:
    """A linear or norm's weight and bias; the bias only matches a model that has one."""
    return {_name(tensor, kind): f"{ours}.{kind}" for kind in ("weight", "bias")}


_EDGES: Names = {
    _name(T.TOKEN_EMBD): "tok_emb.weight",
    _name(T.OUTPUT_NORM): "norm.weight",
    _name(T.OUTPUT): "lm_head.weight",
}

_NORMS: Names = {_name(T.ATTN_NORM): "blocks.{i}.attn_norm.weight", _name(T.FFN_NORM): "blocks.{i}.mlp_norm.weight"}

# Llama's attention and norms; the biases and q/k norms only match the models that have them.
_LLAMA_BODY: Names = (
    _EDGES
    | _NORMS
    | _weight_and_bias(T.ATTN_Q, "blocks.{i}.attn.q_proj")
    | _weight_and_bias(T.ATTN_K, "blocks.{i}.attn.k_proj")
    | _weight_and_bias(T.ATTN_V, "blocks.{i}.attn.v_proj")
    | _weight_and_bias(T.ATTN_OUT, "blocks.{i}.attn.o_proj")
    | {_name(T.ATTN_Q_NORM): "blocks.{i}.attn.q_norm.weight", _name(T.ATTN_K_NORM): "blocks.{i}.attn.k_norm.weight"}
)

_SWIGLU: Names = (
    _weight_and_bias(T.FFN_GATE, "blocks.{i}.mlp.gate_proj")
    | _weight_and_bias(T.FFN_UP, "blocks.{i}.mlp.up_proj")
    | _weight_and_bias(T.FFN_DOWN, "blocks.{i}.mlp.down_proj")
)

_EXPERTS: Names = {
    _name(T.FFN_GATE_INP): "blocks.{i}.mlp.router.gate.weight",
    _name(T.FFN_GATE_EXP): "blocks.{i}.mlp.experts.gate_proj",  # (E, d_expert, d_model)
    _name(T.FFN_UP_EXP): "blocks.{i}.mlp.experts.up_proj",
    _name(T.FFN_DOWN_EXP): "blocks.{i}.mlp.experts.down_proj",  # (E, d_model, d_expert)
}

_SHARED_SWIGLU: Names = {
    _name(T.FFN_GATE_SHEXP): "blocks.{i}.mlp.shared.gate_proj.weight",
    _name(T.FFN_UP_SHEXP): "blocks.{i}.mlp.shared.up_proj.weight",
    _name(T.FFN_DOWN_SHEXP): "blocks.{i}.mlp.shared.down_proj.weight",
}
_SHARED_EXPERT: Names = {_name(T.FFN_GATE_INP_SHEXP): "blocks.{i}.mlp.shared_gate.weight"} | _SHARED_SWIGLU

# DeepSeek-V2/V3: latent attention (queries from q_proj, or through the q_a/q_b bottleneck; only the
# path the model has matches), dense SwiGLU MLPs first, then routed experts with their selection
# bias and the shared experts as one SwiGLU.
_DEEPSEEK2: Names = (
    _EDGES
    | _NORMS
    | {
        _name(T.ATTN_Q): "blocks.{i}.attn.q_proj.weight",
        _name(T.ATTN_Q_A): "blocks.{i}.attn.q_a_proj.weight",
        _name(T.ATTN_Q_A_NORM): "blocks.{i}.attn.q_a_norm.weight",
        _name(T.ATTN_Q_B): "blocks.{i}.attn.q_b_proj.weight",
        _name(T.ATTN_KV_A_MQA): "blocks.{i}.attn.kv_a_proj.weight",  # (r + D_rope, d_model)
        _name(T.ATTN_KV_A_NORM): "blocks.{i}.attn.kv_a_norm.weight",
        _name(T.ATTN_KV_B): "blocks.{i}.attn.kv_b_proj.weight",  # written as attn_k_b and attn_v_b
        _name(T.ATTN_OUT): "blocks.{i}.attn.o_proj.weight",
        _name(T.FFN_EXP_PROBS_B, "bias"): "blocks.{i}.mlp.router.expert_bias",
    }
    | _SWIGLU
    | _EXPERTS
    | _SHARED_SWIGLU
)
# The name ends that `stored_tensors` splits and `joined_tensor` joins.
_KV_B, _K_B, _V_B = (_name(t).removeprefix("blk.{i}.") for t in (T.ATTN_KV_B, T.ATTN_K_B, T.ATTN_V_B))

_GPT2: Names = (
    _EDGES
    | {_name(T.POS_EMBD): "pos_emb.weight", _name(T.OUTPUT_NORM, "bias"): "norm.bias"}
    | _weight_and_bias(T.ATTN_NORM, "blocks.{i}.attn_norm")
    | {
        _name(T.ATTN_QKV, kind): tuple(f"blocks.{{i}}.attn.{p}_proj.{kind}" for p in "qkv")
        for kind in ("weight", "bias")
    }
    | _weight_and_bias(T.ATTN_OUT, "blocks.{i}.attn.o_proj")
    | _weight_and_bias(T.FFN_NORM, "blocks.{i}.mlp_norm")
    | _weight_and_bias(T.FFN_UP, "blocks.{i}.mlp.up_proj")
    | _weight_and_bias(T.FFN_DOWN, "blocks.{i}.mlp.down_proj")
)


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture as mistura writes and reads it."""

    name: str  # general.architecture
    names: Names  # GGUF template -> mistura template(s)
    check: Callable[[ModelConfig], None]  # ConfigError for what llama.cpp's code fixes otherwise
    config: Callable[[Metadata, set[str]], dict[str, Any]]  # metadata, tensor names -> ModelConfig fields
    rows: Callable[[ModelConfig], dict[str, torch.Tensor]] | None = None  # rotary rows in interleaved pairs
    needs_output: bool = False  # llama.cpp requires output.weight even where the embeddings are tied

    @property
    def tensors(self) -> set[str]:
        """The GGUF tensor names llama.cpp's architecture knows, `{i}` for the layer, without suffix."""
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.name)
        return {gguf.TENSOR_NAMES[t].format(bid="{i}") for t in gguf.MODEL_TENSORS[arch]}


def arch_for(config: ModelConfig) -> Arch:
    """The llama.cpp architecture that computes what `config` computes, or a ConfigError naming what none has."""
    model_type = model_type_for(config)
    try:
        hf_config(config, model_type)
    except ConfigError as err:
        raise ConfigError(f"cannot export to GGUF: {err}") from err
    arch = ARCHS[_ARCH_OF_MODEL_TYPE[model_type]]
    arch.check(config)
    return arch


def rotary_rows(config: ModelConfig, arch: Arch) -> dict[str, torch.Tensor]:
    """The row order of the query and key weights (and biases) in mistura: ours = gguf[rows].

    llama.cpp's `llama` and `deepseek2` rotate channel pairs (2i, 2i + 1) of each head,
    mistura (i, i + D/2): a head's even rotary rows first, then its odd ones, turns one into
    the other. Queries and keys move alike, so every attention score stays the same.
    """
    return arch.rows(config) if arch.rows is not None else {}


def _interleaved(heads: int, plain: int, rotary: int) -> torch.Tensor:
    """Rows of `heads` heads of `plain` channels without position then `rotary` rotary ones, in mistura's
    order: each head's unrotated rows, then its even rotary rows, then its odd ones."""
    pairs = torch.cat((torch.arange(0, rotary, 2), torch.arange(1, rotary, 2)))  # (rotary,)
    head = torch.cat((torch.arange(plain), plain + pairs))  # (plain + rotary,)
    return (torch.arange(heads)[:, None] * (plain + rotary) + head).flatten()  # (heads * (plain + rotary),)


def _llama_rows(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every query and key channel rotates."""
    q, k = (_interleaved(heads, 0, config.head_dim) for heads in (config.n_head, config.n_kv_head))
    return {_name(t, kind): r for t, r in ((T.ATTN_Q, q), (T.ATTN_K, k)) for kind in ("weight", "bias")}


def _mla_rows(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The last qk_rope_head_dim rows of each query head, and of kv_a_proj (after the latent) the shared key's."""
    mla = config.mla
    query = _interleaved(config.n_head, mla.qk_nope_head_dim, mla.qk_rope_head_dim)
    latent = _interleaved(1, mla.kv_lora_rank, mla.qk_rope_head_dim)
    return {_name(T.ATTN_Q): query, _name(T.ATTN_Q_B): query, _name(T.ATTN_KV_A_MQA): latent}


def stored_tensors(config: ModelConfig, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The GGUF tensors that hold the mapped tensor `name`: itself, except `deepseek2`'s attn_kv_b.

    llama.cpp's deepseek2 reads kv_b_proj (H * (D_nope + D_v), r) per head as it absorbs it:
    attn_k_b (H, r, D_nope), each head's key rows transposed to take its query into latent
    space, and attn_v_b (H, D_v, r), its value rows. On a meta tensor: the shapes alone.
    """
    if not name.endswith(_KV_B):
        return {name: tensor}
    mla = config.mla
    kv = tensor.view(config.n_head, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
    k, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=1)
    return {name.replace(_KV_B, _K_B): k.transpose(1, 2).contiguous(), name.replace(_KV_B, _V_B): v.contiguous()}


def joined_tensor(config: ModelConfig, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The inverse of `stored_tensors`: the mapped tensor `name` from the GGUF tensors `read` returns."""
    if not name.endswith(_KV_B):
        return read(name)
    k, v = read(name.replace(_KV_B, _K_B)).transpose(1, 2), read(name.replace(_KV_B, _V_B))
    return torch.cat((k, v), dim=1).reshape(-1, config.mla.kv_lora_rank)


def joined_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A file's tensor shapes with each pair of attn_k_b and attn_v_b joined back as attn_kv_b."""
    pairs = [name for name in shapes if name.endswith(_K_B) and name.replace(_K_B, _V_B) in shapes]
    parts = set(pairs) | {name.replace(_K_B, _V_B) for name in pairs}
    kept = {name: shape for name, shape in shapes.items() if name not in parts}

    def meta(name: str) -> torch.Tensor:
        return torch.empty(shapes[name], device="meta")

    joined = (name.replace(_K_B, _KV_B) for name in pairs)
    return kept | {name: tuple(joined_tensor(config, name, meta).shape) for name in joined}


def write_metadata(writer: gguf.GGUFWriter, config: ModelConfig, arch: Arch) -> None:
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
    writer.add_feed_forward_length(moe.d_expert if moe is not None and arch.name == "llama" else config.d_ff)
    if config.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(config.norm_eps)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    if config.position == "rope":
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)  # with latent attention, qk_rope_head_dim
    if moe is not None:
        writer.add_expert_count(moe.n_experts)
        writer.add_expert_used_count(moe.top_k)
        writer.add_expert_feed_forward_length(moe.d_expert)
        if moe.d_shared:
            writer.add_expert_shared_feed_forward_length(moe.d_shared)
    if arch.name == "deepseek2":
        _write_deepseek_moe(writer, config)


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
    writer.add_expert_gating_func(_GATING[moe.scoring])
    if moe.topk_groups < moe.n_groups:  # all groups eligible: no limit, and llama.cpp wants none written
        writer.add_expert_group_count(moe.n_groups)
        writer.add_expert_group_used_count(moe.topk_groups)


def _check_deepseek2(config: ModelConfig) -> None:
    """What Hugging Face's deepseek_v3 expresses and llama.cpp's deepseek2 does not compute."""
    if config.yarn is not None:
        raise ConfigError(
            "GGUF export of YaRN-extended RoPE (model.yarn) to llama.cpp's deepseek2 is not supported: "
            "its YaRN temperature and ramp are not checked against mistura's"
        )
    if config.moe is not None and not config.moe.d_shared:
        raise ConfigError("llama.cpp's deepseek2 always runs shared experts; this model has moe.d_shared 0")


def _check_all_experts(config: ModelConfig, arch: str, norm_topk: bool) -> None:
    """llama.cpp's Qwen-MoE architectures have experts in every layer and fix the top-k renormalisation."""
    dense = [i for i, kind in enumerate(config.layer_mlp) if kind != "moe"]
    if dense:
        raise ConfigError(f"llama.cpp's {arch} has experts in every layer; layers {dense} are dense")
    if config.moe.norm_topk != norm_topk:
        raise ConfigError(
            f"llama.cpp's {arch} {'renormalises' if norm_topk else 'never renormalises'} the top-k expert "
            f"weights; this model has moe.norm_topk {str(config.moe.norm_topk).lower()}"
        )
    if config.moe.route_scale != 1.0:
        raise ConfigError(
            f"llama.cpp's {arch} does not scale its routed experts (moe.route_scale={config.moe.route_scale})"
        )


def _check_gpt2(config: ModelConfig) -> None:
    """llama.cpp's gpt2 uses GELU's tanh approximation."""
    if config.mlp != "gelu_tanh":
        raise ConfigError(f"llama.cpp's gpt2 computes GELU's tanh approximation; this model has mlp {config.mlp!r}")


def _common_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    """The fields every architecture stores alike."""
    return dict(
        name=meta.get(K.General.NAME, "gguf"),
        max_seq_len=meta[K.LLM.CONTEXT_LENGTH],
        n_layer=meta[K.LLM.BLOCK_COUNT],
        d_model=meta[K.LLM.EMBEDDING_LENGTH],
        n_head=meta[K.Attention.HEAD_COUNT],
        tie_embeddings=_name(T.OUTPUT) not in tensors,
    )


def _llama_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    """Llama, and the Qwen architectures with RoPE in halves; MoE fields where expert_count is set."""
    block = _name(T.ATTN_OUT, "bias").format(i=0)
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
        qkv_bias=_name(T.ATTN_Q, "bias").format(i=0) in tensors,
        qk_norm=_name(T.ATTN_Q_NORM).format(i=0) in tensors,
    )
    if meta.get(K.LLM.EXPERT_COUNT):
        fields["moe"] = dict(n_experts=meta[K.LLM.EXPERT_COUNT], top_k=meta[K.LLM.EXPERT_USED_COUNT])
    return fields


def _mixtral_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    fields = _llama_fields(meta, tensors)
    if "moe" in fields:
        fields["moe"] |= dict(d_expert=meta[K.LLM.FEED_FORWARD_LENGTH], norm_topk=True)
    return fields


def _qwen_moe_fields(norm_topk: bool) -> Callable[[Metadata, set[str]], dict[str, Any]]:
    def fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
        result = _llama_fields(meta, tensors)
        if "moe" not in result:
            raise CheckpointError("a Qwen-MoE GGUF file without expert_count")
        result["moe"] |= dict(d_expert=meta[K.LLM.EXPERT_FEED_FORWARD_LENGTH], norm_topk=norm_topk)
        if meta.get(K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH):
            result["moe"] |= dict(d_shared=meta[K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH], shared_gate=True)
        return result

    return fields


def _deepseek2_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    """Latent attention as `_write_mla` writes it, and DeepSeekMoE blocks after the leading dense layers."""
    if meta.get(K.Attention.KEY_LENGTH_MLA) is None:
        raise ConfigError("a deepseek2 GGUF file without attention.key_length_mla (llama.cpp's legacy layout)")
    rope = meta[K.Rope.DIMENSION_COUNT]
    fields = dict(
        _common_fields(meta, tensors),
        d_ff=meta[K.LLM.FEED_FORWARD_LENGTH],
        norm_eps=meta[K.Attention.LAYERNORM_RMS_EPS],
        rope_theta=meta.get(K.Rope.FREQ_BASE, 10000.0),
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
        scoring = {kind: name for name, kind in _GATING.items()}.get(gating)
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


def _gpt2_fields(meta: Metadata, tensors: set[str]) -> dict[str, Any]:
    return dict(
        _common_fields(meta, tensors),
        d_ff=meta[K.LLM.FEED_FORWARD_LENGTH],
        mlp="gelu_tanh",
        norm="layernorm",
        norm_eps=meta[K.Attention.LAYERNORM_EPS],
        position="learned",
        bias=True,
    )


ARCHS: dict[str, Arch] = {
    # Hugging Face's mixtral, which `arch_for` asks first, has llama.cpp's experts: in every layer, top-k renormalised.
    "llama": Arch("llama", _LLAMA_BODY | _SWIGLU | _EXPERTS, lambda config: None, _mixtral_fields, rows=_llama_rows),
    "qwen2": Arch("qwen2", _LLAMA_BODY | _SWIGLU, lambda config: None, _llama_fields),
    "qwen2moe": Arch(
        "qwen2moe",
        _LLAMA_BODY | _EXPERTS | _SHARED_EXPERT,
        lambda config: _check_all_experts(config, "qwen2moe", norm_topk=False),
        _qwen_moe_fields(norm_topk=False),
        needs_output=True,
    ),
    "qwen3moe": Arch(
        "qwen3moe",
        _LLAMA_BODY | _EXPERTS,
        lambda config: _check_all_experts(config, "qwen3moe", norm_topk=True),
        _qwen_moe_fields(norm_topk=True),
    ),
    "gpt2": Arch("gpt2", _GPT2, _check_gpt2, _gpt2_fields),
    "deepseek2": Arch("deepseek2", _DEEPSEEK2, _check_deepseek2, _deepseek2_fields, rows=_mla_rows),
}

_GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}

_ARCH_OF_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gpt2": "gpt2",
    "deepseek_v3": "deepseek2",
}


def find_arch(name: str) -> Arch:
    """The `Arch` of a GGUF file's general.architecture, or a ConfigError listing those supported."""
    if name not in ARCHS:
        raise ConfigError(f"GGUF architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[name]
