"""Log-probabilities of the tokens a model was given, their entropies, and the KL estimators between two models.

Every preference and RL loss reads the model through these per-token quantities, all in fp32:

    log p(y_t) = z_t[y_t] - logsumexp(z_t)                       z_t = logits (V,) at position t
    H_t        = logsumexp(z_t) - sum_v softmax(z_t)_v z_t[v]     the entropy of the next-token distribution

logits[:, t] must already predict labels[:, t] (shift before: logits[:, :-1] with ids[:, 1:]); mask (B, T)
is 1 where a label counts (the response tokens) and 0 elsewhere (prompt, padding), and the labels there
may be anything, IGNORE (-100) included. The formulas are TRL's `selective_log_softmax` and
`entropy_from_logits` (trl/trainer/utils.py).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from mistura.errors import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]


class SequenceLogprobs(NamedTuple):
    tokens: torch.Tensor  # (B, T) log p(y_t), 0 where the mask is 0
    total: torch.Tensor  # (B,) sum_t log p(y_t) over the mask: log p(y | x)
    mean: torch.Tensor  # (B,) total / count: the length-normalised log-prob (IPO, SimPO)
    count: torch.Tensor  # (B,) real tokens per sequence


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(y_t) = z_t[y_t] - logsumexp(z_t) in fp32 (B, T), for logits (B, T, V) and labels (B, T); 0 off the mask."""
    real = mask.bool()
    safe = labels.masked_fill(~real, 0)  # IGNORE or padding ids would index out of the vocabulary
    logits = logits.float()
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked - torch.logsumexp(logits, dim=-1)).masked_fill(~real, 0.0)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> SequenceLogprobs:
    """Per-token log-probs of the labels and, per sequence, their sum and mean over the mask (B,)."""
    tokens = token_logprobs(logits, labels, mask)  # (B, T)
    count = mask.float().sum(-1)  # (B,)
    total = tokens.sum(-1)
    return SequenceLogprobs(tokens, total, total / count.clamp(min=1), count)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_t[v] in fp32 (B, T), for logits (B, T, V); 0 off the mask."""
    logits = logits.float()
    entropy = torch.logsumexp(logits, dim=-1) - (logits.softmax(-1) * logits).sum(-1)  # (B, T)
    return entropy.masked_fill(~mask.bool(), 0.0)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL divergence", 2020).

    With log r = ref_logprobs - logprobs (the log-ratio ref / pi at the sampled token):
        k1 = -log r                 unbiased, high variance, can be negative (TRL PPO's default)
        k2 = (log r)^2 / 2          biased, low variance
        k3 = (r - 1) - log r        unbiased, low variance, never negative (GRPO's, TRL PPO's "k3")
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ConfigError(f"unknown KL estimator {estimator!r}: expected k1, k2 or k3")
