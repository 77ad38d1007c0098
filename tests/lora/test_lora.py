"""LoRA as a module swap: zero B equals the base, merge and unmerge, gradients on adapters only, the targets,
and routed experts' adapters against a per-expert reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from mistura.errors import ConfigError
from mistura.lora import LoRAConfig, adaptable, apply_lora, merge_lora, trainable_share, unmerge_lora
from mistura.lora.layers import LoRAExperts, LoRALinear
from mistura.model.moe import GroupedExperts
from mistura.model.moe import experts as experts_module

KINDS = ["llama", "gpt2", "qwen-moe", "dragao"]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_zero_b_equals_the_base(build, tokens, kind):
    model = build(kind)
    ids = tokens(model)
    expected = model(ids)
    apply_lora(model, LoRAConfig(rank=4, targets=("all",) if model.config.moe else ("all-linear",)))
    assert torch.equal(model(ids), expected)


def test_every_adaptable_layer_of_mla_and_moe_is_swapped(build):
    model = apply_lora(build("dragao"), LoRAConfig(rank=4, targets=("all",)))
    swapped = {name.split(".", 1)[1] for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}
    attention = {f"attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj")}
    assert swapped == (
        {f"{i}.{name}" for i in (0, 1) for name in attention}
        | {f"0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        | {f"1.mlp.shared.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        | {"1.mlp.experts"}
    )
    assert not isinstance(model.lm_head, LoRALinear) and not isinstance(model.blocks[1].mlp.router.gate, LoRALinear)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_merge_equals_unmerged_and_unmerge_restores_the_base(build, tokens, randomize, kind):
    model = build(kind)
    base = {name: p.clone() for name, p in model.state_dict().items()}
    ids = tokens(model)
    randomize(apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("all",) if model.config.moe else ("all-linear",))))
    adapted = model(ids)
    merge_lora(model)
    torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=0)
    restored = {name.replace(".base.", "."): p for name, p in model.state_dict().items() if ".lora_" not in name}
    for name, param in base.items():
        torch.testing.assert_close(restored[name], param, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen-moe", "dragao"])
def test_only_the_adapters_get_gradients_and_optimizer_state(build, tokens, kind):
    model = apply_lora(build(kind), LoRAConfig(rank=4, targets=("all",) if kind != "llama" else ("all-linear",)))
    model.train()
    ids = tokens(model)
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    adapters = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    base = {name: p for name, p in model.named_parameters() if ".lora_" not in name}
    assert base and all(not p.requires_grad and p.grad is None for p in base.values())
    assert all(p.requires_grad and p.grad is not None for p in adapters.values())
    assert all(p.grad.abs().sum() > 0 for name, p in adapters.items() if ".lora_B" in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(adapters) == len(optimizer.state)


def test_trainable_share_of_one_4096_matrix_at_rank_8_is_about_0_4_percent():
    linear = torch.nn.Linear(4096, 4096, bias=False, device="meta")
    share = trainable_share(LoRALinear(linear.requires_grad_(False), LoRAConfig(rank=8)))
    assert share.trainable == 2 * 8 * 4096
    assert share.trainable / (4096 * 4096) == pytest.approx(0.0039, abs=1e-4)


def test_scale_is_alpha_over_rank_or_over_its_root_with_rslora():
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0


@pytest.mark.parametrize("grouped_mm", [True, False])
@torch.no_grad()
def test_expert_adapters_equal_a_per_expert_reference(monkeypatch, randomize, grouped_mm):
    monkeypatch.setattr(experts_module, "HAS_GROUPED_MM", grouped_mm)
    torch.manual_seed(0)
    E, D, Fw, r = 4, 32, 16, 4
    experts = GroupedExperts(E, D, Fw).requires_grad_(False)
    lora = randomize(LoRAExperts(experts, LoRAConfig(rank=r, alpha=8)))
    counts = torch.tensor([3, 0, 5, 2])
    x, weights = torch.randn(10, D), torch.rand(10, 1)
    rows = []
    for e, piece in enumerate(x.split(counts.tolist())):
        w = {p: getattr(experts, p)[e] + 2.0 * lora.lora_B[p][e] @ lora.lora_A[p][e] for p in lora.lora_A}
        rows.append(F.silu(piece @ w["gate_proj"].T) * (piece @ w["up_proj"].T) @ w["down_proj"].T)
    expected = torch.cat(rows) * weights[: counts.sum()]
    torch.testing.assert_close(lora(x, counts, weights), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mla_decoding_on_the_latent_cache_reads_the_adapted_kv_b(build, randomize, tokens):
    """The absorbed path folds kv_b_proj's matrix into queries and outputs: it must see the adapter."""
    model = randomize(apply_lora(build("dragao"), LoRAConfig(rank=4, targets=("attention",))), std=0.2)
    ids = tokens(model, batch=1, length=6)
    full = model(ids)
    cache = model.new_cache(1, 8)  # a LatentCache: the absorbed path
    steps = [model(ids[:, :3], cache)] + [model(ids[:, t : t + 1], cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_targets_by_pattern_group_and_last_name(build):
    names = list(adaptable(build("qwen-moe")))
    assert LoRAConfig(targets=("q_proj", "v_proj")).select(names) == [
        f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    projections = ("gate_proj", "up_proj", "down_proj")
    assert LoRAConfig(targets=("mlp",)).select(names) == [f"blocks.0.mlp.{p}" for p in projections]
    assert LoRAConfig(targets=("shared",)).select(names) == [f"blocks.1.mlp.shared.{p}" for p in projections]
    assert LoRAConfig(targets=("blocks.1.*",)).select(names)[-1] == "blocks.1.mlp.shared.down_proj"


@pytest.mark.parametrize("target", ["experts", "atention", "blocks.*.attn.c_attn", "lm_head"])
def test_a_target_matching_nothing_is_refused_with_the_layers_it_could_match(build, target):
    model = build("llama")
    with pytest.raises(ConfigError, match=rf"{target}.*matches no layer.*blocks\.\*\.attn\.q_proj"):
        apply_lora(model, LoRAConfig(targets=(target,)))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "fields, says",
    [(dict(rank=0), "rank"), (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"), (dict(targets=()), "empty")],
)
def test_a_bad_config_is_refused_by_field(fields, says):
    with pytest.raises(ConfigError, match=says):
        LoRAConfig(**fields)


def test_adapting_twice_is_refused(build):
    model = apply_lora(build("llama"), LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))


def test_dropout_acts_on_the_adapter_input_in_training_only(build, tokens, randomize):
    model = randomize(apply_lora(build("llama"), LoRAConfig(rank=4, dropout=0.5)))
    ids = tokens(model)
    with torch.no_grad():
        evaluated = model(ids)
        torch.manual_seed(0)
        trained = model.train()(ids)
    assert not torch.allclose(trained, evaluated)
    assert math.isfinite(float(trained.sum()))
