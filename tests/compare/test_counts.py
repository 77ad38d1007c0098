"""Parameters and training FLOPs per token, and matching them across the runs of a comparison."""

import pytest

from mistura.compare.counts import MATCH_TOLERANCE, counts_table, match_configs, model_counts
from mistura.config import ModelConfig
from mistura.errors import ConfigError


def test_flops_per_token_of_a_dense_model_by_hand(tiny):
    config = tiny("llama-tiny")  # V 97, T 32, 2 layers, D 32, 4 heads of 8 (4 KV heads), SwiGLU 64, tied
    layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # q, k, v, o; gate, up, down; two norms
    weights = 2 * layer + 32 + 97 * 32  # final norm and the tied head
    attention = 2 * 32 * 4 * (8 + 8)  # layers x context x heads x (q.k + v widths)
    counts = model_counts(config)
    assert counts["active_non_embedding"] == weights
    assert counts["flops_per_token"] == 6 * (weights + attention)


def test_a_moe_layer_costs_its_chosen_experts_and_its_router(tiny):
    dense = model_counts(tiny("llama-tiny"))
    moe = {"n_experts": 8, "top_k": 2, "d_expert": 32}
    sparse = model_counts(tiny("llama-tiny", moe=moe))
    router = 2 * 8 * 32  # per layer an (E, D) gate; two width-32 experts do what one width-64 MLP does
    assert sparse["flops_per_token"] == dense["flops_per_token"] + 6 * router
    assert sparse["total"] == dense["total"] + router + 2 * 6 * 3 * 32 * 32


def test_collaborative_experts_pay_for_their_attentions(tiny):
    moc = {"n_experts": 4, "top_k": 2, "d_expert": 16, "moc_heads": 4}
    counts = model_counts(tiny("llama-tiny", layer_mlp=("moc", "moc"), moe=moc))
    attention = 2 * 32 * 4 * (8 + 8)
    # Per layer: the router attention (4 D^2, no biases) and answer score (D) run on E = 4 rows, the fusion
    # attention on K = 2: 3 and 1 extra rows; scores over 4 and 2 positions: 2 (E^2 + K^2) D multiply-adds.
    extra = 2 * (3 * (4 * 32 * 32 + 32) + 1 * 4 * 32 * 32 + 2 * (16 + 4) * 32)
    assert counts["flops_per_token"] == 6 * (counts["active_non_embedding"] + attention + extra)


@pytest.mark.parametrize("match", ["active", "flops"])
def test_matching_brings_every_run_within_tolerance(tiny, match):
    key = {"active": "active", "flops": "flops_per_token"}[match]
    deepseek = {"top_k": 3, "d_expert": 32, "d_shared": 32}
    named = [
        ("dense", tiny("llama-tiny", d_model=64, d_ff=256)),
        ("wide-moe", tiny("llama-tiny", d_model=64, moe={"n_experts": 8, "top_k": 2, "d_expert": 256})),
        ("deepseek", tiny("llama-tiny", d_model=64, first_dense_layers=1, moe=deepseek)),
    ]
    before = [model_counts(config)[key] for _, config in named]
    assert abs(before[1] / before[0] - 1) > 0.5 and abs(before[2] / before[0] - 1) > 0.1
    matched = match_configs(named, match)
    target = model_counts(matched[0])[key]
    assert matched[0] == named[0][1]
    for config in matched[1:]:
        assert abs(model_counts(config)[key] / target - 1) <= MATCH_TOLERANCE
    assert matched[1].moe.d_expert < 256 and matched[2].moe.d_shared > 32 and matched[2].d_ff > 64
    assert all(w % 8 == 0 for w in (matched[1].moe.d_expert, matched[2].moe.d_expert, matched[2].d_ff))


def test_runs_already_within_tolerance_are_left_alone():
    named = [(name, ModelConfig.from_name(name)) for name in ("seed004-baseline", "qwen-moe-8e-top2")]
    assert match_configs(named, "active") == [config for _, config in named]


def test_an_impossible_match_is_a_clear_error(tiny):
    named = [
        ("dense", tiny("llama-tiny")),
        ("moc", tiny("llama-tiny", layer_mlp=("moc", "moc"), moe={"n_experts": 4, "top_k": 2, "d_expert": 16})),
    ]
    with pytest.raises(ConfigError, match="run 'moc': scaling its MLP widths cannot bring its FLOPs per token"):
        match_configs(named, "flops")
    with pytest.raises(ConfigError, match="match: must be one of active, flops"):
        match_configs(named, "params")


def test_counts_table_shows_every_run_against_the_first(tiny):
    table = counts_table([("dense", tiny("llama-tiny")), ("moe", tiny("llama-tiny", moe={"d_expert": 32}))])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("dense") and lines[2].startswith("moe")
    assert "1.00x" in lines[1] and "8 x 32 top-2" in lines[2]
