import math
import statistics

import pytest
import torch

from mistura.errors import ConfigError
from mistura.tune.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalized_rewards,
)

GARBAGE = 7.0  # what padding holds; it must never matter


def test_kl_penalty_per_token_and_score_at_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, GARBAGE], [-1.0, -1.0, GARBAGE, GARBAGE]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, GARBAGE], [-2.0, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, kl = kl_penalized_rewards(logprobs, ref, torch.tensor([5.0, -1.0]), mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, 0, -1], row 1 [1, -0.5]
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0], [1.0, -0.5, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 5.0, 0.0], [-0.1, 0.05 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_kl_penalty_with_k3():
    _, kl = kl_penalized_rewards(
        torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), torch.tensor([0.0]), torch.ones(1, 1), 0.1, "k3"
    )
    assert kl.item() == pytest.approx(math.exp(-1) - 1 + 1)


def unrolled_gae(r, v, gamma, lam):
    """The recursion written out for a row of three real tokens."""
    d2 = r[2] + gamma * 0.0 - v[2]  # the episode ends after the last token
    d1 = r[1] + gamma * v[2] - v[1]
    d0 = r[0] + gamma * v[1] - v[0]
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    return [a0, a1, a2]


def test_gae_against_the_unrolled_recursion():
    gamma, lam = 0.9, 0.8
    r, v = [0.1, -0.2, 1.5], [0.3, 0.5, 0.4]
    rewards = torch.tensor([r + [GARBAGE], [2.0, GARBAGE, GARBAGE, GARBAGE]])
    values = torch.tensor([v + [GARBAGE], [0.5, GARBAGE, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    a = unrolled_gae(r, v, gamma, lam)
    expected = torch.tensor([a + [0.0], [2.0 - 0.5, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + torch.tensor([v + [0.0], [0.5, 0.0, 0.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    rewards, values = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.25, 0.125]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(advantages, returns - values)


def test_group_advantages_for_a_group_of_four():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    out = group_advantages(torch.tensor(rewards), group_size=4)
    std = statistics.stdev(rewards[:4])  # Bessel's correction, as TRL
    expected = [(r - 0.5) / (std + 1e-4) for r in rewards[:4]] + [0.0] * 4  # an all-equal group learns nothing
    torch.testing.assert_close(out, torch.tensor(expected))


def test_group_advantages_without_the_std_dr_grpo():
    out = group_advantages(torch.tensor([3.0, 1.0, 0.0, 0.0]), group_size=4, scale_by_std=False)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, -1.0, -1.0]))


def test_group_size_must_be_a_divisor_of_at_least_two():
    with pytest.raises(ConfigError, match="group_size=3"):
        group_advantages(torch.zeros(8), group_size=3)
    with pytest.raises(ConfigError, match="group_size=1"):
        group_advantages(torch.zeros(8), group_size=1)


def test_adaptive_kl_controller_updates():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert controller.update(current=9.0, n_steps=256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # clipped
    before = controller.value
    assert controller.update(current=6.6, n_steps=100) == pytest.approx(before * (1 + 0.1 * 100 / 10000))
    before = controller.value
    assert controller.update(current=0.0, n_steps=100) == pytest.approx(before * (1 - 0.2 * 100 / 10000))


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    assert controller.update(current=100.0, n_steps=256) == 0.05 and controller.value == 0.05
