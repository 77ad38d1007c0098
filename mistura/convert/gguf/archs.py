"""The llama.cpp architectures that run mistura models: name tables, the checks on export, metadata both ways.

Each `Arch` holds a name table (names.py) whose every GGUF name is a tensor llama.cpp's
architecture knows (`gguf.MODEL_TENSORS`), its export checks, how its metadata reads back
(metadata.py) and, where llama.cpp lays rotary rows out otherwise, their order (layout.py).

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
Hugging Face's config has an option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from mistura.config import ModelConfig
from mistura.convert.families import model_type_for
from mistura.convert.gguf.layout import llama_rows, mla_rows
from mistura.convert.gguf.metadata import (
    Metadata,
    deepseek2_fields,
    gpt2_fields,
    llama_fields,
    mixtral_fields,
    qwen_moe_fields,
)
from mistura.convert.gguf.names import DEEPSEEK2, EXPERTS, GPT2, LLAMA_BODY, SHARED_EXPERT, SWIGLU
from mistura.convert.hf import hf_config
from mistura.convert.mapping import Names
from mistura.errors import ConfigError


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
    check_yarn(config, arch.name)
    return arch


def rotary_rows(config: ModelConfig, arch: Arch) -> dict[str, torch.Tensor]:
    """The row order of the query and key weights (and biases) in mistura: ours = gguf[rows].

    llama.cpp's `llama` and `deepseek2` rotate channel pairs (2i, 2i + 1) of each head,
    mistura (i, i + D/2): a head's even rotary rows first, then its odd ones, turns one into
    the other. Queries and keys move alike, so every attention score stays the same.
    """
    return arch.rows(config) if arch.rows is not None else {}


def check_yarn(config: ModelConfig, arch: str) -> None:
    """The YaRN llama.cpp computes (of the Hugging Face types, only deepseek_v3 has YaRN): the ramp between beta_fast
    32 and beta_slow 1 turns, rounded out to whole pairs, and in deepseek2 the softmax scaled by
    mscale(factor, mscale_all_dim)^2 with cos/sin left as they are, that is mscale == mscale_all_dim."""
    yarn = config.yarn
    if yarn is None:
        return
    fixed = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": None}
    for name, value in fixed.items():
        if getattr(yarn, name) != value:
            raise ConfigError(
                f"llama.cpp computes YaRN with {name} {value}; this model has model.yarn.{name} {getattr(yarn, name)}"
            )
    if not (yarn.mscale_all_dim and yarn.mscale == yarn.mscale_all_dim):
        raise ConfigError(
            f"llama.cpp's {arch} computes YaRN with mscale == mscale_all_dim > 0; this model has model.yarn."
            f"mscale {yarn.mscale} and mscale_all_dim {yarn.mscale_all_dim}"
        )


def _check_deepseek2(config: ModelConfig) -> None:
    """What Hugging Face's deepseek_v3 expresses and llama.cpp's deepseek2 does not compute."""
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


ARCHS: dict[str, Arch] = {
    # Hugging Face's mixtral, which `arch_for` asks first, has llama.cpp's experts: in every layer, top-k renormalised.
    "llama": Arch("llama", LLAMA_BODY | SWIGLU | EXPERTS, lambda config: None, mixtral_fields, rows=llama_rows),
    "qwen2": Arch("qwen2", LLAMA_BODY | SWIGLU, lambda config: None, llama_fields),
    "qwen2moe": Arch(
        "qwen2moe",
        LLAMA_BODY | EXPERTS | SHARED_EXPERT,
        lambda config: _check_all_experts(config, "qwen2moe", norm_topk=False),
        qwen_moe_fields(norm_topk=False),
        needs_output=True,
    ),
    "qwen3moe": Arch(
        "qwen3moe",
        LLAMA_BODY | EXPERTS,
        lambda config: _check_all_experts(config, "qwen3moe", norm_topk=True),
        qwen_moe_fields(norm_topk=True),
    ),
    "gpt2": Arch("gpt2", GPT2, _check_gpt2, gpt2_fields),
    "deepseek2": Arch("deepseek2", DEEPSEEK2, _check_deepseek2, deepseek2_fields, rows=mla_rows),
}

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
