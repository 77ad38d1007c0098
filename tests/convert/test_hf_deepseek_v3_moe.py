"""DeepSeek-V3's MoE block on its own against Hugging Face's, through the importer's name table.

Whole DeepSeek-V3 models are tested in test_hf_deepseek_v3.py and the shared parity tests;
here one block is checked alone, routing decision by decision. A tiny random
`DeepseekV3ForCausalLM` (layer 0 dense, layer 1 MoE) is saved with `save_pretrained`,
so the block's tensors come in the per-expert layout of Hub checkpoints, and
`DEEPSEEK_V3_MOE_NAMES` loads layer 1's into a `MoELayer` that `deepseek_v3_moe_fields`
configures. Every parameter is perturbed and the selection bias (e_score_correction_bias)
is random, so the router, the shared experts and the bias all count;
`test_bias_and_groups_decide_the_choice` checks that the inputs exercise each part of the
routing rule.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from mistura.config import ModelConfig  # noqa: E402
from mistura.convert.families.deepseek_v3 import DEEPSEEK_V3_MOE_NAMES, deepseek_v3_moe_fields  # noqa: E402
from mistura.convert.hf import convert_state_dict  # noqa: E402
from mistura.errors import ConfigError  # noqa: E402
from mistura.model.moe import MoELayer  # noqa: E402

EXPERTS, TOP_K, GROUPS, TOPK_GROUPS = 16, 4, 4, 2
D_MODEL = 32
HF_CONFIG = dict(
    vocab_size=64,
    hidden_size=D_MODEL,
    intermediate_size=64,
    moe_intermediate_size=16,
    n_routed_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    n_group=GROUPS,
    topk_group=TOPK_GROUPS,
    n_shared_experts=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=32,
)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> tuple[torch.nn.Module, MoELayer]:
    """Hugging Face's MoE block of layer 1 and a mistura `MoELayer` loaded from its saved tensors."""
    torch.manual_seed(0)
    hf_config = transformers.DeepseekV3Config(**HF_CONFIG)
    hf_model = transformers.DeepseekV3ForCausalLM(hf_config)
    hf_block = hf_model.model.layers[1].mlp
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.1 * torch.randn_like(param))
        hf_block.gate.e_score_correction_bias.copy_(0.1 * torch.randn(EXPERTS))
    folder = tmp_path_factory.mktemp("deepseek_v3")
    hf_model.save_pretrained(folder)
    prefix = "model.layers.1.mlp."
    stored = load_file(folder / "model.safetensors")
    tensors = {name.removeprefix(prefix): tensor for name, tensor in stored.items() if name.startswith(prefix)}
    moe = deepseek_v3_moe_fields(hf_config.to_dict())
    ours = MoELayer(ModelConfig.from_dict(dict(d_model=D_MODEL, n_head=4, n_layer=1, moe=moe)))
    ours.load_state_dict(convert_state_dict(ours, tensors, DEEPSEEK_V3_MOE_NAMES, n_experts=EXPERTS))
    return hf_block.eval(), ours.eval()


def _inputs() -> torch.Tensor:
    return torch.randn(2, 16, D_MODEL, generator=torch.Generator().manual_seed(1))  # (B, T, D)


@torch.no_grad()
def test_block_output_matches(blocks):
    hf_block, ours = blocks
    x = _inputs()
    y, _ = ours(x)
    torch.testing.assert_close(y, hf_block(x), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_routing_matches_exactly(blocks):
    """The same experts for every token (group limit and bias included), with the same weights."""
    hf_block, ours = blocks
    x = _inputs().view(-1, D_MODEL)
    _, hf_weights, hf_experts = hf_block.gate(x)
    routing = ours.router(x)
    hf_order, order = hf_experts.argsort(-1), routing.experts.argsort(-1)  # HF's top-k is unsorted too
    assert torch.equal(routing.experts.gather(-1, order), hf_experts.gather(-1, hf_order))
    torch.testing.assert_close(routing.weights.gather(-1, order), hf_weights.gather(-1, hf_order))


@torch.no_grad()
def test_bias_and_groups_decide_the_choice(blocks):
    """Leaving out the bias or the group limit, or ranking groups otherwise than by the sum
    of their two best biased scores, would pick other experts for some of these tokens:
    the parity tests above would catch any of these mistakes."""
    hf_block, _ = blocks
    x = _inputs().view(-1, D_MODEL)
    _, _, hf_experts = hf_block.gate(x)
    scores = torch.sigmoid(x @ hf_block.gate.weight.T)  # (N, E)
    biased = scores + hf_block.gate.e_score_correction_bias

    def top_two(grouped: torch.Tensor) -> torch.Tensor:
        return grouped.topk(2, dim=-1).values.sum(-1)

    expected = hf_experts.sort(-1).values
    assert torch.equal(_select(biased, top_two), expected)
    variants = {
        "no bias": _select(scores, top_two),
        "no group limit": _select(biased, None),
        "groups by their best score": _select(biased, lambda grouped: grouped.amax(-1)),
        "groups by the sum of all": _select(biased, lambda grouped: grouped.sum(-1)),
    }
    for variant, chosen in variants.items():
        assert not torch.equal(chosen, expected), variant


def _select(choice: torch.Tensor, group_score: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Sorted top-k experts (N, K) by `choice` (N, E), first keeping the TOPK_GROUPS groups
    that rank best by `group_score` (None: no group limit)."""
    if group_score is not None:
        grouped = choice.view(-1, GROUPS, EXPERTS // GROUPS)  # (N, G, E / G)
        best = group_score(grouped).topk(TOPK_GROUPS, dim=-1).indices  # (N, TOPK_GROUPS)
        keep = torch.zeros(choice.shape[0], GROUPS, dtype=torch.bool).scatter_(1, best, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
    return choice.topk(TOP_K, dim=-1).indices.sort(-1).values


def test_moe_fields_follow_the_config():
    moe = deepseek_v3_moe_fields(transformers.DeepseekV3Config(**HF_CONFIG).to_dict())
    assert (moe["n_experts"], moe["top_k"], moe["d_expert"]) == (EXPERTS, TOP_K, 16)
    assert (moe["n_groups"], moe["topk_groups"], moe["route_scale"]) == (GROUPS, TOPK_GROUPS, 2.5)
    assert moe["scoring"] == "sigmoid" and moe["norm_topk"]
    assert moe["d_shared"] == 2 * 16  # two shared experts as one SwiGLU
    assert moe["balance_bias_rate"] == 0.0  # the imported bias selects as stored; no further updates


@pytest.mark.parametrize(
    "option, culprit",
    [(dict(scoring_func="softmax"), "scoring_func='softmax'"), (dict(topk_method="greedy"), "topk_method='greedy'")],
)
def test_other_routing_methods_are_refused(option, culprit):
    hf = dict(transformers.DeepseekV3Config(**HF_CONFIG).to_dict(), **option)
    with pytest.raises(ConfigError, match=culprit):
        deepseek_v3_moe_fields(hf)
