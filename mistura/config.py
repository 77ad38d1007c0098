"""Model configuration: one validated dataclass, and the named presets (mistura.presets) it builds.

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
from mistura.presets import PRESETS

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
        if not isinstance(data, dict):
            raise ConfigError(f"model: expected a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            return cls.from_name(str(preset), **data)
        return from_dict(cls, data, "model")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8 at all
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
