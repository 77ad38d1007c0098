import math

import pytest

from mistura.cli import main
from mistura.errors import ConfigError
from mistura.plan import nearest_preset, plan, preset_active_params


def test_flops_budget_splits_into_twenty_tokens_per_parameter():
    # C = 6 N D with D = 20 N, so C = 120 N^2: C = 1.2e16 gives N = 1e7 and D = 2e8.
    result = plan(flops=1.2e16)
    assert result.params == pytest.approx(1e7)
    assert result.tokens == pytest.approx(2e8)
    assert result.flops == pytest.approx(1.2e16)


def test_tokens_and_params_fill_in_the_rest():
    by_tokens = plan(tokens=2e9)
    assert by_tokens.params == pytest.approx(1e8)
    assert by_tokens.flops == pytest.approx(6 * 1e8 * 2e9)
    by_params = plan(params=1e6, tokens_per_param=10)
    assert by_params.tokens == pytest.approx(1e7)
    assert by_params.flops == pytest.approx(6e13)


def test_chinchilla_70b_point():
    # Chinchilla: 70B parameters on 1.4T tokens, about 5.9e23 FLOPs.
    result = plan(flops=6 * 70e9 * 1.4e12)
    assert result.params == pytest.approx(70e9)
    assert result.tokens == pytest.approx(1.4e12)


def test_nearest_preset_is_nearest_in_ratio():
    counts = preset_active_params()
    assert counts["gpt2-small"] == 124_439_808
    name, active = nearest_preset(120e6)
    assert (name, active) == ("gpt2-small", 124_439_808)
    for n in (3e6, 8e6, 5e8):
        name, active = nearest_preset(n)
        best = min(abs(math.log(c / n)) for c in counts.values())
        assert abs(math.log(active / n)) == best


@pytest.mark.parametrize("kwargs", [{}, {"flops": 1e18, "tokens": 1e9}, {"flops": -1.0}, {"params": 0.0}])
def test_bad_requests_are_refused(kwargs):
    with pytest.raises(ConfigError):
        plan(**kwargs)


def test_cli_prints_the_plan(capsys):
    assert main(["plan", "--flops", "1.2e16"]) == 0
    out = capsys.readouterr().out
    assert "1.000e+07" in out and "2.000e+08" in out and "nearest preset" in out
    assert main(["plan", "--tokens", "-5"]) == 2
    assert "positive" in capsys.readouterr().err
