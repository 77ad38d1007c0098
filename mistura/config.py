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

LayerKind = Literal["dense"]


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only Transformer.

    Widths: `d_model` is the residual stream, each of the `n_head` query heads has
    `head_dim` channels, keys/values have `n_kv_head` heads (grouped-query attention
    when fewer than `n_head`), the MLP hidden layer has `d_ff` channels.
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
    layer_mlp: tuple[LayerKind, ...] | None = None  # MLP kind per layer; None: all "dense"

    def __post_init__(self) -> None:
        self._check_positive("vocab_size", "max_seq_len", "n_layer", "d_model", "n_head", "init_std")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(
                    f"model.n_head: {self.n_head} heads do not divide d_model={self.d_model} "
                    "(choose a divisor or set head_dim explicitly)"
                )
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp != "swiglu" else _swiglu_width(self.d_model)
        if self.layer_mlp is None:
            self.layer_mlp = ("dense",) * self.n_layer
        self._check_positive("n_kv_head", "head_dim", "d_ff")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head: {self.n_kv_head} key/value heads do not divide n_head={self.n_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim: RoPE needs an even head width, got {self.head_dim}")
        if len(self.layer_mlp) != self.n_layer:
            raise ConfigError(f"model.layer_mlp: has {len(self.layer_mlp)} entries but n_layer={self.n_layer}")
        if self.adaptive_norm and self.norm != "rmsnorm":
            raise ConfigError("model.adaptive_norm: only RMSNorm has an adaptive variant")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"model.logit_softcap: must be positive, got {self.logit_softcap}")
        for name in ("attn_dropout", "resid_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(self, name)}")

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
        return data

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of keys and values cached per token over all layers (default: 2 bytes, bf16)."""
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
