"""Multi-head Latent Attention: the naive and absorbed paths agree, match Hugging Face, decode and train.

Weights are drawn with std 0.3 (norm gains included) rather than the init's 0.02, so the
attention patterns are far from uniform and a wrong mask, scale or rotary pairing
changes the outputs well beyond the tolerances.
"""

from __future__ import annotations

import pytest
import torch

from mistura.config import ModelConfig
from mistura.errors import ConfigError
from mistura.model import KVCache, LatentCache, Transformer
from mistura.model.mla import MultiHeadLatentAttention
from mistura.model.rope import RotaryEmbedding

D_MODEL, HEADS, T = 32, 4, 12
# Distinct widths everywhere, so a swapped split or transposed view cannot go unnoticed.
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6)
YARN = dict(factor=4.0, original_max_seq_len=8, mscale=1.0, mscale_all_dim=0.707)


def mla_config(q_lora_rank: int | None = 12, yarn: dict | None = None, **overrides) -> ModelConfig:
    fields = dict(vocab_size=97, max_seq_len=32, n_layer=2, d_model=D_MODEL, n_head=HEADS, norm_eps=1e-6)
    return ModelConfig.from_dict({**fields, "mla": dict(MLA, q_lora_rank=q_lora_rank), "yarn": yarn, **overrides})


def random_attention(config: ModelConfig, seed: int = 0) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    attn = MultiHeadLatentAttention(config, layer=0)
    with torch.no_grad():
        for param in attn.parameters():
            param.copy_(0.3 * torch.randn_like(param) + (1.0 if param.dim() == 1 else 0.0))  # norm gains near 1
    return attn.eval()


def inputs(B: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, length, D_MODEL, generator=torch.Generator().manual_seed(seed))


def rotary(config: ModelConfig) -> RotaryEmbedding:
    return RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.yarn)


def run_cached(attn, rope, x, cache, prefill: int) -> torch.Tensor:
    """A prefill of `prefill` tokens, then one token at a time; outputs (B, T, D) concatenated."""
    pieces, bounds = [], [0, prefill, *range(prefill + 1, x.shape[1] + 1)]
    for start, end in zip(bounds, bounds[1:]):
        pieces.append(attn(x[:, start:end], rope(start, end - start), cache))
        cache.advance(end - start)
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
@torch.no_grad()
def test_absorbed_and_naive_paths_agree(q_lora_rank):
    config = mla_config(q_lora_rank)
    attn, rope, x = random_attention(config), rotary(config), inputs()
    full = attn(x, rope(0, T), None)
    latent = LatentCache(config, batch_size=2, max_len=T)
    absorbed = run_cached(attn, rope, x, latent, prefill=5)
    naive = run_cached(attn, rope, x, KVCache(config, batch_size=2, max_len=T), prefill=5)
    prefill_only = attn(x, rope(0, T), LatentCache(config, batch_size=2, max_len=T))
    for result in (absorbed, naive, prefill_only):
        torch.testing.assert_close(result, full, atol=1e-5, rtol=1e-5)
    assert full.abs().mean() > 0.1  # far from a degenerate all-zero output
    # The latent cache holds the normalised latent and the roped key, nothing per head.
    assert latent.latent.shape == (config.n_layer, 2, T, MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"])
    assert latent.c_kv[0].abs().sum() > 0 and latent.c_kv[1].abs().sum() == 0


@torch.no_grad()
def test_a_latent_cache_needs_an_mla_model():
    with pytest.raises(ConfigError, match="no latent attention"):
        LatentCache(ModelConfig.from_name("llama-tiny"), batch_size=1, max_len=4)


def hf_attention(config: ModelConfig, ours: MultiHeadLatentAttention):
    """Hugging Face's DeepseekV3Attention with our weights (rotate-half rope, rope_interleave=False)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    mla, yarn = config.mla, config.yarn
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if yarn is not None:
        rope |= dict(
            rope_type="yarn",
            factor=yarn.factor,
            original_max_position_embeddings=yarn.original_max_seq_len,
            mscale=yarn.mscale,
            mscale_all_dim=yarn.mscale_all_dim,
        )
    hf_config = transformers.DeepseekV3Config(
        hidden_size=D_MODEL,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        rope_interleave=False,
    )
    hf_config._attn_implementation = "eager"
    hf = DeepseekV3Attention(hf_config, layer_idx=0).eval()
    renames = {"kv_a_proj.": "kv_a_proj_with_mqa.", "q_a_norm.": "q_a_layernorm.", "kv_a_norm.": "kv_a_layernorm."}
    state = {}
    for name, tensor in ours.state_dict().items():
        for old, new in renames.items():
            name = name.replace(old, new)
        state[name] = tensor
    hf.load_state_dict(state, strict=True)
    return hf, DeepseekV3RotaryEmbedding(hf_config)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
@pytest.mark.parametrize("yarn", [None, YARN], ids=["rope", "yarn"])
@torch.no_grad()
def test_matches_hugging_face_deepseek_v3_attention(q_lora_rank, yarn):
    length = 24  # beyond YaRN's original context of 8
    config = mla_config(q_lora_rank, yarn)
    attn, x = random_attention(config), inputs(length=length)
    hf, hf_rotary = hf_attention(config, attn)
    cos, sin = hf_rotary(x, torch.arange(length)[None])
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    expected, _ = hf(x, position_embeddings=(cos, sin), attention_mask=causal)
    rope = rotary(config)
    torch.testing.assert_close(attn(x, rope(0, length), None), expected, atol=1e-4, rtol=1e-4)
    latent = LatentCache(config, batch_size=2, max_len=length)
    torch.testing.assert_close(run_cached(attn, rope, x, latent, prefill=16), expected, atol=1e-4, rtol=1e-4)
    if yarn is not None:  # both YaRN factors are in play: on cos/sin and on the softmax scale
        assert not torch.allclose(cos[0, :, 0], torch.ones(length)) and attn.scale != (8 + 8) ** -0.5


def test_gradients_reach_every_parameter_in_the_naive_path():
    config = mla_config(12)
    attn, rope, x = random_attention(config).train(), rotary(config), inputs()
    attn(x, rope(0, T), None).square().mean().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def tiny_mla_model(latent_rank: int | None = 12) -> Transformer:
    moe = dict(n_experts=4, top_k=2, d_expert=16, d_shared=16, scoring="sigmoid", norm_topk=True, n_groups=2)
    config = ModelConfig.from_name(
        "dragao-tiny", vocab_size=97, max_seq_len=32, n_layer=2, d_model=D_MODEL, n_head=HEADS, d_ff=64,
        mla=dict(MLA, q_lora_rank=latent_rank), moe=moe,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the init's, so the next token is decided by a clear margin
        for param in model.parameters():
            param.mul_(5.0)
    return model


@pytest.mark.parametrize("latent", [True, False], ids=["latent-cache", "kv-cache"])
@torch.no_grad()
def test_model_cached_decoding_equals_full_recompute(latent):
    model = tiny_mla_model()
    x = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(batch_size=2, latent=latent)
    assert isinstance(cache, LatentCache if latent else KVCache)
    pieces = [model(x[:, :5], cache), model(x[:, 5:6], cache), model(x[:, 6:14], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_cached_greedy_generation_equals_recomputing(q_lora_rank, greedy):
    model = tiny_mla_model(q_lora_rank)
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    cached = greedy(model, prompt, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    assert len(set(seq[0, 4:].tolist())) > 1  # not one token repeated


def test_config_round_trips_and_old_configs_stay_unchanged():
    config = mla_config(12, YARN)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.head_dim == MLA["qk_rope_head_dim"] and config.n_kv_head == HEADS
    assert config.kv_cache_bytes_per_token(2) == 2 * 2 * (16 + 8)
    plain = ModelConfig.from_name("llama-tiny").to_dict()
    assert "mla" not in plain and "yarn" not in plain


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mla=dict(MLA, qk_rope_head_dim=7)), r"model.mla.qk_rope_head_dim: RoPE needs an even width, got 7"),
        (dict(mla=dict(MLA, kv_lora_rank=0)), r"model.mla.kv_lora_rank: must be >= 1, got 0"),
        (dict(mla=dict(MLA, q_lora_rank=-4)), r"model.mla.q_lora_rank: must be >= 1, got -4"),
        (dict(mla=dict(MLA, kv_lora_rank="big")), r"model.mla.kv_lora_rank: expected int"),
        (dict(mla=dict(MLA, kv_rank=16)), r"model.mla: unknown key 'kv_rank'"),
        (dict(n_kv_head=2), r"model.n_kv_head: MLA gives every query head its own key/value head"),
        (dict(head_dim=16), r"model.head_dim: with MLA it is the rotary width mla.qk_rope_head_dim=8"),
        (dict(position="learned"), r"model.position: MLA needs rotary embeddings"),
        (dict(bias=True), r"model.bias: MLA projections have no biases"),
        (dict(qk_norm=True), r"model.qk_norm: MLA already normalises its latents"),
    ],
)
def test_invalid_mla_configs_name_the_field(overrides, message):
    fields = dict(d_model=D_MODEL, n_head=HEADS, mla=MLA)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**fields, **overrides})
