"""Model configuration: one validated dataclass and the named presets.

A preset is a dict of overrides on top of the dataclass defaults, with its source in a
comment. `ModelConfig.from_name("llama-tiny", n_layer=2)` builds one; `from_dict`
builds one from YAML/JSON and rejects unknown keys. `__post_init__` resolves the
derived sizes (kv heads, head width, MLP width, per-layer MLP kinds), so the
`config.json` saved next to every checkpoint is explicit and self-contained.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mistura.errors import ConfigError
from mistura.fields import from_dict

LayerKind = Literal["dense", "moe", "moc"]


@dataclass
class MoEConfig:
    """A Mixture-of-Experts MLP: a router sends each token to top_k of n_experts SwiGLU experts.

    One dataclass covers the family (the presets show each):
    - Switch/Qwen top-k: softmax scoring, optional renormalisation of the top-k weights,
      a capacity factor (None: dropless), the Switch balance loss and a router z-loss.
    - DeepSeekMoE: fine-grained experts plus always-on shared experts, softmax or sigmoid
      scoring, group-limited routing, a route scale, auxiliary-loss-free balancing by a
      per-expert selection bias, and a sequence-wise balance loss.
    - Collaborative experts (layer kind "moc", seed 003) use n_experts, top_k, d_expert,
      moc_heads and the balance/diversity weights.
    """

    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 512  # hidden width of each routed expert
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = False  # renormalise the selected weights to sum to one
    route_scale: float = 1.0  # multiplies the routed output (DeepSeek's routed_scaling_factor)
    capacity_factor: float | None = None  # training only; None: dropless
    n_groups: int = 1  # group-limited routing: experts split into n_groups ...
    topk_groups: int = 1  # ... and only the best topk_groups groups are eligible
    d_shared: int = 0  # hidden width of the always-on shared expert(s); 0: none
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    balance_bias_rate: float = 0.0  # aux-loss-free balancing: bias step after each optimizer step; 0: off
    aux_loss_weight: float = 0.0  # Switch balance loss: n_experts * sum_i f_i * P_i
    seq_aux_loss_weight: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    z_loss_weight: float = 0.0  # router z-loss: mean(logsumexp(logits)^2)
    entropy_weight: float = 0.0  # entropy regulariser: log(E) - H(mean routing distribution)
    moc_heads: int = 4  # collaborative experts: heads of the router self-attention and the fusion
    diversity_loss_weight: float = 0.0  # collaborative experts: 1 - entropy of fusion attention / log(k)

    def __post_init__(self) -> None:
        for name in ("n_experts", "top_k", "d_expert", "n_groups", "topk_groups", "moc_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.moe.{name}: must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.moe.top_k: {self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_experts % self.n_groups:
            raise ConfigError(f"model.moe.n_groups: {self.n_groups} groups do not divide n_experts={self.n_experts}")
        if self.topk_groups > self.n_groups:
            raise ConfigError(f"model.moe.topk_groups: {self.topk_groups} exceeds n_groups={self.n_groups}")
        if self.top_k > self.topk_groups * (self.n_experts // self.n_groups):
            raise ConfigError("model.moe.top_k: more experts than the eligible groups hold")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor: must be positive, got {self.capacity_factor}")
        if self.shared_gate and not self.d_shared:
            raise ConfigError("model.moe.shared_gate: needs a shared expert (d_shared > 0)")
        for name in ("balance_bias_rate", "aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight",
                     "entropy_weight", "diversity_loss_weight", "d_shared"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"model.moe.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3): keys and values expanded from one small latent per token.

    Each head's query is [q_nope (qk_nope_head_dim), q_rope (qk_rope_head_dim)]; its key is
    [k_nope, k_rope], where k_nope (and the value, v_head_dim) come from a kv_lora_rank latent
    and k_rope is one rotary key shared by all heads. Decoding caches only the latent and
    the rotary key: kv_lora_rank + qk_rope_head_dim values per token and layer.
    """

    q_lora_rank: int | None = None  # queries through a low-rank bottleneck; None: one q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128  # query/key channels without position information
    qk_rope_head_dim: int = 64  # rotary channels; the key's are shared across heads
    v_head_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.mla.{name}: must be >= 1, got {value}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.mla.qk_rope_head_dim: RoPE needs an even width, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class YaRNConfig:
    """YaRN context extension (Peng et al. 2023) of a RoPE model trained on original_max_seq_len tokens.

    Rotary frequencies that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), those that turn more than beta_fast times are kept,
    and a linear ramp blends the ones in between. cos/sin are multiplied by an attention
    factor, which by default is mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    with mscale(s, m) = 0.1 m ln(s) + 1, exactly as Hugging Face computes it. DeepSeek's
    MLA additionally multiplies its softmax scale by mscale(factor, mscale_all_dim)^2.
    """

    factor: float = 1.0
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0  # 0: the attention factor is mscale(factor, 1) and the softmax scale is unchanged
    attention_factor: float | None = None  # overrides the cos/sin factor derived from mscale
    truncate: bool = True  # round the blended band out to whole channels (Hugging Face's default)

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ConfigError(f"model.yarn.factor: must be >= 1, got {self.factor}")
        if self.original_max_seq_len < 1:
            raise ConfigError(f"model.yarn.original_max_seq_len: must be >= 1, got {self.original_max_seq_len}")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ConfigError(
                f"model.yarn.beta_fast: need 0 < beta_slow < beta_fast, got beta_slow={self.beta_slow}, "
                f"beta_fast={self.beta_fast}"
            )
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.yarn.{name}: must be >= 0, got {getattr(self, name)}")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ConfigError(f"model.yarn.attention_factor: must be positive, got {self.attention_factor}")


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only Transformer.

    Widths: `d_model` is the residual stream, each of the `n_head` query heads has
    `head_dim` channels, keys/values have `n_kv_head` heads (grouped-query attention
    when fewer than `n_head`), the MLP hidden layer has `d_ff` channels.

    With `mla` set, attention is Multi-head Latent Attention: every query head has its own
    key/value head (n_kv_head equals n_head), the head widths come from `mla`, and
    `head_dim` is the rotary width, mla.qk_rope_head_dim (as in Hugging Face's DeepSeek configs).
    """

    name: str = "custom"
    vocab_size: int = 8192
    max_seq_len: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (multi-head attention)
    head_dim: int | None = None  # None: d_model // n_head
    d_ff: int | None = None  # None: 4 * d_model (GELU) or ~8/3 * d_model (SwiGLU)
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "swiglu"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    adaptive_norm: bool = False  # RMSNorm with a learnable scalar gain alpha (seed 000)
    position: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    bias: bool = False
    tie_embeddings: bool = False
    logit_softcap: float | None = None  # logits -> c * tanh(logits / c)
    attn_dropout: float = 0.0  # on attention probabilities
    resid_dropout: float = 0.0  # on the embeddings and on each attention branch output
    mlp_dropout: float = 0.0  # on each MLP branch output
    init_std: float = 0.02
    scaled_init: bool = True  # residual output projections get init_std / sqrt(2 * n_layer)
    layer_mlp: tuple[LayerKind, ...] | None = None  # MLP kind per layer; None: all "dense" (or all moe)
    moe: MoEConfig | None = None  # the experts of "moe"/"moc" layers
    first_dense_layers: int = 0  # with moe set and layer_mlp None: this many dense layers first (DeepSeek)
    qkv_bias: bool | None = None  # biases on q/k/v only (Qwen2); None: same as bias
    qk_norm: bool = False  # RMSNorm on each query and key head before RoPE (Qwen3)
    mla: MLAConfig | None = None  # Multi-head Latent Attention instead of grouped-query attention
    yarn: YaRNConfig | None = None  # YaRN context extension of the rotary embedding

    def __post_init__(self) -> None:
        self._check_positive("vocab_size", "max_seq_len", "n_layer", "d_model", "n_head", "init_std")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mla is not None:
            self._check_mla()
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(
                    f"model.n_head: {self.n_head} heads do not divide d_model={self.d_model} "
                    "(choose a divisor or set head_dim explicitly)"
                )
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp != "swiglu" else _swiglu_width(self.d_model)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.layer_mlp is None:
            sparse = "moe" if self.moe is not None else "dense"
            self.layer_mlp = ("dense",) * min(self.first_dense_layers, self.n_layer) + (sparse,) * max(
                0, self.n_layer - self.first_dense_layers
            )
        self._check_positive("n_kv_head", "head_dim", "d_ff")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head: {self.n_kv_head} key/value heads do not divide n_head={self.n_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim: RoPE needs an even head width, got {self.head_dim}")
        if self.yarn is not None and self.position != "rope":
            raise ConfigError("model.yarn: YaRN extends rotary embeddings; set position: rope")
        if len(self.layer_mlp) != self.n_layer:
            raise ConfigError(f"model.layer_mlp: has {len(self.layer_mlp)} entries but n_layer={self.n_layer}")
        if self.moe is None and any(kind != "dense" for kind in self.layer_mlp):
            raise ConfigError("model.layer_mlp: 'moe'/'moc' layers need a model.moe section")
        if self.adaptive_norm and self.norm != "rmsnorm":
            raise ConfigError("model.adaptive_norm: only RMSNorm has an adaptive variant")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"model.logit_softcap: must be positive, got {self.logit_softcap}")
        for name in ("attn_dropout", "resid_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(self, name)}")

    def _check_mla(self) -> None:
        """MLA fixes what GQA leaves free: one key/value head per query head, rotary width, no biases."""
        if self.n_kv_head != self.n_head:
            raise ConfigError(
                f"model.n_kv_head: MLA gives every query head its own key/value head; "
                f"set n_kv_head={self.n_head} (n_head) or leave it out, got {self.n_kv_head}"
            )
        rope_dim = self.mla.qk_rope_head_dim
        if self.head_dim is None:
            self.head_dim = rope_dim
        elif self.head_dim != rope_dim:
            raise ConfigError(
                f"model.head_dim: with MLA it is the rotary width mla.qk_rope_head_dim={rope_dim}; "
                f"leave it out, got {self.head_dim}"
            )
        if self.position != "rope":
            raise ConfigError("model.position: MLA needs rotary embeddings (rope)")
        for name in ("bias", "qkv_bias"):
            if getattr(self, name):
                raise ConfigError(f"model.{name}: MLA projections have no biases (DeepSeek's have none); set it false")
        if self.qk_norm:
            raise ConfigError("model.qk_norm: MLA already normalises its latents; qk_norm applies to GQA only")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {value}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, optionally with some fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict; a `preset` key selects a preset that the other keys override."""
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            return cls.from_name(str(preset), **data)
        return from_dict(cls, data, "model")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read model config {path}: {err}") from err
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layer_mlp"] = list(self.layer_mlp)
        for section in ("moe", "mla", "yarn"):  # absent sections keep older config.json files unchanged
            if getattr(self, section) is None:
                del data[section]
        return data

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes cached per token over all layers (default: 2 bytes, bf16).

        GQA caches keys and values, 2 * n_kv_head * head_dim values per layer; MLA caches its
        latent and shared rotary key, kv_lora_rank + qk_rope_head_dim values per layer.
        """
        if self.mla is not None:
            return bytes_per_value * self.n_layer * (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim)
        return bytes_per_value * self.n_layer * 2 * self.n_kv_head * self.head_dim


def _swiglu_width(d_model: int, multiple_of: int = 64) -> int:
    """Llama's rule: 2/3 of 4 * d_model, rounded up to a multiple, keeps parameters equal to a 4x GELU MLP."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_GPT2 = dict(mlp="gelu_tanh", norm="layernorm", position="learned", bias=True, tie_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small, the 124M shape: https://huggingface.co/openai-community/gpt2/blob/main/config.json
    "gpt2-small": dict(_GPT2, vocab_size=50257, max_seq_len=1024, n_layer=12, d_model=768, n_head=12),
    # GPT-2 architecture at CPU scale (~5M parameters with an 8k vocabulary).
    "gpt2-baseline-tiny": dict(_GPT2, n_layer=4, d_model=256, n_head=4),
    # Seed 004's dense baseline: GPT-2 with RoPE, pre-LayerNorm, biases and a SwiGLU MLP of
    # hidden width 768, the expert width its Qwen-MoE runs keep for a fair comparison.
    "seed004-baseline": dict(
        norm="layernorm",
        position="rope",
        bias=True,
        tie_embeddings=True,
        mlp="swiglu",
        n_layer=6,
        d_model=256,
        n_head=8,
        d_ff=768,
    ),
    # Llama-style (seed 002): RoPE, RMSNorm, GQA, SwiGLU, no biases; ~4M parameters.
    "llama-tiny": dict(n_layer=4, d_model=256, n_head=8, n_kv_head=4, d_ff=704, tie_embeddings=True),
}

# Seed 004's Qwen-style MoE runs: the baseline's shape with every MLP replaced by top-k SwiGLU
# experts, a capacity factor and the Switch balance loss (weight 0.01). Expert widths keep the
# active parameters near the baseline's: top-1 experts as wide as its MLP (768), top-2 half as wide.
_SEED004 = PRESETS["seed004-baseline"]
# The CPU-scale DeepSeek body and routing shared by deepseek-moe-tiny and dragao-tiny.
_DEEPSEEK_TINY = dict(n_layer=6, d_model=256, n_head=8, d_ff=768, tie_embeddings=True, first_dense_layers=1)
_DEEPSEEK_TINY_MOE = dict(
    n_experts=16,
    top_k=3,
    scoring="sigmoid",
    norm_topk=True,
    n_groups=4,
    topk_groups=2,
    balance_bias_rate=0.01,
    seq_aux_loss_weight=1e-4,
)
PRESETS |= {
    "qwen-moe-4e-top1": dict(
        _SEED004, moe=dict(n_experts=4, top_k=1, d_expert=768, capacity_factor=1.0, aux_loss_weight=0.01)
    ),
    "qwen-moe-8e-top2": dict(
        _SEED004, moe=dict(n_experts=8, top_k=2, d_expert=384, capacity_factor=1.25, aux_loss_weight=0.01)
    ),
    "qwen-moe-6e-top1": dict(
        _SEED004, moe=dict(n_experts=6, top_k=1, d_expert=768, capacity_factor=1.1, aux_loss_weight=0.01)
    ),
    # DeepSeekMoE (seed 000) at CPU scale, Llama-style: a dense first layer, then 16 fine-grained
    # experts (3 active) in 4 groups (2 eligible per token), one shared expert, sigmoid scores,
    # auxiliary-loss-free balancing and a small sequence-wise balance loss.
    "deepseek-moe-tiny": dict(_DEEPSEEK_TINY, n_kv_head=4, moe=dict(_DEEPSEEK_TINY_MOE, d_expert=192, d_shared=192)),
    # Seed 003's collaborative experts (LunarisCodex-MoC) at CPU scale, Llama-style: every
    # MLP is a MoC layer of 4 experts, 2 fused per token. MoC runs all 4 experts for every
    # token: at width 192 they cost what seed 004's dense 768-wide MLP does, and the layer's
    # two attentions 2.7 times as much again (mistura/model/moe/moc.py counts it).
    "moc-tiny": dict(
        n_layer=6,
        d_model=256,
        n_head=8,
        n_kv_head=4,
        tie_embeddings=True,
        layer_mlp=("moc",) * 6,
        moe=dict(n_experts=4, top_k=2, d_expert=192, moc_heads=4, aux_loss_weight=0.01, diversity_loss_weight=0.01),
    ),
}

# DeepSeek-V2/V3 ("dragão", seed 000): MLA attention, DeepSeekMoE layers after a few dense
# ones, YaRN-extended RoPE, RMSNorm eps 1e-6, untied embeddings. Shapes are those of the
# public config.json files; d_shared = n_shared_experts * moe_intermediate_size. Every
# config says max_position_embeddings 163840 (4096 * YaRN factor 40) although DeepSeek
# announces 32K (V2-Lite) and 128K (V2, V3) of usable context; seed 000 asks for 16K
# (16B, 236B) and 128K (671B). The presets keep the configs' value.
_DEEPSEEK = dict(max_seq_len=163840, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False)
_DEEPSEEK_MLA = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
_DEEPSEEK_V2_YARN = dict(factor=40.0, original_max_seq_len=4096, mscale=0.707, mscale_all_dim=0.707)
# V2's configs train with a sequence-wise balance loss (aux_loss_alpha 0.001, seq_aux true).
_DEEPSEEK_V2_MOE = dict(scoring="softmax", norm_topk=False, seq_aux_loss_weight=0.001)
PRESETS |= {
    # DeepSeek-V2-Lite, 15.7B total / 2.4B active:
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
    "dragao-16b": dict(
        _DEEPSEEK,
        vocab_size=102400,
        n_layer=27,
        d_model=2048,
        n_head=16,
        d_ff=10944,
        first_dense_layers=1,
        mla=dict(_DEEPSEEK_MLA, q_lora_rank=None),
        moe=dict(_DEEPSEEK_V2_MOE, n_experts=64, top_k=6, d_expert=1408, d_shared=2 * 1408),
        yarn=_DEEPSEEK_V2_YARN,
    ),
    # DeepSeek-V2, 236B total / 21B active: https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json
    # V2 ranks its 8 device groups by their best expert score (topk_method group_limited_greedy);
    # mistura's router ranks groups by the sum of their two best (V3's rule), so routing differs.
    "dragao-236b": dict(
        _DEEPSEEK,
        vocab_size=102400,
        n_layer=60,
        d_model=5120,
        n_head=128,
        d_ff=12288,
        first_dense_layers=1,
        mla=dict(_DEEPSEEK_MLA, q_lora_rank=1536),
        moe=dict(
            _DEEPSEEK_V2_MOE,
            n_experts=160,
            top_k=6,
            d_expert=1536,
            d_shared=2 * 1536,
            n_groups=8,
            topk_groups=3,
            route_scale=16.0,
        ),
        yarn=_DEEPSEEK_V2_YARN,
    ),
    # DeepSeek-V3, 671B total / 37B active without its multi-token-prediction module:
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json; the balancing
    # rates (bias speed 0.001, sequence-wise loss 1e-4) are the V3 report's (arXiv:2412.19437).
    "dragao-671b": dict(
        _DEEPSEEK,
        vocab_size=129280,
        n_layer=61,
        d_model=7168,
        n_head=128,
        d_ff=18432,
        first_dense_layers=3,
        mla=dict(_DEEPSEEK_MLA, q_lora_rank=1536),
        moe=dict(
            n_experts=256,
            top_k=8,
            d_expert=2048,
            d_shared=2048,
            scoring="sigmoid",
            norm_topk=True,
            n_groups=8,
            topk_groups=4,
            route_scale=2.5,
            balance_bias_rate=0.001,
            seq_aux_loss_weight=1e-4,
        ),
        yarn=dict(factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0),
    ),
    # DeepSeek-V3's architecture at CPU scale: MLA with a query bottleneck, a dense first layer,
    # then 16 fine-grained experts (3 active) in 4 groups (2 eligible per token) plus a shared
    # one, sigmoid scores, auxiliary-loss-free balancing. No YaRN (set model.yarn to extend
    # the context). Embeddings are tied, as in the other CPU presets: at this width an untied
    # head would add a quarter to the model.
    "dragao-tiny": dict(
        _DEEPSEEK_TINY,
        norm_eps=1e-6,
        mla=dict(q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=dict(_DEEPSEEK_TINY_MOE, d_expert=64, d_shared=64),
    ),
}
