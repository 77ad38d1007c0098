import math

import pytest
import torch
import torch.nn.functional as F

from mistura.model import Transformer
from mistura.model.rope import RotaryEmbedding, apply_rope

PRESETS = ["llama-tiny", "gpt2-baseline-tiny", "seed004-baseline"]


def ids(config, B=2, T=12, seed=0):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_shape(tiny, preset):
    config = tiny(preset)
    torch.manual_seed(0)
    logits = Transformer(config)(ids(config, B=3, T=7))
    assert logits.shape == (3, 7, config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_future_tokens_never_change_past_logits(tiny, preset):
    config = tiny(preset)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    x = ids(config, T=10)
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % config.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_rope_scores_depend_only_on_distance():
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        qi = apply_rope(q, *(t[i : i + 1] for t in rope(0, 64)))
        kj = apply_rope(k, *(t[j : j + 1] for t in rope(0, 64)))
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    torch.testing.assert_close(score(9, 9), score(0, 0))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rope_keeps_norms():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16, theta=500.0)
    x = torch.randn(2, 3, 16, 8)
    torch.testing.assert_close(apply_rope(x, *rope(0, 16)).norm(dim=-1), x.norm(dim=-1))


def test_gqa_equals_mha_with_repeated_kv_heads(tiny):
    gqa_config = tiny("llama-tiny", n_kv_head=2)
    mha_config = tiny("llama-tiny", n_kv_head=4)
    torch.manual_seed(0)
    gqa, mha = Transformer(gqa_config).eval(), Transformer(mha_config).eval()
    state = gqa.state_dict()
    group = 4 // 2
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (H_kv * D, d) -> (H * D, d)
            heads = tensor.view(2, -1, tensor.shape[-1])
            state[name] = heads.repeat_interleave(group, dim=0).reshape(-1, tensor.shape[-1])
    mha.load_state_dict(state)
    x = ids(gqa_config)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_sdpa_matches_manual_attention(tiny):
    config = tiny("llama-tiny", n_kv_head=2)
    torch.manual_seed(0)
    attn = Transformer(config).blocks[0].attn
    x = torch.randn(2, 9, config.d_model)
    B, T, H, D = 2, 9, config.n_head, config.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 2, D).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.v_proj(x).view(B, T, 2, D).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    manual = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
    torch.testing.assert_close(attn(x, None, None), attn.o_proj(manual), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_decoding_equals_full_recompute(tiny, preset):
    config = tiny(preset)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    x = ids(config, T=14)
    full = model(x)
    cache = model.new_cache(batch_size=2)
    pieces = [model(x[:, :5], cache), model(x[:, 5:6], cache), model(x[:, 6:14], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 14


def test_cached_greedy_generation_equals_recomputing(tiny, greedy):
    config = tiny("llama-tiny")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt = ids(config, T=4)
    cached = greedy(model, prompt, 12)
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_tied_embeddings_share_one_tensor(tiny):
    tied = Transformer(tiny("llama-tiny", tie_embeddings=True))
    untied = Transformer(tiny("llama-tiny", tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    diff = untied.parameter_counts()["total"] - tied.parameter_counts()["total"]
    assert diff == 97 * 32


def test_logit_softcap_is_a_scaled_tanh(tiny):
    config = tiny("llama-tiny", logit_softcap=2.0, init_std=1.0)
    torch.manual_seed(0)
    capped = Transformer(config)
    plain = Transformer(tiny("llama-tiny", init_std=1.0))
    plain.load_state_dict(capped.state_dict())
    x = ids(config)
    torch.testing.assert_close(capped(x), 2.0 * torch.tanh(plain(x) / 2.0))
    assert capped(x).abs().max() <= 2.0 < plain(x).abs().max()


def test_adaptive_rmsnorm_alpha_scales_output(tiny):
    model = Transformer(tiny("llama-tiny", adaptive_norm=True))
    norm = model.norm
    x = torch.randn(3, 32)
    base = norm(x)
    with torch.no_grad():
        norm.alpha.fill_(2.0)
    torch.testing.assert_close(norm(x), 2 * base)
    torch.testing.assert_close(base.pow(2).mean(-1), torch.ones(3), atol=1e-4, rtol=1e-4)


def test_dropout_only_in_training(tiny):
    config = tiny("llama-tiny", attn_dropout=0.5, resid_dropout=0.5, mlp_dropout=0.5)
    model = Transformer(config)
    x = ids(config)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_scaled_init_of_residual_projections(tiny):
    config = tiny("llama-tiny", n_layer=8, d_model=128, d_ff=512, n_head=4)
    torch.manual_seed(0)
    model = Transformer(config)
    block = model.blocks[0]
    expected = 0.02 / math.sqrt(2 * 8)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_activation_checkpointing_gives_same_gradients(tiny):
    config = tiny("llama-tiny")
    x = ids(config)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Transformer(config)
        model.activation_checkpointing = checkpointing
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        grads.append(model.blocks[0].attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_overfitting_one_batch(tiny):
    config = tiny("llama-tiny")
    torch.manual_seed(0)
    model = Transformer(config)
    x = ids(config, B=4, T=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # about ln(97) at initialisation
    assert losses[-1] < 0.1 * losses[0]


def test_sequence_longer_than_context_is_a_clear_error(tiny):
    config = tiny("llama-tiny")
    with pytest.raises(ValueError, match="max_seq_len=32"):
        Transformer(config)(torch.zeros(1, 33, dtype=torch.long))
