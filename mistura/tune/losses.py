"""Preference losses on (chosen, rejected) pairs: the reward model's, DPO's and its variants', SimPO's.

Inputs are per-pair tensors (B,): scalar rewards for the reward model, sequence log-probs (the `total`
or `mean` of a `SequenceLogprobs`) for the others. Each loss returns (loss, metrics): the batch mean,
and the detached scalars TRL logs under the same names.

    reward model  -log sigmoid(r_c - r_r - m)                                    InstructGPT; TRL RewardTrainer
    DPO           -log sigmoid(l),  l = beta ((pi_c - pi_r) - (ref_c - ref_r))   Rafailov et al. 2023
    cDPO          -(1 - eps) log sigmoid(l) - eps log sigmoid(-l)                Mitchell 2023
    IPO           (d - 1 / (2 beta))^2,  d = per-token means of the log-ratios   Azar et al. 2023
    SimPO         -log sigmoid(beta (avg_c - avg_r) - gamma), no reference      Meng et al. 2024
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mistura.errors import ConfigError

Metrics = dict[str, torch.Tensor]  # detached scalars, named as TRL logs them
DPOLossType = Literal["sigmoid", "ipo"]


def reward_model_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The Bradley-Terry loss of a reward model, mean over pairs of -log sigmoid(r_c - r_r - margin).

    P(chosen > rejected) = sigmoid(r_c - r_r) (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1).
    margin (B,) asks the chosen reward to lead by that much (Llama 2, Touvron et al. 2023); center_coef adds
    center_coef * mean((r_c + r_r)^2), which keeps the rewards centred on 0 (Eisenstein et al. 2023).
    Both as TRL's RewardTrainer.compute_loss, and its metrics: accuracy (r_c > r_r), margin (mean r_c - r_r),
    min/mean/max of all the rewards.
    """
    difference = chosen - rejected  # (B,)
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coef is not None:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    with torch.no_grad():
        rewards = torch.cat([chosen, rejected])  # (2B,)
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "min_reward": rewards.min(),
            "mean_reward": rewards.mean(),
            "max_reward": rewards.max(),
        }
    return loss, metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_count: torch.Tensor | None = None,
    rejected_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DPO on summed sequence log-probs (B,) of the policy and the frozen reference, TRL's conventions.

    With the log-ratios rho_c = pi_c - ref_c and rho_r = pi_r - ref_r:
        sigmoid  -(1 - eps) log sigmoid(l) - eps log sigmoid(-l),   l = beta (rho_c - rho_r)
                 (Rafailov et al. 2023, eq. 7; eps = label_smoothing > 0 is cDPO, Mitchell 2023, eq. 3)
        ipo      (rho_c / n_c - rho_r / n_r - 1 / (2 beta))^2       (Azar et al. 2023, eq. 17, with tau = beta)
                 on per-token means: n_c, n_r = chosen_count, rejected_count, as TRL's DPOTrainer divides
                 the summed log-ratios by the completion lengths (normalisation confirmed by the IPO authors).
    Metrics (TRL's): rewards/chosen = beta rho_c, rewards/rejected = beta rho_r (summed log-ratios, for IPO
    too), rewards/margins, rewards/accuracies (rewards/chosen > rewards/rejected), all batch means.
    """
    rho_chosen = policy_chosen - ref_chosen  # (B,)
    rho_rejected = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        logits = beta * (rho_chosen - rho_rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_count is None or rejected_count is None:
            raise ConfigError("the IPO loss needs the token counts of the chosen and rejected responses")
        delta = rho_chosen / chosen_count.clamp(min=1) - rho_rejected / rejected_count.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown DPO loss type {loss_type!r}: expected sigmoid or ipo")
    return losses.mean(), reward_metrics(beta * rho_chosen, beta * rho_rejected)


def simpo_loss(
    policy_chosen_mean: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, on mean per-token log-probs (B,) of the policy.

        l = beta (avg_c - avg_r) - gamma
        loss = -(1 - eps) log sigmoid(l) - eps log sigmoid(-l)        eps = label_smoothing (0 in the paper)

    As TRL's CPOTrainer.cpo_loss with loss_type="simpo" (which writes l = beta (avg_c - avg_r - gamma / beta)).
    No defaults: the SimPO recipes use beta of a few units (2 to 10) with gamma / beta under 1, far from
    TRL CPOConfig's beta = 0.1, simpo_gamma = 0.5. Metrics: rewards/* with rewards = beta * avg, as TRL logs them.
    """
    logits = beta * (policy_chosen_mean - policy_rejected_mean) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), reward_metrics(beta * policy_chosen_mean, beta * policy_rejected_mean)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    """TRL's preference metrics from the implicit rewards (B,): their means, mean margin and accuracy."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }
