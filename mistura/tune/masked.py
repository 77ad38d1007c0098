"""Statistics over the real tokens of a padded batch: a mask (B, T) is 1 on real tokens, 0 on padding.

    masked_mean(x, m)   = sum(x m) / sum(m)
    masked_var(x, m)    = masked_mean((x - mean)^2, m) * n / (n - 1)        n = sum(m), Bessel's correction
    masked_whiten(x, m) = (x - mean) / sqrt(var + 1e-8)  (+ mean again with shift_mean=False)
    last_index(m)       = max {t : m_t = 1} per row, where a sequence's reward or score is read

These are TRL's `masked_mean`, `masked_var` and `masked_whiten` (trl/experimental/ppo/ppo_trainer.py),
which PPO uses to whiten advantages and, optionally, rewards; here whitened padding comes out 0 and a
row without real tokens has mean 0 instead of NaN.
"""

from __future__ import annotations

import torch

from mistura.errors import ConfigError

WHITEN_EPS = 1e-8  # TRL's, inside the square root


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over every element or along dim; a row without real tokens gives 0."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """The variance of the real elements of x, with Bessel's correction n / (n - 1) when unbiased."""
    count = mask.sum()
    if unbiased and count < 2:
        raise ConfigError(f"the unbiased variance needs at least 2 real tokens, the mask has {int(count)}")
    variance = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return variance * count / (count - 1) if unbiased else variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the real elements, 0 on padding; shift_mean=False adds the mean back
    (only the scale changes: TRL whitens rewards this way)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """The position of each row's last real token (B,), for a mask (B, T); 0 for a row without any.

    argmax returns the first maximum of the running count, which is reached at the last 1.
    """
    return mask.long().cumsum(-1).argmax(-1)
