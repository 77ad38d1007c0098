"""Model-parallel shards: split + merge is bit-exact, and the layout is the one a parallel loader computes with.

The functional tests build, for each rank, the rank-local module from that rank's tensors
alone (n_head / n heads, d_ff / n hidden channels, E / n experts) and check that summing
the ranks' outputs gives the full layer's output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mistura.checkpoint import weights_of
from mistura.config import PRESETS, ModelConfig
from mistura.convert.parallel import (
    is_model_parallel,
    merge_model_parallel,
    parallel_plan,
    shard_state_dict,
    write_model_parallel,
)
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer
from mistura.model.attention import Attention
from mistura.model.mla import MultiHeadLatentAttention
from mistura.model.mlp import SwiGLU, dense_mlp
from mistura.model.moe import GroupedExperts, Router

SMALL = dict(vocab_size=96, max_seq_len=16, n_layer=2, d_model=32)
SMALL_MOE = dict(d_expert=16, d_shared=32)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)

CONFIGS = {
    "llama-tiny": lambda: ModelConfig.from_name("llama-tiny", **SMALL, n_head=4, n_kv_head=2, d_ff=64),
    "llama-untied-bias": lambda: ModelConfig.from_name(
        "llama-tiny", **SMALL, n_head=4, n_kv_head=2, d_ff=64, tie_embeddings=False, bias=True, qk_norm=True
    ),
    "gpt2-baseline-tiny": lambda: ModelConfig.from_name("gpt2-baseline-tiny", **SMALL, n_head=4, d_ff=64),
    "deepseek-moe-tiny": lambda: ModelConfig.from_name(
        "deepseek-moe-tiny",
        **SMALL,
        n_head=4,
        n_kv_head=4,
        d_ff=64,
        moe=PRESETS["deepseek-moe-tiny"]["moe"] | SMALL_MOE,
    ),
    "qwen2-moe-shared-gate": lambda: ModelConfig.from_name(
        "llama-tiny",
        **SMALL,
        n_head=4,
        n_kv_head=2,
        qkv_bias=True,
        tie_embeddings=False,
        moe=dict(n_experts=4, top_k=2, d_expert=16, d_shared=32, shared_gate=True, norm_topk=False),
    ),
    "dragao-tiny-mla": lambda: ModelConfig.from_name(
        "dragao-tiny", **SMALL, n_head=4, d_ff=64, mla=MLA, moe=PRESETS["dragao-tiny"]["moe"] | SMALL_MOE
    ),
    "mla-plain-q": lambda: ModelConfig.from_name(
        "dragao-tiny", **SMALL, n_head=4, d_ff=64, mla=MLA | dict(q_lora_rank=None), moe=None, first_dense_layers=0
    ),
}


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    """A model whose every tensor is random, norms and the router's selection bias included."""
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.2)
    return model.to(dtype).eval()


@pytest.fixture(params=list(CONFIGS))
def config(request) -> ModelConfig:
    return CONFIGS[request.param]()


# ---------------------------------------------------------------------------------------
# Split + merge.


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_and_merge_is_bit_exact(config, n, tmp_path):
    if config.n_kv_head % n:
        pytest.skip(f"{config.n_kv_head} kv heads do not split {n} ways")
    state = weights_of(random_model(config, torch.bfloat16))
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    out = write_model_parallel(tmp_path / "mp", config, state.__getitem__, list(state), n, tokenizer, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "parallel.json", "tokenizer.json"] + [f"model{r}-mp{n}.safetensors" for r in range(n)]
    )
    assert is_model_parallel(out) and not is_model_parallel(tmp_path)
    merged_config, merged = merge_model_parallel(out)
    assert merged_config == config
    assert merged.keys() == state.keys()
    for name, tensor in state.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name
    layout = json.loads((out / "parallel.json").read_text())
    assert layout["world_size"] == n
    assert {name: entry["dim"] for name, entry in layout["tensors"].items()} == parallel_plan(config)


def test_rank_files_hold_the_rank_slices(tmp_path):
    config = CONFIGS["qwen2-moe-shared-gate"]()
    config = dataclasses.replace(config, bias=True)
    state = weights_of(random_model(config))
    out = write_model_parallel(tmp_path / "mp", config, state.__getitem__, list(state), 2, progress=False)
    ranks = [load_file(out / f"model{r}-mp2.safetensors") for r in range(2)]
    q, k = state["blocks.0.attn.q_proj.weight"], state["blocks.0.attn.k_proj.weight"]
    head = config.head_dim
    assert torch.equal(ranks[1]["blocks.0.attn.q_proj.weight"], q[2 * head : 4 * head])  # query heads 2, 3
    assert torch.equal(ranks[1]["blocks.0.attn.k_proj.weight"], k[head : 2 * head])  # the kv head they read
    assert torch.equal(ranks[1]["blocks.0.attn.o_proj.weight"], state["blocks.0.attn.o_proj.weight"][:, 2 * head :])
    assert torch.equal(ranks[1]["blocks.0.mlp.experts.up_proj"], state["blocks.0.mlp.experts.up_proj"][2:])
    assert torch.equal(ranks[1]["tok_emb.weight"], state["tok_emb.weight"][48:])
    for name in ("blocks.0.mlp.router.gate.weight", "blocks.0.mlp.shared_gate.weight", "blocks.0.attn_norm.weight"):
        assert torch.equal(ranks[0][name], state[name]) and torch.equal(ranks[1][name], state[name])
    # A row-parallel bias: whole on rank 0, zeros on the others.
    assert torch.equal(ranks[0]["blocks.0.attn.o_proj.bias"], state["blocks.0.attn.o_proj.bias"])
    assert not ranks[1]["blocks.0.attn.o_proj.bias"].any()


def test_tensors_are_read_lazily_from_safetensors(tmp_path):
    config = CONFIGS["deepseek-moe-tiny"]()
    state = weights_of(random_model(config))
    save_file(state, tmp_path / "model.safetensors")
    reads = []
    with safe_open(tmp_path / "model.safetensors", framework="pt") as source:

        def get_tensor(name: str) -> torch.Tensor:
            reads.append(name)
            return source.get_tensor(name)

        out = write_model_parallel(tmp_path / "mp", config, get_tensor, list(source.keys()), 4, progress=False)
    assert len(reads) == 4 * len(state)  # each tensor once per rank, none kept between ranks
    merged = merge_model_parallel(out)[1]
    assert all(torch.equal(merged[name], state[name]) for name in state)


def test_tied_lm_head_is_stored_once():
    config = CONFIGS["gpt2-baseline-tiny"]()
    full = random_model(config).state_dict()  # holds lm_head.weight, the same tensor as tok_emb.weight
    shard = shard_state_dict(full, config, 0, 2)
    assert "lm_head.weight" not in shard and "lm_head.weight" not in parallel_plan(config)
    assert shard["tok_emb.weight"].shape == (48, 32)


# ---------------------------------------------------------------------------------------
# The layout computes: per-rank partial outputs sum to the full layer's.


def local_config(config: ModelConfig, n: int) -> ModelConfig:
    """What one rank's modules are: 1/n of the heads, of the dense and shared hidden widths."""
    moe = config.moe and dataclasses.replace(config.moe, d_shared=config.moe.d_shared // n)
    return dataclasses.replace(
        config, n_head=config.n_head // n, n_kv_head=config.n_kv_head // n, d_ff=config.d_ff // n, moe=moe
    )


def submodule_state(shard: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): t for name, t in shard.items() if name.startswith(prefix)}


@pytest.mark.parametrize("name", ["llama-untied-bias", "gpt2-baseline-tiny", "dragao-tiny-mla", "mla-plain-q"])
def test_attention_partial_outputs_sum_to_the_full_output(name):
    config, n = CONFIGS[name](), 2
    model = random_model(config)
    x = torch.randn(2, 5, config.d_model)
    rope = model.rope(0, 5) if model.rope is not None else None
    layer = model.blocks[1].attn
    with torch.no_grad():
        full = layer(x, rope, None)
        total = torch.zeros_like(full)
        for rank in range(n):
            shard = shard_state_dict(weights_of(model), config, rank, n)
            local = type(layer)(local_config(config, n), 1)
            local.load_state_dict(submodule_state(shard, "blocks.1.attn."))
            total += local(x, rope, None)
    assert type(layer) is (MultiHeadLatentAttention if config.mla else Attention)
    torch.testing.assert_close(total, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-untied-bias", "gpt2-baseline-tiny"])
def test_dense_mlp_partial_outputs_sum_to_the_full_output(name):
    config, n = CONFIGS[name](), 2
    model = random_model(config)
    x = torch.randn(2, 5, config.d_model)
    with torch.no_grad():
        full = model.blocks[0].mlp(x)
        total = torch.zeros_like(full)
        for rank in range(n):
            local = dense_mlp(local_config(config, n))
            local.load_state_dict(
                submodule_state(shard_state_dict(weights_of(model), config, rank, n), "blocks.0.mlp.")
            )
            total += local(x)
    torch.testing.assert_close(total, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["deepseek-moe-tiny", "qwen2-moe-shared-gate"])
def test_moe_partial_outputs_sum_to_the_full_output(name):
    """Expert parallel: each rank routes every token with the replicated router, runs the
    assignments that fall on its E / n experts, and adds its slice of the shared expert."""
    config, n = CONFIGS[name](), 2
    moe, layer = config.moe, 1
    model = random_model(config)
    x = torch.randn(2, 5, config.d_model)
    flat = x.reshape(-1, config.d_model)
    with torch.no_grad():
        full = model.blocks[layer].mlp(x)[0].reshape(-1, config.d_model)
        total = torch.zeros_like(full)
        for rank in range(n):
            shard = submodule_state(shard_state_dict(weights_of(model), config, rank, n), f"blocks.{layer}.mlp.")
            total += expert_parallel_rank(flat, shard, config, rank, n)
    assert moe.d_shared and (moe.shared_gate or name == "deepseek-moe-tiny")
    torch.testing.assert_close(total, full, atol=1e-5, rtol=0)


def expert_parallel_rank(x: torch.Tensor, shard: dict[str, torch.Tensor], config: ModelConfig, rank: int, n: int):
    """One rank's partial MoE output (N, D) from its own tensors only."""
    moe, local_experts = config.moe, config.moe.n_experts // n
    router = Router(config.d_model, moe)
    router.load_state_dict(submodule_state(shard, "router."))
    experts = GroupedExperts(local_experts, config.d_model, moe.d_expert)
    experts.load_state_dict(submodule_state(shard, "experts."))
    routing = router(x)
    y = torch.zeros_like(x)
    for e in range(local_experts):
        token, slot = torch.nonzero(routing.experts == rank * local_experts + e, as_tuple=True)
        rows = x[token]
        hidden = F.silu(rows @ experts.gate_proj[e].T) * (rows @ experts.up_proj[e].T)
        y.index_add_(0, token, routing.weights[token, slot, None] * (hidden @ experts.down_proj[e].T))
    shared = SwiGLU(config.d_model, moe.d_shared // n)
    shared.load_state_dict(submodule_state(shard, "shared."))
    partial = shared(x)
    if moe.shared_gate:
        partial = torch.sigmoid(F.linear(x, shard["shared_gate.weight"])) * partial
    return y + partial


@pytest.mark.parametrize("name", ["llama-untied-bias", "llama-tiny"])
def test_vocab_parallel_embedding_and_head(name):
    config, n = CONFIGS[name](), 2
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 7))
    hidden = torch.randn(2, 7, config.d_model)
    rows = config.vocab_size // n
    embedded, logits = torch.zeros(2, 7, config.d_model), []
    for rank in range(n):
        shard = shard_state_dict(weights_of(model), config, rank, n)
        local = ids - rank * rows
        mine = (local >= 0) & (local < rows)
        embedded += F.embedding(local.clamp(0, rows - 1), shard["tok_emb.weight"]) * mine[..., None]
        head = shard["tok_emb.weight" if config.tie_embeddings else "lm_head.weight"]
        logits.append(hidden @ head.T)
    with torch.no_grad():
        assert torch.equal(embedded, model.tok_emb(ids))
        torch.testing.assert_close(torch.cat(logits, dim=-1), model.lm_head(hidden), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    ("overrides", "n", "message"),
    [
        (dict(vocab_size=97), 2, "model.vocab_size: 97 does not split evenly over 2"),
        (dict(d_model=48, n_head=6, n_kv_head=2), 4, "model.n_head: 6"),
        (dict(n_head=4, n_kv_head=2), 4, "model.n_kv_head: 2"),
        (dict(n_head=4, n_kv_head=4, d_ff=66), 4, "model.d_ff: 66"),
        (dict(moe=dict(n_experts=6, top_k=2, d_expert=16)), 4, "model.moe.n_experts: 6"),
        (dict(moe=dict(n_experts=8, top_k=2, d_expert=16, d_shared=18)), 4, "model.moe.d_shared: 18"),
        (dict(layer_mlp=("dense", "moc"), moe=dict(n_experts=4, top_k=2, d_expert=16)), 2, "collaborative-experts"),
        (dict(), 0, "must be >= 1"),
    ],
    ids=["vocab", "heads", "kv-heads", "d_ff", "experts", "shared", "moc", "zero-ranks"],
)
def test_configs_that_do_not_split_raise(overrides, n, message, tmp_path):
    config = ModelConfig.from_name("llama-tiny", **{**SMALL, "n_head": 4, "n_kv_head": 4, "d_ff": 64, **overrides})
    model = random_model(config)
    state = weights_of(model)
    with pytest.raises(ConfigError, match=message):
        shard_state_dict(state, config, 0, n)
    with pytest.raises(ConfigError, match=message):
        write_model_parallel(tmp_path / "mp", config, state.__getitem__, list(state), n, progress=False)
    assert not (tmp_path / "mp").exists()


def test_unsplit_widths_need_not_divide():
    """Experts are split whole, and d_ff is unused when every layer is MoE."""
    moe = dict(n_experts=4, top_k=2, d_expert=15)
    config = ModelConfig.from_name("llama-tiny", **SMALL, n_head=4, n_kv_head=4, d_ff=66, moe=moe)
    shard = shard_state_dict(weights_of(random_model(config)), config, 1, 2)
    assert shard["blocks.0.mlp.experts.down_proj"].shape == (2, 32, 15)


def test_rank_out_of_range_raises():
    config = CONFIGS["llama-tiny"]()
    with pytest.raises(ConfigError, match="rank 2 is not in 0 .. 1"):
        shard_state_dict(weights_of(random_model(config)), config, 2, 2)


def test_state_dict_that_does_not_fit_the_config_raises(tmp_path):
    config = CONFIGS["llama-tiny"]()
    state = weights_of(random_model(config))
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.v_proj.weight"}
    with pytest.raises(CheckpointError, match="missing tensor.*blocks.1.attn.v_proj.weight"):
        write_model_parallel(tmp_path / "mp", config, missing.__getitem__, list(missing), 2, progress=False)
    extra = state | {"blocks.1.attn.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected tensor.*blocks.1.attn.extra"):
        shard_state_dict(extra, config, 0, 2)
    wrong = state | {"blocks.0.mlp.up_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(CheckpointError, match=r"up_proj.weight: shape \(32, 64\), the config expects \(64, 32\)"):
        write_model_parallel(tmp_path / "mp", config, wrong.__getitem__, list(wrong), 2, progress=False)
    assert not (tmp_path / "mp").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left behind


@pytest.fixture
def written(tmp_path) -> Path:
    config = CONFIGS["deepseek-moe-tiny"]()
    state = weights_of(random_model(config))
    return write_model_parallel(tmp_path / "mp", config, state.__getitem__, list(state), 2, progress=False)


def rewrite_rank(folder: Path, rank: int, change) -> None:
    tensors = load_file(folder / f"model{rank}-mp2.safetensors")
    change(tensors)
    save_file(tensors, folder / f"model{rank}-mp2.safetensors")


BROKEN = {
    "missing rank file": (lambda d: (d / "model1-mp2.safetensors").unlink(), "missing rank file.*model1-mp2"),
    "extra rank file": (
        lambda d: shutil.copy(d / "model1-mp2.safetensors", d / "model2-mp2.safetensors"),
        "unexpected rank file.*model2-mp2",
    ),
    "rank file of another world size": (
        lambda d: shutil.copy(d / "model1-mp2.safetensors", d / "model0-mp4.safetensors"),
        "unexpected rank file.*model0-mp4",
    ),
    "missing tensor": (
        lambda d: rewrite_rank(d, 1, lambda t: t.pop("blocks.1.mlp.experts.up_proj")),
        "model1-mp2.safetensors: missing tensor.*blocks.1.mlp.experts.up_proj",
    ),
    "extra tensor": (
        lambda d: rewrite_rank(d, 0, lambda t: t.update({"blocks.0.attn.extra": torch.zeros(1)})),
        "model0-mp2.safetensors: unexpected tensor.*blocks.0.attn.extra",
    ),
    "wrong slice shape": (
        lambda d: rewrite_rank(d, 1, lambda t: t.update({"tok_emb.weight": torch.zeros(47, 32)})),
        r"model1-mp2.safetensors: tok_emb.weight has shape \(47, 32\), expected \(48, 32\)",
    ),
    "corrupt rank file": (
        lambda d: (d / "model0-mp2.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
        "cannot read the rank files",
    ),
    "missing parallel.json": (lambda d: (d / "parallel.json").unlink(), "parallel.json: cannot read JSON"),
    "placement changed": (
        lambda d: edit_layout(d, lambda t: t["tensors"]["norm.weight"].update(dim=0)),
        "norm.weight is placed .*'dim': 0.*the config says .*'dim': None",
    ),
    "bad world size": (lambda d: edit_layout(d, lambda t: t.update(world_size=0)), "integer world_size >= 1"),
}


def edit_layout(folder: Path, change) -> None:
    layout = json.loads((folder / "parallel.json").read_text())
    change(layout)
    (folder / "parallel.json").write_text(json.dumps(layout))


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_folder_raises(written, case):
    damage, message = BROKEN[case]
    damage(written)
    with pytest.raises(CheckpointError, match=message):
        merge_model_parallel(written)
