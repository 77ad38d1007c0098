import math

import pytest
import torch

from mistura.errors import ConfigError
from mistura.tune.policy import entropy_bonus, grpo_loss, ppo_policy_loss, ppo_value_loss

# Four real tokens and a padding slot, ratios 1.5, 0.5, 1.1, 0.7 (garbage on padding), clip 0.2:
#   A = +1, r = 1.5  ->  max(-1.5, -1.2) = -1.2   clipped above: no gradient
#   A = +1, r = 0.5  ->  max(-0.5, -0.8) = -0.5   the unclipped term is the pessimistic one
#   A = -2, r = 1.1  ->  max( 2.2,  2.2) =  2.2   inside the range
#   A = -2, r = 0.7  ->  max( 1.4,  1.6) =  1.6   clipped below: no gradient
RATIOS = [1.5, 0.5, 1.1, 0.7, 9.0]
OLD = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
ADVANTAGES = torch.tensor([[1.0, 1.0, -2.0, -2.0, 5.0]])
MASK = torch.tensor([[1, 1, 1, 1, 0]])


def new_logprobs() -> torch.Tensor:
    return (OLD + torch.tensor([[math.log(r) for r in RATIOS]])).requires_grad_()


def test_ppo_clipped_surrogate_loss_gradient_and_metrics():
    logprobs = new_logprobs()
    loss, metrics = ppo_policy_loss(logprobs, OLD, ADVANTAGES, MASK, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 1.6) / 4)
    loss.backward()
    # d/dlogp of -A r is -A r, over 4 tokens; 0 where the clip binds and on padding
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5 / 4, 2.2 / 4, 0.0, 0.0]]))
    assert metrics["policy/clipfrac"].item() == pytest.approx(2 / 4)
    approxkl = 0.5 * sum(math.log(r) ** 2 for r in RATIOS[:4]) / 4
    assert metrics["policy/approxkl"].item() == pytest.approx(approxkl)
    assert metrics["policy/ratio"].item() == pytest.approx(sum(RATIOS[:4]) / 4)


def test_clipped_value_loss():
    values = torch.tensor([[1.0, 2.0, 0.0, 9.0]])
    old_values = torch.tensor([[0.5, 2.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    loss, metrics = ppo_value_loss(values, old_values, returns, torch.tensor([[1, 1, 1, 0]]), clip=0.2)
    # clipped values 0.7, 2.3, 0.0: squared errors max((1, 1.69), (0, 0.09), (1, 1))
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 1.0) / 3)
    assert metrics["val/clipfrac"].item() == pytest.approx(2 / 3)
    loss, metrics = ppo_value_loss(values, old_values, returns, torch.tensor([[1, 1, 1, 0]]), clip=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.0 + 1.0) / 3) and metrics["val/clipfrac"].item() == 0.0


def test_entropy_bonus():
    entropy = torch.tensor([[1.0, 2.0, 50.0]])
    assert entropy_bonus(entropy, torch.tensor([[1, 1, 0]]), coef=0.01).item() == pytest.approx(-0.01 * 1.5)


# GRPO: two completions, one advantage each; the policy has not moved (ratio 1), so l_t = -A + beta KL_t.
# log(ref / pi) is 0, log 2, 0 for the first row and log 0.5 for the second, whose tail is padding.
GARBAGE = 3.0
G_LOGPROBS = torch.tensor([[-1.0, -2.0, -1.5], [-1.0, GARBAGE, GARBAGE]])
G_REF = G_LOGPROBS + torch.tensor([[0.0, math.log(2), 0.0], [math.log(0.5), 0.0, 0.0]])
G_ADV = torch.tensor([1.0, -1.0])
G_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
BETA = 0.04
K3 = [[0.0, 1 - math.log(2), 0.0], [-0.5 + math.log(2)]]  # r - 1 - log r
ROW0 = [-1.0 + BETA * k for k in K3[0]]
ROW1 = [1.0 + BETA * K3[1][0]]


def grpo(loss_type, **kwargs):
    logprobs = G_LOGPROBS.clone().requires_grad_()
    loss, metrics = grpo_loss(logprobs, G_LOGPROBS, G_ADV, G_MASK, G_REF, beta=BETA, loss_type=loss_type, **kwargs)
    return loss, metrics, logprobs


def test_grpo_loss_means_per_sequence_then_over_sequences():
    loss, metrics, logprobs = grpo("grpo")
    assert loss.item() == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 1) / 2, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx((sum(K3[0]) + K3[1][0]) / 4)
    assert metrics["clip_ratio/region_mean"].item() == 0.0
    loss.backward()
    # with ratio 1: d l_t / d logp_t = -A + beta (1 - ref / pi), weighted 1 / (|o_i| B)
    dkl = [[1 - 1.0, 1 - 2.0, 1 - 1.0], [1 - 0.5]]
    row0 = [(-1.0 + BETA * d) / 6 for d in dkl[0]]
    row1 = [(1.0 + BETA * dkl[1][0]) / 2, 0.0, 0.0]
    torch.testing.assert_close(logprobs.grad, torch.tensor([row0, row1]))


def test_grpo_token_level_normalisations():
    total = sum(ROW0) + sum(ROW1)
    assert grpo("bnpo")[0].item() == pytest.approx(total / 4, abs=1e-6)
    assert grpo("dr_grpo", max_completion_length=5)[0].item() == pytest.approx(total / (2 * 5), abs=1e-6)


def test_grpo_clip_higher():
    old = torch.zeros(1, 1)
    logprobs = torch.full((1, 1), math.log(1.25))
    symmetric, metrics = grpo_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2)
    assert symmetric.item() == pytest.approx(-1.2) and metrics["clip_ratio/high_mean"].item() == 1.0
    higher, metrics = grpo_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2, epsilon_high=0.28)
    assert higher.item() == pytest.approx(-1.25) and metrics["clip_ratio/high_mean"].item() == 0.0


def test_grpo_refuses_what_it_cannot_compute():
    with pytest.raises(ConfigError, match="reference"):
        grpo_loss(G_LOGPROBS, G_LOGPROBS, G_ADV, G_MASK, beta=0.1)
    with pytest.raises(ConfigError, match="max_completion_length"):
        grpo("dr_grpo")
    with pytest.raises(ConfigError, match="sapo"):
        grpo("sapo")
