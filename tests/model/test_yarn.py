"""YaRN: frequencies, cos/sin factor and MLA softmax scale equal Hugging Face's; GQA models use it too."""

from __future__ import annotations

import math

import pytest
import torch

from mistura.config import ModelConfig, YaRNConfig
from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.model.mla import MultiHeadLatentAttention
from mistura.model.rope import RotaryEmbedding, rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3RotaryEmbedding,
    yarn_apply_mscale,
)

# (rotary width, theta, YaRN settings): DeepSeek-V3 and V2 (from their config.json), a
# Qwen-style GQA extension (no mscale_all_dim, no truncation), an explicit attention factor.
SETTINGS = {
    "deepseek-v3": (64, 10000.0, dict(factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0)),
    "deepseek-v2": (64, 10000.0, dict(factor=40.0, original_max_seq_len=4096, mscale=0.707, mscale_all_dim=0.707)),
    "unequal-mscale": (16, 10000.0, dict(factor=4.0, original_max_seq_len=64, mscale=1.0, mscale_all_dim=0.5)),
    "gqa-no-truncate": (128, 1e6, dict(factor=4.0, original_max_seq_len=32768, truncate=False)),
    "attention-factor": (
        32,
        500000.0,
        dict(factor=8.0, original_max_seq_len=8192, beta_fast=16.0, attention_factor=1.2),
    ),
}


def hf_config(rope_dim: int, theta: float, yarn: YaRNConfig):
    rope = dict(
        rope_type="yarn",
        rope_theta=theta,
        factor=yarn.factor,
        original_max_position_embeddings=yarn.original_max_seq_len,
        beta_fast=yarn.beta_fast,
        beta_slow=yarn.beta_slow,
        mscale=yarn.mscale,
        mscale_all_dim=yarn.mscale_all_dim,
        truncate=yarn.truncate,
    )
    if yarn.attention_factor is not None:
        rope["attention_factor"] = yarn.attention_factor
    return transformers.DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        qk_rope_head_dim=rope_dim,  # DeepSeek's rotary width, which HF's yarn reads as head_dim
        max_position_embeddings=int(yarn.original_max_seq_len * yarn.factor),
        rope_parameters=rope,
        rope_interleave=False,
    )


@pytest.mark.parametrize("setting", SETTINGS)
def test_frequencies_and_attention_factor_equal_hugging_face(setting):
    rope_dim, theta, fields = SETTINGS[setting]
    yarn = YaRNConfig(**fields)
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(rope_dim, theta, yarn))
    inv_freq, factor = rope_frequencies(rope_dim, theta, yarn)
    torch.testing.assert_close(inv_freq.float(), expected_inv_freq, atol=1e-6, rtol=1e-6)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    plain, _ = rope_frequencies(rope_dim, theta)
    assert not torch.allclose(inv_freq, plain)  # the setting really extends the context


@pytest.mark.parametrize("setting", ["deepseek-v3", "unequal-mscale"])
def test_cos_sin_tables_equal_hugging_face(setting):
    rope_dim, theta, fields = SETTINGS[setting]
    yarn = YaRNConfig(**fields)
    positions = torch.arange(64)
    cos, sin = DeepseekV3RotaryEmbedding(hf_config(rope_dim, theta, yarn))(torch.ones(1), positions[None])
    ours = RotaryEmbedding(rope_dim, 64, theta, yarn)
    # HF repeats the D/2 angles twice (cat(freqs, freqs)) and computes them in fp32: at
    # position 63 its rounding alone reaches a few 1e-6.
    torch.testing.assert_close(ours.cos, cos[0, :, : rope_dim // 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sin, sin[0, :, : rope_dim // 2], atol=1e-5, rtol=0)


def test_band_keeps_fast_pairs_and_divides_slow_ones():
    yarn = YaRNConfig(factor=40.0, original_max_seq_len=4096)
    inv_freq, factor = rope_frequencies(64, 10000.0, yarn)
    plain, _ = rope_frequencies(64, 10000.0)
    assert inv_freq[0] == plain[0]  # turns 4096 / (2 pi) times over the original context: kept
    assert inv_freq[-1] == pytest.approx(plain[-1] / 40.0)  # turns less than once: interpolated
    assert factor == pytest.approx(0.1 * math.log(40.0) + 1.0)  # mscale_all_dim 0: YaRN's sqrt(1/t)


@pytest.mark.parametrize("setting", ["deepseek-v3", "deepseek-v2", "unequal-mscale", "gqa-no-truncate"])
def test_mla_softmax_scale_equals_hugging_face(setting):
    rope_dim, theta, fields = SETTINGS[setting]
    config = ModelConfig.from_dict(
        dict(
            d_model=32,
            n_head=4,
            rope_theta=theta,
            mla=dict(kv_lora_rank=8, qk_nope_head_dim=16, qk_rope_head_dim=rope_dim, v_head_dim=8),
            yarn=fields,
        )
    )
    qk_dim = 16 + rope_dim
    expected = yarn_apply_mscale(hf_config(rope_dim, theta, config.yarn).rope_parameters, qk_dim**-0.5)
    assert MultiHeadLatentAttention(config, layer=0).scale == pytest.approx(expected, rel=1e-12)
    if fields.get("mscale_all_dim"):
        assert expected > qk_dim**-0.5


def test_gqa_model_with_yarn_runs_on_scaled_tables(tiny):
    yarn = dict(factor=4.0, original_max_seq_len=8)
    plain, extended = tiny("llama-tiny", n_kv_head=2), tiny("llama-tiny", n_kv_head=2, yarn=yarn)
    torch.manual_seed(0)
    model = Transformer(extended).eval()
    expected_cos = RotaryEmbedding(extended.head_dim, 32, extended.rope_theta, YaRNConfig(**yarn)).cos
    torch.testing.assert_close(model.rope.cos, expected_cos)
    assert not torch.allclose(model.rope.cos, Transformer(plain).rope.cos)
    x = torch.randint(0, extended.vocab_size, (2, 20))
    cache = model.new_cache(batch_size=2)
    with torch.no_grad():
        pieces = [model(x[:, :12], cache), model(x[:, 12:], cache)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "yarn, message",
    [
        (dict(factor=0.5), r"model.yarn.factor: must be >= 1, got 0.5"),
        (dict(factor=4.0, beta_fast=1.0, beta_slow=32.0), r"model.yarn.beta_fast: need 0 < beta_slow < beta_fast"),
        (dict(factor=4.0, original_max_seq_len=0), r"model.yarn.original_max_seq_len: must be >= 1"),
        (dict(factor=4.0, mscale=-1.0), r"model.yarn.mscale: must be >= 0"),
        (dict(factor=4.0, attention_factor=0.0), r"model.yarn.attention_factor: must be positive"),
        (dict(factor=4.0, ramp=2), r"model.yarn: unknown key 'ramp'"),
    ],
)
def test_invalid_yarn_configs_name_the_field(yarn, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_name("llama-tiny", yarn=yarn)


def test_yarn_needs_rotary_positions():
    with pytest.raises(ConfigError, match="model.yarn: YaRN extends rotary embeddings"):
        ModelConfig.from_name("gpt2-baseline-tiny", yarn=dict(factor=2.0))
