"""From rewards to advantages: PPO's KL-shaped per-token rewards and GAE, GRPO's group baseline, the KL coefficient.

PPO (Ziegler et al. 2019; Ouyang et al. 2022), on right-padded responses with a mask (B, T):

    r_t = -kl_coef * KL_t  (+ the sequence's score at its last token)       the KL-shaped reward
    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1}     GAE (Schulman et al. 2016)
    returns R_t = A_t + V_t   (the value targets), then A is whitened (mistura.tune.masked.masked_whiten)

GRPO (Shao et al. 2024) has no critic: each prompt's G sampled completions are scored, and an
advantage is the reward's distance from its group's mean, in units of the group's std.

kl_coef is kept near a target KL by an AdaptiveKLController, or fixed.
"""

from __future__ import annotations

import torch

from mistura.errors import ConfigError
from mistura.tune.logprobs import KLEstimator, kl_estimate
from mistura.tune.masked import last_index

GROUP_STD_EPS = 1e-4  # TRL GRPOTrainer's, added to the group std
KL_ERROR_CLIP = 0.2  # Ziegler et al.'s bound on the controller's proportional error


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * KL_t, the score (B,) added at each response's last token; (r, KL) (B, T).

    The reward of Ziegler et al. 2019 (eq. 2) and InstructGPT: R(x, y) = r(x, y) - beta log(pi(y|x) / ref(y|x)),
    spread over the tokens, KL_t = kl_estimate(logprobs, ref_logprobs, estimator) (k1 = log pi - log ref, TRL's
    default; k3 unbiased and non-negative). Both are 0 on padding. TRL's PPOTrainer adds the score one slot
    later, at the first padding token after the EOS (huggingface/trl#3750); here it lands on the last real token.
    """
    real = mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * real  # (B, T)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) on right-padded rows; (A, R) (B, T).

        delta_t = r_t + gamma V_{t+1} - V_t          V past the last real token is 0 (the episode ends there)
        A_t     = delta_t + gamma lambda A_{t+1}
        R_t     = A_t + V_t                          the value targets

    Both are 0 on padding. Defaults are TRL PPOConfig's gamma = 1, lam = 0.95. No gradient: the rollout's
    rewards and values are data.
    """
    real = mask.to(rewards.dtype)
    rewards, values = rewards * real, values * real
    T = rewards.size(1)
    advantage = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}, 0 after the end
    advantages = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * advantage) * real[:, t]
        advantages.append(advantage)
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return advantages, advantages + values


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = GROUP_STD_EPS
) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, sec. 4.1.2) for rewards (N * G,), each prompt's G completions in a row.

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      std with Bessel's correction, eps = 1e-4, as TRL
    A_i =  r_i - mean(r_group)                              scale_by_std=False (Dr. GRPO, Liu et al. 2025)
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ConfigError(
            f"GRPO groups need at least 2 completions and must divide the {rewards.numel()} rewards, "
            f"got group_size={group_size}"
        )
    groups = rewards.view(-1, group_size)  # (N, G)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. 2019 (sec. 2.2), steered so the policy's KL to the reference nears target.

        e = clip(KL / target - 1, -0.2, 0.2)
        kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    KL is the mean per-sequence KL (sum over tokens) of the last batch, n_steps the samples it had. Their
    setting: target 6 nats, horizon 10000; TRL's (up to 0.11) AdaptiveKLController is the same.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"the KL target and horizon must be positive, got {target} and {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current: float, n_steps: int) -> float:
        """Move the coefficient after a batch of n_steps samples with mean KL current; the new coefficient."""
        error = min(max(current / self.target - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant KL coefficient, with the AdaptiveKLController's interface."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> float:
        return self.value
