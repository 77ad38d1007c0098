import math

import pytest
import torch

from mistura.errors import ConfigError
from mistura.tune.losses import dpo_loss, reward_model_loss, simpo_loss


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_bradley_terry_loss_and_metrics():
    loss, metrics = reward_model_loss(t(2.0, 0.5), t(1.0, 1.5))  # differences 1 and -1
    assert loss.item() == pytest.approx(-(logsigmoid(1.0) + logsigmoid(-1.0)) / 2)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == pytest.approx(0.0)
    assert (metrics["min_reward"].item(), metrics["max_reward"].item()) == (0.5, 2.0)
    assert metrics["mean_reward"].item() == pytest.approx(1.25)


def test_bradley_terry_margin_and_centering():
    loss, _ = reward_model_loss(t(2.0, 0.5), t(1.0, 1.5), margin=t(0.5, 0.5), center_coef=0.01)
    expected = -(logsigmoid(0.5) + logsigmoid(-1.5)) / 2 + 0.01 * (3.0**2 + 2.0**2) / 2
    assert loss.item() == pytest.approx(expected)


# Two pairs: policy and reference summed log-probs. Log-ratios: chosen 1 and 0, rejected -1 and 1.
PI_C, PI_R, REF_C, REF_R = t(-10.0, -8.0), t(-12.0, -7.0), t(-11.0, -8.0), t(-11.0, -8.0)
BETA = 0.1


def test_dpo_sigmoid_loss_and_trl_metrics():
    loss, metrics = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA)
    logits = [BETA * (1 - -1), BETA * (0 - 1)]  # 0.2 and -0.1
    assert loss.item() == pytest.approx(-(logsigmoid(logits[0]) + logsigmoid(logits[1])) / 2)
    assert metrics["rewards/chosen"].item() == pytest.approx((0.1 + 0.0) / 2)
    assert metrics["rewards/rejected"].item() == pytest.approx((-0.1 + 0.1) / 2)
    assert metrics["rewards/margins"].item() == pytest.approx((0.2 - 0.1) / 2)
    assert metrics["rewards/accuracies"].item() == 0.5


def test_dpo_gradient_pushes_chosen_up():
    chosen = PI_C.clone().requires_grad_()
    dpo_loss(chosen, PI_R, REF_C, REF_R, beta=BETA)[0].backward()
    # d/dpi_c of -log sigmoid(l) / B is -beta * sigmoid(-l) / B
    expected = [-BETA * (1 / (1 + math.exp(x))) / 2 for x in (0.2, -0.1)]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected))


def test_cdpo_label_smoothing():
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA, label_smoothing=0.1)
    per_pair = [-0.9 * logsigmoid(x) - 0.1 * logsigmoid(-x) for x in (0.2, -0.1)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2)


def test_ipo_on_per_token_mean_log_ratios():
    counts_c, counts_r = t(2.0, 4.0), t(4.0, 1.0)
    loss, metrics = dpo_loss(
        PI_C, PI_R, REF_C, REF_R, beta=BETA, loss_type="ipo", chosen_count=counts_c, rejected_count=counts_r
    )
    deltas = [1 / 2 - (-1) / 4, 0 / 4 - 1 / 1]  # 0.75 and -1
    assert loss.item() == pytest.approx(sum((d - 1 / (2 * BETA)) ** 2 for d in deltas) / 2)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.05)  # summed log-ratios, as TRL logs them


def test_ipo_needs_token_counts_and_unknown_types_are_refused():
    with pytest.raises(ConfigError, match="token counts"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, loss_type="ipo")
    with pytest.raises(ConfigError, match="hinge"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, loss_type="hinge")


def test_simpo_is_reference_free_with_a_margin():
    avg_c, avg_r = t(-1.0, -2.0), t(-1.5, -1.8)
    loss, metrics = simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.5)
    logits = [2.0 * 0.5 - 0.5, 2.0 * -0.2 - 0.5]  # 0.5 and -0.9
    assert loss.item() == pytest.approx(-(logsigmoid(logits[0]) + logsigmoid(logits[1])) / 2)
    assert metrics["rewards/chosen"].item() == pytest.approx(2.0 * (-1.0 - 2.0) / 2)
    assert metrics["rewards/accuracies"].item() == 0.5
