"""Rotary position embeddings (RoPE, Su et al. 2021), optionally extended by YaRN.

Channel pair (i, i + D/2) of every query and key head is rotated by the angle
position * theta^(-2i/D). The dot product of a rotated query and key then depends
only on their distance. Pairs are (first half, second half) as in Hugging Face's
Llama, so imported weights need no permutation.

YaRN (Peng et al. 2023) stretches a model trained on L = original_max_seq_len positions
to `factor` times as many. Pair i turns L * theta^(-2i/D) / (2 pi) times over the
original context: pairs that turn often (more than beta_fast times) already saw every
angle and keep their frequency; pairs that turn rarely (fewer than beta_slow times)
would meet unseen angles, so their frequency is divided by `factor` (interpolation); a
linear ramp blends the pairs between. cos and sin are then multiplied by an attention
factor that sharpens attention again over the longer context. The numbers follow
Hugging Face's `_compute_yarn_parameters`, so imported DeepSeek models rotate alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mistura.config import YaRNConfig


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_seq_len), YaRN-scaled when `yarn` is given."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, yarn: YaRNConfig | None = None):
        super().__init__()
        inv_freq, scale = rope_frequencies(head_dim, theta, yarn)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, D/2)
        self.register_buffer("cos", (angles.cos() * scale).float(), persistent=False)
        self.register_buffer("sin", (angles.sin() * scale).float(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions start .. start + length - 1, each (length, D/2)."""
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for a position per row and token, positions (B, T): each (B, 1, T, D/2), one for all heads."""
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles behind cos and sin (T, D/2), or (B, 1, T, D/2) per row."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


def rope_frequencies(head_dim: int, theta: float, yarn: YaRNConfig | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) in float64, YaRN-blended when `yarn` is given, and the factor on cos/sin."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if yarn is None:
        return inv_freq, 1.0
    low, high = _yarn_ramp_ends(head_dim, theta, yarn)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0 kept, 1 divided
    return inv_freq * (1 - ramp) + inv_freq / yarn.factor * ramp, _yarn_attention_factor(yarn)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context `factor` times longer: 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_ramp_ends(head_dim: int, theta: float, yarn: YaRNConfig) -> tuple[float, float]:
    """The pairs where the blend starts (beta_fast turns) and ends (beta_slow turns)."""

    def pair_turning(turns: float) -> float:  # solves L * theta^(-2i/D) / (2 pi) = turns for i
        return head_dim * math.log(yarn.original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(yarn.beta_fast), pair_turning(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    return low, high + 0.001 if low == high else high  # a band of one pair: keep the ramp finite


def _yarn_attention_factor(yarn: YaRNConfig) -> float:
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)
