import math

import pytest
import torch

from mistura.errors import ConfigError
from mistura.tune.logprobs import kl_estimate, sequence_logprobs, token_entropy, token_logprobs

IGNORE = -100

# One row, three positions over a vocabulary of 3: uniform, then probabilities 1/8, 2/8, 5/8, then a
# position outside the mask whose label is IGNORE.
LOGITS = torch.tensor([[[0.0, 0.0, 0.0], [math.log(1), math.log(2), math.log(5)], [9.0, 0.0, 0.0]]])
LABELS = torch.tensor([[2, 1, IGNORE]])
MASK = torch.tensor([[1, 1, 0]])


def test_token_logprobs_are_the_labels_log_softmax():
    expected = [math.log(1 / 3), math.log(2 / 8), 0.0]
    torch.testing.assert_close(token_logprobs(LOGITS, LABELS, MASK), torch.tensor([expected]))


def test_sequence_logprobs_sum_and_mean_over_the_mask():
    out = sequence_logprobs(LOGITS, LABELS, MASK)
    total = math.log(1 / 3) + math.log(2 / 8)
    torch.testing.assert_close(out.total, torch.tensor([total]))
    torch.testing.assert_close(out.mean, torch.tensor([total / 2]))
    torch.testing.assert_close(out.count, torch.tensor([2.0]))


def test_logprobs_are_fp32_for_bf16_logits():
    out = token_logprobs(LOGITS.bfloat16(), LABELS, MASK)
    assert out.dtype == torch.float32


def test_a_row_without_real_tokens_has_mean_zero():
    out = sequence_logprobs(LOGITS, LABELS, torch.zeros_like(MASK))
    assert out.total.item() == 0.0 and out.mean.item() == 0.0


def test_token_entropy():
    p = [1 / 8, 2 / 8, 5 / 8]
    expected = [math.log(3), -sum(q * math.log(q) for q in p), 0.0]
    torch.testing.assert_close(token_entropy(LOGITS, MASK), torch.tensor([expected]))


def test_kl_estimators_of_schulman():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log r = ref - logp = -1
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx((math.exp(-1) - 1) + 1)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ConfigError, match="k4"):
        kl_estimate(logp, ref, "k4")
