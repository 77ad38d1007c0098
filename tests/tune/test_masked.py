import pytest
import torch

from mistura.errors import ConfigError
from mistura.tune.masked import last_index, masked_mean, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0, 100.0]])  # the last element is padding
MASK = torch.tensor([[1, 1, 1, 0]])


def test_masked_mean_and_unbiased_variance_ignore_padding():
    assert masked_mean(X, MASK).item() == pytest.approx(2.0)
    assert masked_var(X, MASK).item() == pytest.approx((1 + 0 + 1) / 2)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx((1 + 0 + 1) / 3)
    torch.testing.assert_close(masked_mean(X, MASK, dim=-1), torch.tensor([2.0]))


def test_masked_whiten():
    scale = 1 / (1 + 1e-8) ** 0.5
    torch.testing.assert_close(masked_whiten(X, MASK), torch.tensor([[-scale, 0.0, scale, 0.0]]))
    shifted = torch.tensor([[2 - scale, 2.0, 2 + scale, 0.0]])
    torch.testing.assert_close(masked_whiten(X, MASK, shift_mean=False), shifted)


def test_variance_of_one_token_is_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        masked_var(X, torch.tensor([[1, 0, 0, 0]]))


def test_last_index_is_the_last_real_token():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    assert last_index(mask).tolist() == [1, 3, 1, 0]
