"""Tensor parallelism: the split model computes what one process computes, logits and greedy tokens alike.

Each check runs on real processes (tests.parallel.spawn), every rank building the same random
model from the same seed: the reference it runs alone, and the copy it splits.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mistura.checkpoint import save_model, weights_of
from mistura.config import ModelConfig
from mistura.convert.parallel import write_model_parallel
from mistura.errors import ConfigError
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.parallel import tensor as tensor_parallel
from mistura.parallel.tensor import check_tensor_parallel, load_tensor_parallel, parallelize
from tests.convert.test_parallel import CONFIGS, SMALL, random_model
from tests.parallel.spawn import run_ranks

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7, 30]]  # a padded batch of 2
NEW_TOKENS = 8
ATOL = 1e-5


def logits_and_tokens(model) -> tuple[torch.Tensor, list[list[int]]]:
    """The model's logits for the first prompt, and its greedy continuations of both through the cache."""
    with torch.no_grad():
        logits = model(torch.tensor(PROMPTS[:1]))
    return logits, generate(model, PROMPTS, Sampling(max_new_tokens=NEW_TOKENS, temperature=0))


def assert_same(model, reference, name: str) -> None:
    logits, tokens = logits_and_tokens(model)
    expected_logits, expected_tokens = logits_and_tokens(reference)
    gap = (logits - expected_logits).abs().max().item()
    assert gap <= ATOL, f"{name}: logits differ by {gap:.2e}"
    assert tokens == expected_tokens, name


# ---------------------------------------------------------------------------------------
# The split model.


def check_split(rank: int, world: int, names: list[str]) -> None:
    mesh = init_device_mesh("cpu", (world,))
    for name in names:
        config = CONFIGS[name]()
        reference = random_model(config)
        model = parallelize(copy.deepcopy(reference), mesh)
        assert_same(model, reference, name)
        check_layout(model, config, world)
        check_same_samples(model, world)
        if config.mla is not None:
            check_expanded_cache(model, reference, name)


def check_layout(model, config: ModelConfig, world: int) -> None:
    """This rank holds its heads and vocabulary rows; the head still shares a tied table; its cache its kv heads."""
    attn = model.blocks[0].attn
    split = attn.kv_b_proj if config.mla is not None else attn.k_proj
    assert isinstance(split.weight, DTensor) and split.weight.to_local().shape[0] == split.weight.shape[0] // world
    assert model.tok_emb.weight.to_local().shape[0] == config.vocab_size // world
    assert (model.lm_head.weight is model.tok_emb.weight) == config.tie_embeddings
    cache = model.new_cache(2, 8, latent=False)
    assert cache.k.shape[2] == config.n_kv_head // world


def check_same_samples(model, world: int) -> None:
    """Sampling draws the same tokens on every rank: the same gathered logits, the same seed."""
    tokens = generate(model, PROMPTS, Sampling(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=3))
    every = [None] * world
    dist.all_gather_object(every, tokens)
    assert all(other == tokens for other in every)


def check_expanded_cache(model, reference, name: str) -> None:
    """MLA's naive path: a per-head KVCache of this rank's heads, prefill then one token."""
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        cache = model.new_cache(1, 8, latent=False)
        split = torch.cat([model(ids[:, :6], cache), model(ids[:, 6:], cache)], dim=1)
        assert (split - reference(ids)).abs().max().item() <= ATOL, name


def test_gqa_mla_moe_and_gpt2_models_split_over_two_ranks():
    run_ranks(check_split, 2, ["llama-tiny", "dragao-tiny-mla", "gpt2-baseline-tiny", "qwen2-moe-shared-gate"])


def test_mla_and_shared_experts_split_over_four_ranks():
    run_ranks(check_split, 4, ["dragao-tiny-mla", "deepseek-moe-tiny"])


# ---------------------------------------------------------------------------------------
# Loading.

# Untied, with every kind of bias (a row-parallel one is whole on rank 0 of the files), routed and shared experts.
BIASED_MOE = "qwen2-moe-shared-gate"
# Folder -> (model, model-parallel ranks; None: a plain checkpoint). mp4 on two ranks is merged, then split.
FOLDERS = {
    "mp2": ("dragao-tiny-mla", 2),
    "mp2-bias": (BIASED_MOE, 2),
    "mp4": ("dragao-tiny-mla", 4),
    "full": ("llama-tiny", None),
}


def config_of(name: str) -> ModelConfig:
    config = CONFIGS[name]()
    return dataclasses.replace(config, bias=True) if name == BIASED_MOE else config


def check_loading(rank: int, world: int, root: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    for folder, (name, n) in FOLDERS.items():
        reference = random_model(config_of(name))
        own_file = n == world  # else loaded whole (merged from its ranks' files), then split
        never_whole = mock.patch.object(tensor_parallel, "load", side_effect=AssertionError(f"{folder} loaded whole"))
        with never_whole if own_file else contextlib.nullcontext():
            model = load_tensor_parallel(f"{root}/{folder}", mesh)
        assert not model.training
        assert_same(model, reference, folder)
    biased = load_tensor_parallel(f"{root}/mp2-bias", mesh)
    bias = random_model(config_of(BIASED_MOE)).blocks[0].attn.o_proj.bias
    assert torch.equal(biased.blocks[0].attn.o_proj.bias.to_local(), bias)  # the files' rank-0 bias, on every rank
    tied = load_tensor_parallel(f"{root}/mp2", mesh, torch.bfloat16)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert {tensor.dtype for tensor in tied.state_dict().values()} == {torch.bfloat16}
    with torch.no_grad():
        ids = torch.tensor(PROMPTS[:1])
        expected = random_model(config_of("dragao-tiny-mla"))(ids)
        assert (tied(ids).float() - expected).abs().max().item() < 0.05  # bf16 rounding


def test_loading_rank_files_and_whole_checkpoints(tmp_path):
    for folder, (name, n) in FOLDERS.items():
        model = random_model(config_of(name))
        if n is None:
            save_model(tmp_path / folder, model)
        else:
            state = weights_of(model)
            write_model_parallel(tmp_path / folder, model.config, state.__getitem__, list(state), n, progress=False)
    run_ranks(check_loading, 2, str(tmp_path))


# ---------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    ("overrides", "n", "message"),
    [
        (dict(n_head=4, n_kv_head=4), 3, "model.n_head: 4 does not split evenly over 3"),
        (dict(n_head=4, n_kv_head=2), 4, "model.n_kv_head: 2 does not split evenly over 4"),
        (dict(d_ff=66), 4, "model.d_ff: 66"),
        (dict(vocab_size=97), 2, "model.vocab_size: 97"),
        (dict(moe=dict(n_experts=8, top_k=2, d_expert=16, d_shared=18)), 4, "model.moe.d_shared: 18"),
        (dict(layer_mlp=("dense", "moc"), moe=dict(n_experts=4, top_k=2, d_expert=16)), 2, "collaborative-experts"),
    ],
    ids=["heads", "kv-heads", "d_ff", "vocab", "shared", "moc"],
)
def test_models_that_do_not_split_raise(overrides, n, message):
    config = ModelConfig.from_name("llama-tiny", **{**SMALL, "n_head": 4, "n_kv_head": 4, "d_ff": 64, **overrides})
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(config, n)


def test_routed_experts_need_not_divide():
    """Every rank runs every routed expert, so only the shared expert's width splits."""
    moe = dict(n_experts=6, top_k=2, d_expert=15, d_shared=32)
    check_tensor_parallel(ModelConfig.from_name("llama-tiny", **SMALL, n_head=4, n_kv_head=4, moe=moe), 4)
