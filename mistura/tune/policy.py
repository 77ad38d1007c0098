"""The clipped policy-gradient objectives: PPO's policy and value losses, GRPO's loss.

Both clip the probability ratio of the updated policy to the one that sampled the tokens
(Schulman et al. 2017, eq. 7), per token of a right-padded batch with a response mask (B, T):

    ratio_t = exp(log pi(y_t) - log pi_old(y_t))
    L_t     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps_low, 1 + eps_high))

PPO averages L over every response token of the batch and adds a clipped value loss and an
entropy bonus; GRPO adds beta * KL_t (k3) to the reference and offers several normalisations.
Each loss returns (loss, metrics), metrics detached scalars named as TRL logs them.
"""

from __future__ import annotations

from typing import Literal

import torch

from mistura.errors import ConfigError
from mistura.tune.logprobs import kl_estimate
from mistura.tune.losses import Metrics
from mistura.tune.masked import masked_mean

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo"]


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss L_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) and the ratio r (B, T).

    advantages broadcast against logprobs (B, T): (B, T) for PPO, (B, 1) for GRPO's one advantage per sequence.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    return torch.max(unclipped, clipped), ratio


def clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of the real tokens where the clip binds (its gradient is 0), below and above: (low, high) scalars.

    low: ratio < 1 - eps_low with A < 0; high: ratio > 1 + eps_high with A > 0 (TRL GRPO's clip_ratio/*);
    their sum is PPO's clipfrac, the share of tokens where the clipped term is the larger.
    """
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return masked_mean(low.float(), mask), masked_mean(high.float(), mask)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), the mean of L_t over the real tokens of the batch.

    As TRL's PPOTrainer (pg_loss, cliprange = 0.2). Metrics: policy/clipfrac, policy/approxkl
    = 0.5 mean (log pi - log pi_old)^2 (TRL averages it over padding too; here over the real tokens),
    policy/ratio (mean ratio).
    """
    per_token, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, clip, clip)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        low, high = clip_fractions(ratio, advantages, mask, clip, clip)
        metrics = {
            "policy/clipfrac": low + high,
            "policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
            "policy/ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """The clipped value loss 0.5 mean max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) over real tokens.

    The update of the critic V (B, T) stays within eps of the values V_old that the advantages were
    computed from (OpenAI baselines' PPO2; TRL's PPOTrainer vf_loss with cliprange_value = 0.2, which
    the trainer weights by vf_coef, 0.1 in TRL); clip=None is the plain 0.5 mean (V - R)^2.
    Metric: val/clipfrac, the share of real tokens where the clipped term is the larger.
    """
    unclipped_loss = (values - returns) ** 2  # (B, T)
    if clip is None:
        return 0.5 * masked_mean(unclipped_loss, mask), {"val/clipfrac": torch.zeros(())}
    clipped = torch.max(torch.min(values, old_values + clip), old_values - clip)
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        metrics = {"val/clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, metrics


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """The term -coef * mean H_t over the real tokens, added to the loss to keep the policy exploring.

    entropy (B, T) from mistura.tune.logprobs.token_entropy; PPO's c2 S[pi] (Schulman et al. 2017, eq. 9).
    """
    return -coef * masked_mean(entropy, mask)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: GRPOLossType = "grpo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO's objective (Shao et al. 2024, eq. 3) as TRL's GRPOTrainer computes it, for advantages (B,) or (B, T).

        l_t = max(-A r_t, -A clip(r_t, 1 - epsilon, 1 + epsilon_high)) + beta * KL_t
        KL_t = ref / pi - log(ref / pi) - 1                               (k3, Schulman 2020)

    epsilon_high defaults to epsilon (a larger one is DAPO's clip-higher). Normalisation, m the mask:
        grpo     mean over sequences of sum_t l_t m_t / sum_t m_t          the paper's 1/|o_i|
        bnpo     sum l m / sum m, over all the tokens of the batch         DAPO's token-level loss
        dr_grpo  sum l m / (B * max_completion_length)                     Dr. GRPO (Liu et al. 2025)
    (TRL's "dapo", its current default, is bnpo with the tokens counted over the whole generation batch;
    a single call here sees one batch.) beta = 0, TRL's default, skips the reference model.
    Metrics: kl (mean KL_t, when beta > 0), clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    per_token, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, epsilon, eps_high)
    metrics = {}
    if beta != 0.0:
        if ref_logprobs is None:
            raise ConfigError("GRPO with beta > 0 needs the reference model's log-probs")
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = _normalise(per_token, mask, loss_type, max_completion_length)
    with torch.no_grad():
        low, high = clip_fractions(ratio, advantages, mask, epsilon, eps_high)
    metrics.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high})
    return loss, metrics


def _normalise(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_length: int | None) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar as GRPO's loss_type asks (see grpo_loss)."""
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=-1).mean()
    if loss_type == "bnpo":
        return masked_mean(per_token, mask)
    if loss_type == "dr_grpo":
        if max_length is None:
            raise ConfigError("the dr_grpo loss needs max_completion_length, the generation budget it divides by")
        return (per_token * mask.to(per_token.dtype)).sum() / (per_token.size(0) * max_length)
    raise ConfigError(f"unknown GRPO loss type {loss_type!r}: expected grpo, bnpo or dr_grpo")
