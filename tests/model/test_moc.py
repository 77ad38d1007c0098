import math

import pytest
import torch
import torch.nn.functional as F

from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.model.moe import CollaborativeExperts
from mistura.model.moe.moc import balance_loss, diversity_loss

EXPERTS = dict(n_experts=4, top_k=2, d_expert=16, moc_heads=2, aux_loss_weight=0.01, diversity_loss_weight=0.01)


@pytest.fixture
def moc(tiny):
    """A tiny two-layer config whose MLPs are both collaborative-expert layers."""

    def make(**experts):
        return tiny("moc-tiny", layer_mlp=("moc", "moc"), moe={**EXPERTS, **experts})

    return make


def ids(config, B=2, T=12, seed=0):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def layer_and_input(config, seed=0, B=2, T=5):
    torch.manual_seed(seed)
    return CollaborativeExperts(config), torch.randn(B, T, config.d_model)


def test_output_shape_load_and_stats(moc):
    layer, x = layer_and_input(moc(), B=3, T=5)
    y, aux = layer(x)
    assert y.shape == (3, 5, 32)
    assert aux.load.shape == (4,) and aux.load.sum() == 3 * 5 * 2
    assert aux.loss.shape == () and torch.isfinite(aux.loss)
    assert set(aux.stats) == {"balance_loss", "diversity_loss", "entropy", "dropped_fraction"}
    assert aux.stats["dropped_fraction"] == 0
    assert 0 < aux.stats["entropy"] <= math.log(4)


def test_every_expert_is_a_swiglu_of_its_stacked_weights(moc):
    layer, x = layer_and_input(moc())
    flat = x.reshape(-1, 32)
    w = layer.experts
    by_hand = torch.stack(
        [(F.silu(flat @ w.gate_proj[e].T) * (flat @ w.up_proj[e].T)) @ w.down_proj[e].T for e in range(4)], dim=1
    )  # (N, E, D)
    torch.testing.assert_close(layer.expert_outputs(flat), by_hand)


def test_routing_is_topk_of_token_plus_context_logits(moc):
    layer, x = layer_and_input(moc())
    flat = x.reshape(-1, 32)
    answers = layer.expert_outputs(flat)
    routing = layer.route(flat, answers)
    top = routing.logits.topk(2, dim=-1)
    assert torch.equal(routing.experts, top.indices)
    torch.testing.assert_close(routing.weights, top.values.softmax(-1))
    torch.testing.assert_close(routing.scores, routing.logits.softmax(-1))
    with torch.no_grad():
        layer.score.weight.zero_()  # silence the context: only the token's gate is left
    torch.testing.assert_close(layer.route(flat, answers).logits, flat @ layer.gate.weight.T)


def test_router_logits_stay_fp32_under_autocast(moc):
    layer, x = layer_and_input(moc())
    flat = x.reshape(-1, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.route(flat, layer.expert_outputs(flat))
    assert routing.logits.dtype == routing.weights.dtype == torch.float32


def test_without_refinement_all_experts_selected_is_a_soft_mixture(moc):
    layer, x = layer_and_input(moc(top_k=4))
    with torch.no_grad():
        layer.fusion_attn.out_proj.weight.zero_()  # the fusion adds nothing to the answers
    flat = x.reshape(-1, 32)
    answers = layer.expert_outputs(flat)  # (N, E, D)
    probs = layer.route(flat, answers).scores  # (N, E)
    y, _ = layer(x)
    torch.testing.assert_close(y.reshape(-1, 32), (probs[..., None] * answers).sum(1))


def test_gradient_reaches_router_and_both_attentions(moc):
    layer, x = layer_and_input(moc())
    y, aux = layer(x)
    (y.sum() + aux.loss).backward()
    for param in (
        layer.gate.weight,
        layer.score.weight,
        layer.router_attn.in_proj_weight,
        layer.fusion_attn.in_proj_weight,
        layer.experts.down_proj,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_aux_loss_alone_trains_the_router_and_the_fusion(moc):
    layer, x = layer_and_input(moc())
    _, aux = layer(x)
    aux.loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0  # balance loss, through the soft probabilities
    assert layer.fusion_attn.in_proj_weight.grad.abs().sum() > 0  # diversity loss


def test_balance_loss_formula():
    assert balance_loss(torch.full((6, 4), 0.25)) == pytest.approx(0.0)
    collapsed = F.one_hot(torch.zeros(6, dtype=torch.long), 4).float()
    assert balance_loss(collapsed) == pytest.approx(3.0)  # E - 1
    uneven = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(5, 1)
    # mean share 1/4, squared deviations 0.0225 + 0.0025 + 0.0025 + 0.0225 over 4, times 4^2
    assert balance_loss(uneven) == pytest.approx(0.2)


def test_layer_balance_loss_is_the_formula_on_its_routing(moc):
    layer, x = layer_and_input(moc())
    _, aux = layer(x)
    flat = x.reshape(-1, 32)
    probs = layer.route(flat, layer.expert_outputs(flat)).scores  # (N, E)
    share = probs.mean(0)
    by_hand = 16 * ((share - 0.25) ** 2).mean()
    torch.testing.assert_close(aux.stats["balance_loss"], by_hand)
    assert by_hand > 0


def test_diversity_loss_formula():
    assert diversity_loss(torch.full((3, 2, 4, 4), 0.25)) == pytest.approx(0.0, abs=1e-6)
    assert diversity_loss(torch.eye(4).expand(3, 2, 4, 4)) == pytest.approx(1.0)
    assert diversity_loss(torch.ones(3, 2, 1, 1)) == 0.0  # K = 1: nothing to spread
    half = torch.tensor([0.5, 0.5, 0.0]).expand(1, 1, 3, 3)  # entropy log 2 of at most log 3
    assert diversity_loss(half) == pytest.approx(1 - math.log(2) / math.log(3))


def test_layer_diversity_loss_is_the_formula_on_fusion_weights_by_hand(moc):
    layer, x = layer_and_input(moc())
    layer.experts.reset_parameters(std=0.3)  # large answers, sharp fusion attention: a loss well above 0
    _, aux = layer(x)
    flat = x.reshape(-1, 32)
    answers = layer.expert_outputs(flat)
    selected = answers.take_along_dim(layer.route(flat, answers).experts[..., None], dim=1)  # (N, K, D)
    N, K, H, hd = selected.shape[0], 2, 2, 16
    w_q, w_k, _ = layer.fusion_attn.in_proj_weight.chunk(3)
    q = (selected @ w_q.T).view(N, K, H, hd).transpose(1, 2)  # (N, H, K, hd)
    k = (selected @ w_k.T).view(N, K, H, hd).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # (N, H, K, K)
    torch.testing.assert_close(layer.fuse(selected)[1], weights)
    by_hand = 1 - (-(weights * weights.log()).sum(-1)).mean() / math.log(K)
    torch.testing.assert_close(aux.stats["diversity_loss"], by_hand)
    assert by_hand > 0.1


def test_heads_must_divide_width(moc):
    with pytest.raises(ConfigError, match="moc_heads: 3 heads do not divide d_model=32"):
        CollaborativeExperts(moc(moc_heads=3))


def test_every_parameter_is_active(moc):
    counts = Transformer(moc()).parameter_counts()
    assert counts["active"] == counts["total"]


def test_future_tokens_never_change_past_logits(moc):
    config = moc()
    torch.manual_seed(0)
    model = Transformer(config).eval()
    x = ids(config, T=10)
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % config.vocab_size
    (a, auxes), b = model(x, return_aux=True), model(y)
    assert len(auxes) == 2
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_cached_decoding_equals_full_recompute(moc):
    config = moc()
    torch.manual_seed(0)
    model = Transformer(config).eval()
    x = ids(config, T=14)
    full = model(x)
    cache = model.new_cache(batch_size=2)
    pieces = [model(x[:, :5], cache), model(x[:, 5:6], cache), model(x[:, 6:14], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_overfitting_one_batch(moc):
    config = moc()
    torch.manual_seed(0)
    model = Transformer(config)
    x = ids(config, B=4, T=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        logits, auxes = model(x[:, :-1], return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        (loss + sum(aux.loss for aux in auxes)).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # about ln(97) at initialisation
    assert losses[-1] < 0.1 * losses[0]
