"""Compute-optimal sizing, Chinchilla-style (Hoffmann et al. 2022; seed 001, section 4).

Training a model of N active parameters on D tokens costs about C = 6 N D FLOPs (2 N per
token forward, 4 N backward). For a fixed C, loss is lowest near D = 20 N tokens, so

    N = sqrt(C / (6 * 20)),   D = 20 N.

Given any one of C, N or D, `plan` fills in the other two on that line and names the
preset whose active parameter count is nearest (in ratio) to N. For a MoE model N is
the active count: a token's FLOPs grow with the experts it uses, not with all of them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from mistura.config import PRESETS, ModelConfig
from mistura.errors import ConfigError

TOKENS_PER_PARAM = 20.0
FLOPS_PER_PARAM_TOKEN = 6.0


@dataclass(frozen=True)
class Plan:
    flops: float  # C, training FLOPs
    params: float  # N, active parameters
    tokens: float  # D, training tokens
    preset: str  # the preset nearest to N
    preset_params: int  # its active parameters


def plan(
    flops: float | None = None,
    tokens: float | None = None,
    params: float | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
) -> Plan:
    """The compute-optimal (C, N, D) from exactly one of them."""
    given = {
        name: value for name, value in (("flops", flops), ("tokens", tokens), ("params", params)) if value is not None
    }
    if len(given) != 1:
        raise ConfigError("give exactly one of --flops, --tokens or --params")
    ((name, value),) = given.items()
    if not math.isfinite(value) or value <= 0 or tokens_per_param <= 0:
        raise ConfigError(f"--{name} and --tokens-per-param must be positive finite numbers")
    if name == "flops":
        n = math.sqrt(value / (FLOPS_PER_PARAM_TOKEN * tokens_per_param))
    elif name == "tokens":
        n = value / tokens_per_param
    else:
        n = value
    d = tokens_per_param * n
    preset, preset_params = nearest_preset(n)
    return Plan(FLOPS_PER_PARAM_TOKEN * n * d, n, d, preset, preset_params)


@functools.cache
def preset_active_params() -> dict[str, int]:
    """Active parameters per token of every preset, counted on the meta device (no memory)."""
    from mistura.model import Transformer

    counts = {}
    with torch.device("meta"):
        for name in PRESETS:
            counts[name] = Transformer(ModelConfig.from_name(name)).parameter_counts()["active"]
    return counts


def nearest_preset(n_params: float) -> tuple[str, int]:
    """The preset whose active parameter count is closest to n_params in ratio."""
    counts = preset_active_params()
    name = min(counts, key=lambda p: abs(math.log(counts[p] / n_params)))
    return name, counts[name]


def describe(result: Plan) -> str:
    ratio = result.preset_params / result.params
    return "\n".join(
        [
            f"{'training compute C':<26} {result.flops:.3e} FLOPs  (C = 6 N D)",
            f"{'active parameters N':<26} {result.params:.3e}",
            f"{'training tokens D':<26} {result.tokens:.3e}  ({result.tokens / result.params:g} tokens per parameter)",
            f"{'nearest preset':<26} {result.preset} ({result.preset_params:,} active parameters, {ratio:.2f}x N)",
        ]
    )
