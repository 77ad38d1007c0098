import pytest

from mistura.config import PRESETS, ModelConfig
from mistura.errors import ConfigError
from mistura.fields import parse_overrides
from mistura.train.config import RunConfig


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_head=5), r"model.n_head: 5 heads do not divide d_model=256"),
        (dict(n_kv_head=3), r"model.n_kv_head: 3 key/value heads do not divide n_head=8"),
        (dict(n_layr=2), r"unknown key 'n_layr' \(did you mean 'n_layer'\?\)"),
        (dict(n_layer="four"), r"model.n_layer: expected int, got 'four'"),
        (dict(mlp="relu"), r"model.mlp: must be one of"),
        (dict(d_model=0), r"model.d_model: must be positive"),
        (dict(head_dim=7, n_head=4), r"model.head_dim: RoPE needs an even head width"),
        (dict(layer_mlp=["dense"]), r"model.layer_mlp: has 1 entries but n_layer=4"),
        (dict(layer_mlp=["sparse"] * 4), r"model.layer_mlp\[0\]: must be one of 'dense', 'moe', 'moc'"),
        (dict(layer_mlp=["moe"] * 4), r"'moe'/'moc' layers need a model.moe section"),
        (dict(moe=dict(n_experts=8, top_k=9)), r"model.moe.top_k: 9 exceeds n_experts=8"),
        (dict(moe=dict(n_experts=8, n_groups=3)), r"model.moe.n_groups: 3 groups do not divide n_experts=8"),
        (dict(moe=dict(n_expert=8)), r"model.moe: unknown key 'n_expert' \(did you mean 'n_experts'\?\)"),
        (dict(norm="layernorm", adaptive_norm=True), r"adaptive_norm: only RMSNorm"),
        (dict(attn_dropout=1.0), r"model.attn_dropout: must be in \[0, 1\)"),
    ],
)
def test_invalid_model_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_name("llama-tiny", **overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known presets: .*llama-tiny"):
        ModelConfig.from_name("llama-huge")


def test_presets_build_and_resolve_sizes():
    for name in PRESETS:
        config = ModelConfig.from_name(name)
        assert config.n_head % config.n_kv_head == 0
        assert len(config.layer_mlp) == config.n_layer
    gpt2 = ModelConfig.from_name("gpt2-small")
    assert (gpt2.head_dim, gpt2.d_ff, gpt2.n_kv_head) == (64, 3072, 12)


def test_swiglu_width_defaults_to_llama_rule():
    # 8/3 * d_model rounded up to a multiple of 64 (Llama-2 7B rounds to 256, giving 11008)
    assert ModelConfig(d_model=4096, n_head=32, mlp="swiglu").d_ff == 10944
    assert ModelConfig(d_model=256, n_head=4, mlp="swiglu").d_ff == 704
    assert ModelConfig(d_model=256, n_head=4, mlp="gelu").d_ff == 1024


def test_config_round_trips_through_dict():
    config = ModelConfig.from_name("gpt2-baseline-tiny", n_layer=3)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_run_config_sections_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: llama-tiny}\ntrain: {lr: 3e-3, max_steps: 10, warmup_steps: 2}\n")
    run = RunConfig.from_yaml(path, parse_overrides(["model.n_layer=2", "train.betas=[0.9, 0.99]"]))
    assert (run.model.n_layer, run.train.lr, run.train.betas) == (2, 0.003, (0.9, 0.99))
    assert run.model.vocab_size == run.data.vocab_size == 8192
    assert RunConfig.from_dict({"data": {"vocab_size": 512}}).model.vocab_size == 512
    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) differs from data.vocab_size"):
        RunConfig.from_dict({"model": {"vocab_size": 100}})
    with pytest.raises(ConfigError, match="unknown section"):
        RunConfig.from_dict({"optim": {}})
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        RunConfig.from_dict({"train": {"max_steps": 5, "warmup_steps": 5}})
    with pytest.raises(ConfigError, match="config file not found"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["train.lr"])
