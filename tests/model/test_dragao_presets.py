"""The DeepSeek presets: sizes against the published figures, the CPU-scale model, MLA's cache saving.

The big presets are built on the meta device: shapes only, no memory.

Published sizes: DeepSeek-V2-Lite 15.7B total / 2.4B activated, DeepSeek-V2 236B / 21B
(arXiv:2405.04434), DeepSeek-V3 671B / 37B without its multi-token-prediction module
(arXiv:2412.19437). The activated counts match `active_non_embedding`: the lm_head is
in, the input embedding (a lookup of one row) is out; counting it too would give V2-Lite
2.66B. Those figures carry two significant digits, so they can be off by half a unit in
the last digit: 0.05 / 2.4 = 2.1% for V2-Lite, whose exact count is 2.45B.
"""

from __future__ import annotations

import json

import pytest
import torch

from mistura.cli import main
from mistura.config import ModelConfig
from mistura.model import LatentCache, Transformer

# preset: (published total, published active, exact total, exact active_non_embedding)
SIZES = {
    "dragao-16b": (15.7e9, 2.4e9, 15_706_484_224, 2_451_435_008),
    "dragao-236b": (236e9, 21e9, 235_741_434_880, 20_851_512_320),
    "dragao-671b": (671e9, 37e9, 671_026_404_352, 36_625_603_584),
}


def counts_of(preset: str) -> dict[str, int]:
    with torch.device("meta"):
        return Transformer(ModelConfig.from_name(preset)).parameter_counts()


@pytest.mark.parametrize("preset", SIZES)
def test_big_presets_have_the_published_sizes(preset):
    published_total, published_active, total, active = SIZES[preset]
    counts = counts_of(preset)
    assert (counts["total"], counts["active_non_embedding"]) == (total, active)
    assert abs(counts["total"] / published_total - 1) < 0.01
    assert abs(counts["active_non_embedding"] / published_active - 1) < 0.025  # two significant digits
    assert counts["active"] - counts["active_non_embedding"] == counts["embedding"]  # untied: the lookup table
    print(f"{preset}: total {total / 1e9:.2f}B, active {active / 1e9:.2f}B")


def test_params_command_builds_the_671b_model_without_memory(capsys):
    assert main(["params", "dragao-671b", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["total"] == SIZES["dragao-671b"][2]
    assert printed["kv_cache_bytes_per_token_bf16"] == 2 * 61 * (512 + 64)
    assert main(["params", "dragao-671b"]) == 0
    text = capsys.readouterr().out
    assert "MLA, 128 heads, latent 512 + rope 64, query rank 1536" in text and "YaRN x40" in text


def test_tiny_preset_trains_on_cpu():
    config = ModelConfig.from_name("dragao-tiny", max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(config)
    counts = model.parameter_counts()
    assert 5e6 <= counts["total"] <= 10e6 and counts["active"] < counts["total"]
    x = torch.randint(0, config.vocab_size, (2, 32))
    logits, auxes = model(x[:, :-1], return_aux=True)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + sum(a.loss for a in auxes)
    loss.backward()
    assert torch.isfinite(loss) and len(auxes) == 5
    attn = model.blocks[0].attn
    for name in ("q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj"):
        assert getattr(attn, name).weight.grad.abs().sum() > 0, name


def test_tiny_preset_cache_is_the_formula():
    config = ModelConfig.from_name("dragao-tiny", max_seq_len=32)
    mla = config.mla
    assert config.kv_cache_bytes_per_token(2) == 2 * config.n_layer * (mla.kv_lora_rank + mla.qk_rope_head_dim)
    cache = LatentCache(config, batch_size=3, max_len=32, dtype=torch.bfloat16)
    held = cache.latent.numel() * cache.latent.element_size()
    assert held == 3 * 32 * config.kv_cache_bytes_per_token(2)


def test_latent_cache_saving_over_multi_head_attention():
    v3 = ModelConfig.from_name("dragao-671b")
    mla_bytes = v3.kv_cache_bytes_per_token(2)
    # Multi-head attention of the same width caches 2 * 128 heads * 128 channels per layer
    # (DeepSeek-V2's own comparison, n_h d_h); GQA with 8 key/value heads a sixteenth of that.
    mha = ModelConfig.from_name("dragao-671b", mla=None, yarn=None, head_dim=128)
    gqa = ModelConfig.from_name("dragao-671b", mla=None, yarn=None, head_dim=128, n_kv_head=8)
    mha_bytes, gqa_bytes = mha.kv_cache_bytes_per_token(2), gqa.kv_cache_bytes_per_token(2)
    assert (mla_bytes, mha_bytes, gqa_bytes) == (2 * 61 * 576, 2 * 61 * 2 * 128 * 128, 2 * 61 * 2 * 8 * 128)
    print(f"dragao-671b per token, bf16: MLA {mla_bytes:,} B, MHA {mha_bytes:,} B, GQA-8 {gqa_bytes:,} B")
    assert mla_bytes / mha_bytes == pytest.approx(576 / 32768)  # 1.76%: a 98.2% saving

    # The 93.3% of the DeepSeek-V2 paper compares V2 (MLA, its cache quantised to 6 bits per
    # value on average) with DeepSeek 67B (95 layers, GQA with 8 key/value heads of 128, bf16).
    v2_bytes = ModelConfig.from_name("dragao-236b").kv_cache_bytes_per_token(1) * 6 / 8
    dense_67b = ModelConfig(d_model=8192, n_head=64, n_kv_head=8, n_layer=95).kv_cache_bytes_per_token(2)
    reduction = 1 - v2_bytes / dense_67b
    print(f"DeepSeek-V2 vs 67B: {v2_bytes:,.0f} B vs {dense_67b:,} B per token, {reduction:.1%} less")
    assert round(reduction, 3) == 0.933
