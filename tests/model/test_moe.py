import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mistura.model.moe.experts as experts_module
from mistura.cli import main
from mistura.config import ModelConfig, MoEConfig
from mistura.model import Transformer
from mistura.model.moe import MoELayer, Router

D = 32  # the tiny fixture's d_model


def moe_layer(tiny, seed=0, **moe):
    """A MoE layer (4 experts, top-2 unless overridden) with O(1) random weights: no near-ties in routing."""
    config = tiny("qwen-moe-8e-top2", moe={"n_experts": 4, "top_k": 2, "d_expert": 16, **moe})
    torch.manual_seed(seed)
    layer = MoELayer(config)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    return layer


def swiglu(x, gate, up, down):
    return down @ (F.silu(gate @ x) * (up @ x))


def route(layer, x):
    """Chosen experts (N, K) and their weights, computed from the definition token by token."""
    cfg = layer.config
    logits = x @ layer.router.gate.weight.T
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
    chosen = scores.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(-1, chosen)
    if cfg.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    return chosen, weights * cfg.route_scale


def reference(layer, x, keep=None):
    """sum_k w_k * SwiGLU_{e_k}(x) per token from the stacked weights, + the shared expert; keep (N, E) masks."""
    ex, shared = layer.experts, layer.shared
    chosen, weights = route(layer, x)
    out = torch.zeros_like(x)
    for n in range(len(x)):
        for e, w in zip(chosen[n].tolist(), weights[n], strict=True):
            if keep is None or keep[n, e]:
                out[n] += w * swiglu(x[n], ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e])
        if shared is not None:
            s = swiglu(x[n], shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
            gate = torch.sigmoid(layer.shared_gate.weight @ x[n]) if layer.shared_gate is not None else 1.0
            out[n] += gate * s
    return out


ROUTINGS = {
    "softmax": {},
    "softmax-renormalised": {"norm_topk": True},
    "sigmoid": {"scoring": "sigmoid"},
    "sigmoid-renormalised-scaled": {"scoring": "sigmoid", "norm_topk": True, "route_scale": 2.5},
    "idle-experts": {"n_experts": 8, "top_k": 1},  # 6 tokens, 8 experts: some get no rows
    "shared-expert": {"d_shared": 24},
    "gated-shared-expert": {"d_shared": 24, "shared_gate": True},
}


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS)
def test_dispatch_equals_per_token_reference(tiny, monkeypatch, routing, grouped_mm):
    calls, real = [], torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    monkeypatch.setattr(experts_module, "HAS_GROUPED_MM", grouped_mm)
    layer = moe_layer(tiny, **routing).eval()
    x = torch.randn(2, 3, D)
    y, aux = layer(x)
    torch.testing.assert_close(y.view(6, D), reference(layer, x.view(6, D)), atol=1e-5, rtol=1e-5)
    assert bool(calls) == grouped_mm
    assert aux.stats["dropped_fraction"] == 0


def test_widths_that_are_not_16_byte_aligned(tiny):
    layer = moe_layer(tiny, d_expert=18).eval()  # 18 fp32 = 72 bytes
    x = torch.randn(6, D)
    torch.testing.assert_close(layer(x.view(2, 3, D))[0].view(6, D), reference(layer, x), atol=1e-5, rtol=1e-5)


def test_grouped_mm_and_loop_give_the_same_gradients(tiny, monkeypatch):
    def grads(grouped_mm):
        monkeypatch.setattr(experts_module, "HAS_GROUPED_MM", grouped_mm)
        layer = moe_layer(tiny, n_experts=8, top_k=1)  # 6 tokens, 8 experts: some get no rows
        layer(torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1)))[0].square().sum().backward()
        return {name: p.grad for name, p in layer.named_parameters()}

    grouped, looped = grads(True), grads(False)
    for name in grouped:
        torch.testing.assert_close(grouped[name], looped[name], atol=1e-6, rtol=1e-5, msg=name)


def kept_first_come(chosen, capacity, n_experts):
    """(N, E) mask of kept assignments: each expert keeps its first `capacity` in (token, k) order."""
    keep = torch.zeros(len(chosen), n_experts, dtype=torch.bool)
    taken = [0] * n_experts
    for n, experts in enumerate(chosen.tolist()):
        for e in experts:
            keep[n, e] = taken[e] < capacity
            taken[e] += 1
    return keep


def test_capacity_drops_each_experts_latest_assignments(tiny):
    layer = moe_layer(tiny, capacity_factor=0.3).train()
    x = torch.randn(16, D)
    capacity = math.ceil(0.3 * 16 * 2 / 4)  # 3 of the 32 assignments per expert
    chosen, _ = route(layer, x)
    keep = kept_first_come(chosen, capacity, n_experts=4)
    y, aux = layer(x.view(2, 8, D))
    y = y.view(16, D)
    dropped = 32 - int(keep.sum())
    assert dropped > 0 and keep.sum(0).tolist() == [min(capacity, c) for c in aux.load.int().tolist()]
    torch.testing.assert_close(y, reference(layer, x, keep), atol=1e-5, rtol=1e-5)
    fully_dropped = ~keep.any(1)
    assert fully_dropped.any() and (y[fully_dropped] == 0).all()
    assert aux.stats["dropped_fraction"].item() == pytest.approx(dropped / 32)
    assert aux.load.tolist() == torch.bincount(chosen.flatten(), minlength=4).tolist()  # counted before dropping


def test_capacity_applies_only_in_training(tiny):
    layer = moe_layer(tiny, capacity_factor=0.3).eval()
    x = torch.randn(16, D)
    y, aux = layer(x.view(2, 8, D))
    torch.testing.assert_close(y.view(16, D), reference(layer, x), atol=1e-5, rtol=1e-5)
    assert aux.stats["dropped_fraction"] == 0


def test_dropless_training_drops_nothing(tiny):
    layer = moe_layer(tiny, capacity_factor=None).train()
    x = torch.randn(16, D)
    y, aux = layer(x.view(2, 8, D))
    torch.testing.assert_close(y.view(16, D), reference(layer, x), atol=1e-5, rtol=1e-5)
    assert aux.stats["dropped_fraction"] == 0


def test_bias_balancing_evens_out_a_skewed_router():
    torch.manual_seed(0)
    router = Router(8, MoEConfig(n_experts=4, top_k=2, scoring="sigmoid", balance_bias_rate=0.01))
    with torch.no_grad():
        router.gate.weight.normal_(0.0, 0.5)
        router.gate.weight[0, 0] = 5.0  # feature 0 is always 1: expert 0 wins every token
    x = torch.randn(512, 8)
    x[:, 0] = 1.0

    def load():
        return torch.bincount(router.eval()(x).experts.flatten(), minlength=4).float()

    def cv(load):
        return float(load.std(correction=0) / load.mean())

    before = load()
    router.balance_step()  # evaluation forwards do not count toward the load
    assert before[0] == 512 and not router.expert_bias.any()
    router.train()
    for _ in range(100):
        router(x)
        router.balance_step()
    after = load()
    assert cv(after) < cv(before) / 5
    assert after.max() <= 1.1 * 512 * 2 / 4


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_selection_bias_steers_the_choice_but_not_the_weights(scoring):
    torch.manual_seed(0)
    router = Router(8, MoEConfig(n_experts=4, top_k=2, scoring=scoring, balance_bias_rate=0.01)).eval()
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))
    x = torch.randn(64, 8)
    routing = router(x)
    assert (routing.experts.sort(-1).values == torch.tensor([2, 3])).all()
    logits = x @ router.gate.weight.T
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    torch.testing.assert_close(routing.weights, scores.gather(-1, routing.experts))


# Four tokens (two sequences of two) over three experts with routing probabilities P. The layer's
# gate is the identity (the input's fourth channel is zero), so the input is the router logits.
P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.25, 0.15, 0.6]])
SHIFT = torch.tensor([1.0, 2.0, 0.0, -1.0])  # softmax logits log(P) + shift have logsumexp = shift
# Top-1 picks experts 0, 1, 0, 2; top-2 picks {0, 1}, {1, 2}, {0, 1}, {0, 2}. Mean probabilities
# (0.3875, 0.3125, 0.3); per sequence (0.4, 0.4, 0.2) and (0.375, 0.225, 0.4).
# Switch, top-1: 3 * (2/4 * 0.3875 + 1/4 * 0.3125 + 1/4 * 0.3) = 1.040625
# Switch, top-2: 3 * (3/8 * 0.3875 + 3/8 * 0.3125 + 2/8 * 0.3) = 1.0125
# Sequence-wise, f = E / (K T) * count:
#   top-1: mean(1.5 * 0.4 + 1.5 * 0.4, 1.5 * 0.375 + 1.5 * 0.4) = mean(1.2, 1.1625) = 1.18125
#   top-2: mean(0.75 * 0.4 + 1.5 * 0.4 + 0.75 * 0.2, 1.5 * 0.375 + 0.75 * 0.225 + 0.75 * 0.4) = 1.040625
HAND = {1: {"balance_loss": 1.040625, "seq_aux_loss": 1.18125}, 2: {"balance_loss": 1.0125, "seq_aux_loss": 1.040625}}
WEIGHTS = {"aux_loss_weight": 0.5, "z_loss_weight": 0.1, "seq_aux_loss_weight": 0.2, "entropy_weight": 0.3}
LOSS_OF = {"aux_loss_weight": "balance_loss", "z_loss_weight": "z_loss", "seq_aux_loss_weight": "seq_aux_loss",
           "entropy_weight": "entropy_loss"}  # fmt: skip


def identity_router_layer(top_k, scoring="softmax", **moe):
    config = ModelConfig(
        d_model=4, n_head=1, moe=MoEConfig(n_experts=3, top_k=top_k, d_expert=4, scoring=scoring, **moe)
    )
    layer = MoELayer(config)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(3, 4))
    return layer


def logits_in(logits, B, T):
    return F.pad(logits, (0, 1)).view(B, T, 4)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_losses_on_a_hand_computed_case(top_k, scoring):
    layer = identity_router_layer(top_k, scoring, **WEIGHTS)
    # Sigmoid scores P (rows sum to one) normalise to P: same choices and probabilities.
    logits = P.log() + SHIFT[:, None] if scoring == "softmax" else torch.logit(P)
    _, aux = layer(logits_in(logits, 2, 2))
    mean = P.mean(0)
    expected = {
        **HAND[top_k],
        "z_loss": torch.logsumexp(logits, -1).square().mean().item(),
        "entropy_loss": math.log(3) + (mean * mean.log()).sum().item(),
    }
    if scoring == "softmax":
        assert expected["z_loss"] == pytest.approx(1.5)  # mean(shift^2)
    for name, value in expected.items():
        assert aux.stats[name].item() == pytest.approx(value, rel=1e-5), name
    assert aux.stats["entropy"].item() == pytest.approx(-(P * P.log()).sum(-1).mean().item(), rel=1e-5)
    weighted = sum(weight * expected[LOSS_OF[name]] for name, weight in WEIGHTS.items())
    assert aux.loss.item() == pytest.approx(weighted, rel=1e-5)


def test_entropy_loss_is_zero_for_uniform_mean_probabilities():
    layer = identity_router_layer(top_k=1)
    rows = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7]])  # each expert's mean is 1/3
    _, aux = layer(logits_in(rows.log(), 1, 3))
    assert aux.stats["entropy_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert aux.stats["balance_loss"].item() == pytest.approx(1.0)  # Switch loss is 1 when balanced
    assert aux.stats["entropy"].item() > 0.5  # each token's own distribution is far from uniform


def test_group_limited_routing_picks_from_the_best_groups():
    torch.manual_seed(0)
    config = MoEConfig(n_experts=16, top_k=3, n_groups=4, topk_groups=2, scoring="sigmoid")
    router = Router(8, config).eval()
    nn.init.normal_(router.gate.weight, std=1.0)
    x = torch.randn(256, 8)
    routing = router(x)
    grouped = routing.scores.view(256, 4, 4)
    best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # (N, 2)
    in_best = (routing.experts[:, :, None] // 4 == best_groups[:, None, :]).any(-1)
    assert in_best.all()
    eligible = torch.zeros(256, 4, dtype=torch.bool).scatter_(1, best_groups, True).repeat_interleave(4, dim=1)
    expected = routing.scores.masked_fill(~eligible, -1.0).topk(3).indices
    assert torch.equal(routing.experts.sort(-1).values, expected.sort(-1).values)
    unrestricted = routing.scores.topk(3).indices.sort(-1).values
    assert not torch.equal(routing.experts.sort(-1).values, unrestricted)  # the limit matters here


QWEN = ["qwen-moe-4e-top1", "qwen-moe-8e-top2", "qwen-moe-6e-top1"]


def counts_of(preset):
    with torch.device("meta"):
        return Transformer(ModelConfig.from_name(preset)).parameter_counts()


@pytest.mark.parametrize("preset", [*QWEN, "deepseek-moe-tiny"])
def test_active_parameters_leave_out_the_unchosen_experts(preset):
    config = ModelConfig.from_name(preset)
    moe, counts = config.moe, counts_of(preset)
    per_expert = 3 * config.d_model * moe.d_expert
    inactive = config.layer_mlp.count("moe") * (moe.n_experts - moe.top_k) * per_expert
    assert counts["active"] == counts["total"] - inactive


@pytest.mark.parametrize("preset", QWEN)
def test_qwen_presets_print_about_the_baselines_active_size(preset, capsys):
    assert main(["params", preset, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    baseline = counts_of("seed004-baseline")["active"]
    assert printed["active"] == counts_of(preset)["active"]
    assert abs(printed["active"] - baseline) <= 0.01 * baseline


def tiny_moe(tiny, kind):
    if kind == "qwen":  # a small capacity factor: training would drop, evaluation must not
        return tiny("qwen-moe-8e-top2", moe={"n_experts": 4, "top_k": 2, "d_expert": 16, "capacity_factor": 0.5})
    moe = {"n_experts": 8, "top_k": 2, "d_expert": 16, "d_shared": 16, "scoring": "sigmoid", "norm_topk": True,
           "n_groups": 4, "topk_groups": 2, "balance_bias_rate": 0.01}  # fmt: skip
    return tiny("deepseek-moe-tiny", n_kv_head=2, moe=moe)


def moe_model(tiny, kind):
    torch.manual_seed(0)
    model = Transformer(tiny_moe(tiny, kind)).eval()
    for module in model.modules():
        if isinstance(module, Router):
            module.expert_bias.normal_(0.0, 0.1)  # as after some aux-free balancing
    return model


def ids(config, B=2, T=14):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["qwen", "deepseek"])
def test_cached_decoding_equals_full_recompute(tiny, kind):
    model = moe_model(tiny, kind)
    x = ids(model.config)
    full = model(x)
    cache = model.new_cache(batch_size=2)
    pieces = [model(x[:, :5], cache), model(x[:, 5:6], cache), model(x[:, 6:14], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["qwen", "deepseek"])
def test_future_tokens_never_change_past_logits(tiny, kind):
    model = moe_model(tiny, kind)
    x = ids(model.config)
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % model.config.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("weight", list(WEIGHTS))
def test_each_aux_loss_sends_gradient_to_the_router(tiny, weight):
    config = tiny("qwen-moe-8e-top2", moe={"n_experts": 4, "top_k": 2, "d_expert": 16, weight: 1.0})
    torch.manual_seed(0)
    model = Transformer(config)
    _, auxes = model(ids(config), return_aux=True)
    assert len(auxes) == config.n_layer
    sum(aux.loss for aux in auxes).backward()
    for block in model.blocks:
        assert block.mlp.router.gate.weight.grad.abs().sum() > 0


def test_without_aux_weights_the_aux_loss_is_zero_and_the_main_loss_trains_the_router(tiny):
    config = tiny("qwen-moe-8e-top2", moe={"n_experts": 4, "top_k": 2, "d_expert": 16})
    torch.manual_seed(0)
    model = Transformer(config)
    logits, auxes = model(ids(config), return_aux=True)
    assert all(aux.loss.item() == 0 for aux in auxes)
    logits.square().mean().backward()
    assert all(block.mlp.router.gate.weight.grad.abs().sum() > 0 for block in model.blocks)
