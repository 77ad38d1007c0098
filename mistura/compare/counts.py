"""What one token costs each model of a comparison, and matching those costs across runs.

Counts come from the model built on the meta device (no memory, no time):

    total                 every parameter (a tied head counted once)
    active                the parameters one token uses: a MoE layer's unchosen experts left out
    embedding             the lookup tables (tokens, learned positions)
    active_non_embedding  active, without the lookups (they cost no multiplication), but with a
                          tied table, which the output projection multiplies by

Training FLOPs per token, forward and backward. A multiply-add is 2 FLOPs and the backward
pass costs twice the forward, so each multiply-add of the forward pass costs 6 FLOPs in
training (Kaplan et al. 2020; Chinchilla's C = 6 N D):

    6 * active_non_embedding              every weight a token is multiplied by, once: the
                                          active parameters without the input lookup tables,
                                          a tied output projection (V x D) included
  + 6 * n_layer * T * n_head * (d_qk + d_v)
                                          attention: scores q.k and the sum of v over the full
                                          context T = max_seq_len (Kaplan's n_ctx term; the
                                          causal mask really halves it); d_qk = d_v = head_dim,
                                          or MLA's query/key and value head widths
  + for each collaborative (MoC) layer, which runs all E experts and two small attentions:
    6 * ((E - 1) * (router attention + answer score) + (K - 1) * fusion attention)
                                          their projections act on E and K rows per token,
                                          not one (the first term counted them once)
  + 12 * (E^2 + K^2) * D                  and their scores over E and K positions

Routers, shared experts, norms and biases are parameters like any other and sit in the first
term. Capacity dropping is ignored, so a capped MoE layer is counted at its upper bound.

Matching (`mistura compare --match active|flops`): each run after the first whose count is
off by more than MATCH_TOLERANCE has all its MLP widths (d_ff, the experts' d_expert and
d_shared) scaled by one factor. Both counts are affine in that factor, so two evaluations
find it; widths are then rounded to multiples of WIDTH_MULTIPLE (aligned rows for the grouped
matmul) and the result is checked.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mistura.config import ModelConfig
from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.model.moe import CollaborativeExperts
from mistura.plan import FLOPS_PER_PARAM_TOKEN

# --match option: (the count it matches, its name in messages)
MATCH_KEYS = {"active": ("active", "active parameters"), "flops": ("flops_per_token", "FLOPs per token")}
MATCH_TOLERANCE = 0.03
WIDTH_MULTIPLE = 8


def model_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts (Transformer.parameter_counts) and training FLOPs per token."""
    with torch.device("meta"):
        model = Transformer(config)
    counts = model.parameter_counts()
    return {**counts, "flops_per_token": training_flops_per_token(model, counts)}


def training_flops_per_token(model: Transformer, counts: dict[str, int]) -> int:
    """Forward + backward FLOPs of one token (the formula in the module docstring)."""
    cfg = model.config
    weights = counts["active_non_embedding"]  # multiply-adds by weights, per token
    d_qk, d_v = (cfg.mla.qk_head_dim, cfg.mla.v_head_dim) if cfg.mla is not None else (cfg.head_dim, cfg.head_dim)
    scores = cfg.n_layer * cfg.max_seq_len * cfg.n_head * (d_qk + d_v)  # multiply-adds in attention
    for module in model.modules():
        if isinstance(module, CollaborativeExperts):
            E, K = module.config.n_experts, module.config.top_k
            weights += (E - 1) * (_numel(module.router_attn) + _numel(module.score))
            weights += (K - 1) * _numel(module.fusion_attn)
            scores += 2 * (E**2 + K**2) * cfg.d_model
    return int(FLOPS_PER_PARAM_TOKEN * (weights + scores))


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def scale_mlp(config: ModelConfig, factor: float) -> ModelConfig:
    """The config with every MLP width (d_ff, d_expert, d_shared) times factor, rounded to WIDTH_MULTIPLE."""

    def width(w: int) -> int:
        return max(WIDTH_MULTIPLE, WIDTH_MULTIPLE * round(w * factor / WIDTH_MULTIPLE))

    moe = config.moe
    if moe is not None:
        shared = width(moe.d_shared) if moe.d_shared else 0
        moe = dataclasses.replace(moe, d_expert=width(moe.d_expert), d_shared=shared)
    return dataclasses.replace(config, d_ff=width(config.d_ff), moe=moe)


def match_model(config: ModelConfig, match: str, target: int, name: str) -> ModelConfig:
    """config with its MLP widths scaled so that its count `match` is within MATCH_TOLERANCE of target."""
    key, label = MATCH_KEYS[match]
    count = model_counts(config)[key]
    if abs(count / target - 1) <= MATCH_TOLERANCE:
        return config
    slope = 2 * (count - model_counts(scale_mlp(config, 0.5))[key])  # the count's growth per unit of factor
    fixed = count - slope  # what the rest of the model counts, at factor 0
    matched = scale_mlp(config, (target - fixed) / slope)
    got = model_counts(matched)[key]
    if abs(got / target - 1) > MATCH_TOLERANCE:
        raise ConfigError(
            f"run '{name}': scaling its MLP widths cannot bring its {label} within {MATCH_TOLERANCE:.0%} of the first "
            f"run's {target:,}: the rest of the model alone counts {fixed:,}, the closest width gives {got:,}"
        )
    return matched


def match_configs(named: list[tuple[str, ModelConfig]], match: str) -> list[ModelConfig]:
    """Each model of (name, config) pairs matched to the first one's active parameters or FLOPs per token."""
    if match not in MATCH_KEYS:
        raise ConfigError(f"match: must be one of {', '.join(MATCH_KEYS)}, got {match!r}")
    target = model_counts(named[0][1])[MATCH_KEYS[match][0]]
    return [named[0][1]] + [match_model(config, match, target, name) for name, config in named[1:]]


def counts_table(named: list[tuple[str, ModelConfig]]) -> str:
    """A plain-text table of each model's MLP widths, parameters and FLOPs per token, against the first."""
    rows = [(name, config, model_counts(config)) for name, config in named]
    first = rows[0][2]
    lines = [
        f"{'run':<24} {'MLP':<30} {'total':>12} {'active':>12} {'FLOPs/token':>14} {'active':>7} {'FLOPs':>7}",
    ]
    for name, config, c in rows:
        lines.append(
            f"{name:<24} {describe_mlp(config):<30} {c['total']:>12,} {c['active']:>12,} {c['flops_per_token']:>14,} "
            f"{c['active'] / first['active']:>6.2f}x {c['flops_per_token'] / first['flops_per_token']:>6.2f}x"
        )
    return "\n".join(lines)


def describe_mlp(config: ModelConfig) -> str:
    """E.g. "d_ff 768", "8 x 384 top-2", "16 x 192 top-3 +192" (a shared expert), "moc 4 x 192 top-2"."""
    parts = [f"d_ff {config.d_ff}"] if "dense" in config.layer_mlp else []
    moe = config.moe
    if moe is not None:
        kind = "moc " if "moc" in config.layer_mlp else ""
        shared = f" +{moe.d_shared}" if moe.d_shared else ""
        parts.append(f"{kind}{moe.n_experts} x {moe.d_expert} top-{moe.top_k}{shared}")
    return ", ".join(parts)
