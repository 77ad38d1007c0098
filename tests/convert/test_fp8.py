"""FP8 block quantisation in DeepSeek-V3's format, and the folder converters.

The error bound the tests hold every element to. q = e4m3(W / s) with s = amax / 448, and
W' = q * s. e4m3 has 4 significant bits (unit roundoff 2^-4): a normal scaled value, |W / s|
>= 2^-6, rounds within 2^-4 of itself, so |W' - W| <= 2^-4 |W|; a subnormal one rounds to the
grid of spacing 2^-9, within 2^-10, so |W' - W| <= 2^-10 s. Hence

    |W' - W| <= e = 2^-4 |W| + 2^-10 s                      (dequantised in fp32)
    |W' - W| <= e + 2^-8 (|W| + e)                          (dequantised to bf16, unit roundoff 2^-8)

The fp32 division and product add relative errors of 2^-24: a 2^-20 relative slack covers them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistura.convert.fp8 import (
    FP8,
    FP8_MAX,
    bf16_to_fp8,
    dequantize_fp8_blocks,
    dequantize_fp8_groups,
    fp8_to_bf16,
    quantize_fp8_blocks,
    quantize_fp8_groups,
)
from mistura.errors import CheckpointError

transformers = pytest.importorskip("transformers")

SLACK = 1 + 2**-20
BLOCK = (16, 32)  # small blocks: the tiny model's matrices span several, with ragged edges
INDEX = "model.safetensors.index.json"


def expanded_scales(scale_inv: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Each element's block scale, (..., R, C): ones in FP8 dequantised by the scales."""
    return dequantize_fp8_blocks(torch.ones(shape).to(FP8), scale_inv, block, torch.float32)


def block_amax(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(..., R, C) -> (..., ceil(R / b0), ceil(C / b1)): the largest magnitude of each block, block by block."""
    rows = [
        torch.stack([piece.abs().amax((-2, -1)) for piece in row.split(block[1], dim=-1)], dim=-1)
        for row in t.split(block[0], dim=-2)
    ]
    return torch.stack(rows, dim=-2)


def e4m3_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return 2**-4 * w.abs() + 2**-10 * scale


def assert_within_bound(restored: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> None:
    w = w.float()
    bound = e4m3_bound(w, scale)
    if restored.dtype == torch.bfloat16:
        bound = bound + 2**-8 * (w.abs() + bound)
    err = (restored.float() - w).abs()
    assert (err <= bound * SLACK).all(), f"max excess {(err - bound).max().item()}"


def spread_weight(*shape: int) -> torch.Tensor:
    """Gaussian values over 6 decades, so that each block mixes normal and subnormal scaled values."""
    torch.manual_seed(0)
    return torch.randn(shape) * 10.0 ** torch.randint(-6, 1, shape)


# ---------------------------------------------------------------------------------------
# Tensors.


@pytest.mark.parametrize(
    ("shape", "block"),
    [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((5, 7), (128, 128)), ((3, 40, 70), (16, 32))],
    ids=["whole-blocks", "ragged", "smaller-than-a-block", "stacked-experts"],
)
def test_block_quantization_error_within_e4m3_bound(shape, block):
    w = spread_weight(*shape)
    q, scale_inv = quantize_fp8_blocks(w, block)
    rows, cols = shape[-2:]
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (*shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    scale = expanded_scales(scale_inv, w.shape, block)
    assert_within_bound(dequantize_fp8_blocks(q, scale_inv, block, torch.float32), w, scale)
    assert_within_bound(dequantize_fp8_blocks(q, scale_inv, block), w, scale)  # bf16 output
    # Each block's largest element lands on 448: the block's range spans all of e4m3's.
    assert torch.equal(scale_inv, block_amax(w, block) / FP8_MAX)
    assert torch.equal(block_amax(q.float(), block), torch.full_like(scale_inv, FP8_MAX))


def test_subnormal_values_use_the_absolute_bound():
    # One large value sets the scale; the rest scale below 2^-6, into e4m3's subnormals.
    w = torch.full((4, 4), 1e-4)
    w[0, 0] = 448.0
    q, scale_inv = quantize_fp8_blocks(w, (4, 4))
    restored = dequantize_fp8_blocks(q, scale_inv, (4, 4), torch.float32)
    err = (restored - w).abs()
    assert err[1:].max() > 2**-4 * 1e-4  # the relative bound alone would fail here ...
    assert_within_bound(restored, w, scale_inv.expand(4, 4))  # ... the absolute term holds


def test_all_zero_block_is_exact():
    w = spread_weight(32, 64)
    w[16:, :32] = 0.0
    q, scale_inv = quantize_fp8_blocks(w, (16, 32))
    assert scale_inv[1, 0] == 1.0
    restored = dequantize_fp8_blocks(q, scale_inv, (16, 32), torch.float32)
    assert torch.isfinite(restored).all()
    assert torch.equal(restored[16:, :32], torch.zeros(16, 32))


def test_dequantize_matches_transformers():
    """Same layout as transformers' reader: blocks tile (out, in) from the top-left corner."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    q, scale_inv = quantize_fp8_blocks(spread_weight(300, 200))
    ours = dequantize_fp8_blocks(q, scale_inv, (128, 128), torch.float32)
    assert torch.equal(ours, _dequantize_fp8_weight(q, scale_inv, [128, 128], torch.float32))


def test_scale_of_the_wrong_shape_raises():
    q, scale_inv = quantize_fp8_blocks(spread_weight(300, 200))
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        dequantize_fp8_blocks(q, scale_inv.T)


def test_group_quantization_of_activations():
    x = spread_weight(2, 3, 300)  # the last group is ragged: 44 channels
    q, scales = quantize_fp8_groups(x)
    assert q.dtype == FP8 and q.shape == x.shape and scales.shape == (2, 3, 3)
    scale = scales.repeat_interleave(128, dim=-1)[..., :300]
    assert_within_bound(dequantize_fp8_groups(q, scales, dtype=torch.float32), x, scale)
    # Groups are 1 x 128: each group's largest element is exactly +-448.
    group_max = torch.stack([g.float().abs().amax(-1) for g in q.split(128, dim=-1)], dim=-1)
    assert torch.equal(group_max, torch.full_like(group_max, FP8_MAX))
    assert torch.equal(scales[..., 0], x[..., :128].abs().amax(-1) / FP8_MAX)


# ---------------------------------------------------------------------------------------
# Folders.


def _tiny_deepseek_v3() -> torch.nn.Module:
    config = transformers.DeepseekV3Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_group=2,
        topk_group=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # norms and the router bias off their ones/zeros init
            param.add_(torch.randn_like(param) * 0.1)
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module", params=["sharded", "single"])
def hf_folder(request, tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 folder in bf16 as save_pretrained writes it, plus a tokenizer file."""
    folder = tmp_path_factory.mktemp("hf") / request.param
    max_shard_size = "40KB" if request.param == "sharded" else "10MB"
    _tiny_deepseek_v3().save_pretrained(folder, max_shard_size=max_shard_size)
    (folder / "tokenizer.json").write_text('{"fake": "tokenizer"}', encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def fp8_folder(hf_folder, tmp_path_factory) -> Path:
    return bf16_to_fp8(hf_folder, tmp_path_factory.mktemp("fp8") / "model", BLOCK, progress=False)


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder, and the file holding each."""
    files = sorted(folder.glob("*.safetensors"))
    tensors, where = {}, {}
    for file in files:
        for name, tensor in load_file(file).items():
            tensors[name], where[name] = tensor, file.name
    return tensors, where


QUANTIZED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEPT = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "e_score_correction_bias", "norm.weight")


def test_bf16_to_fp8_writes_deepseek_format(hf_folder, fp8_folder):
    original, _ = read_folder(hf_folder)
    tensors, where = read_folder(fp8_folder)
    assert {n for n in original if n.endswith(KEPT)} and {n for n in original if n.split(".")[-2] in QUANTIZED}
    for name, w in original.items():
        if name.split(".")[-2] in QUANTIZED:
            scale_inv = tensors[name + "_scale_inv"]
            assert tensors[name].dtype == FP8 and scale_inv.dtype == torch.float32
            assert where[name + "_scale_inv"] == where[name]
            assert scale_inv.shape == (-(-w.shape[0] // BLOCK[0]), -(-w.shape[1] // BLOCK[1]))
        else:
            assert name.endswith(KEPT)
            assert torch.equal(tensors[name], w) and tensors[name].dtype == w.dtype
    config = json.loads((fp8_folder / "config.json").read_text())
    quant = config.pop("quantization_config")
    assert quant["quant_method"] == "fp8" and quant["fmt"] == "e4m3" and quant["activation_scheme"] == "dynamic"
    assert quant["weight_block_size"] == list(BLOCK)
    assert set(quant["modules_to_not_convert"]) == {
        "lm_head",
        "model.embed_tokens",
        "model.layers.1.mlp.gate",
    }
    assert config == json.loads((hf_folder / "config.json").read_text())
    assert (fp8_folder / "tokenizer.json").read_text() == (hf_folder / "tokenizer.json").read_text()
    assert (fp8_folder / "generation_config.json").is_file()
    if (hf_folder / INDEX).is_file():
        index = json.loads((fp8_folder / INDEX).read_text())
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        assert not (fp8_folder / INDEX).exists()


def test_round_trip_keeps_unquantized_tensors_and_bounds_the_rest(hf_folder, fp8_folder, tmp_path):
    back = fp8_to_bf16(fp8_folder, tmp_path / "bf16", progress=False)
    original, original_where = read_folder(hf_folder)
    restored, where = read_folder(back)
    quantized, _ = read_folder(fp8_folder)
    assert where == original_where  # same names, in the same shard files
    for name, w in original.items():
        assert restored[name].dtype == w.dtype
        if name.split(".")[-2] in QUANTIZED:
            scale = expanded_scales(quantized[name + "_scale_inv"], w.shape, BLOCK)
            assert_within_bound(restored[name], w, scale)
            assert not torch.equal(restored[name], w)
        else:
            assert torch.equal(restored[name], w)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_folder / "config.json").read_text())
    if (hf_folder / INDEX).is_file():
        assert json.loads((back / INDEX).read_text())["weight_map"] == original_where
    assert (back / "tokenizer.json").is_file() and (back / "generation_config.json").is_file()


def test_default_blocks_are_128(hf_folder, tmp_path):
    out = bf16_to_fp8(hf_folder, tmp_path / "fp8", progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    tensors, _ = read_folder(out)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (1, 1)  # (96, 64): one ragged block


# Editing a copy of the FP8 folder to break it.


@pytest.fixture
def fp8_copy(fp8_folder, tmp_path) -> Path:
    return Path(shutil.copytree(fp8_folder, tmp_path / "fp8"))


def shard_of(folder: Path, name: str) -> str:
    return weight_map(folder)[name] if (folder / INDEX).is_file() else "model.safetensors"


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def edit(folder: Path, shard: str, change) -> None:
    """Rewrite one shard as change(tensors), and the index (if any) to match."""
    tensors = load_file(folder / shard)
    change(tensors)
    save_file(tensors, folder / shard)
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        others = {name: where for name, where in index["weight_map"].items() if where != shard}
        index["weight_map"] = others | dict.fromkeys(tensors, shard)
        (folder / INDEX).write_text(json.dumps(index))


def test_scale_in_another_shard(hf_folder, fp8_folder, fp8_copy, tmp_path):
    if not (hf_folder / INDEX).is_file():
        pytest.skip("a single-file folder has no other shard")
    name = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"
    shards = weight_map(fp8_copy)
    home = shards[name]
    other = next(s for s in sorted(set(shards.values())) if s != home)
    scale = load_file(fp8_copy / home)[name]
    edit(fp8_copy, home, lambda t: t.pop(name))
    edit(fp8_copy, other, lambda t: t.update({name: scale}))
    assert weight_map(fp8_copy)[name] == other
    moved, _ = read_folder(fp8_to_bf16(fp8_copy, tmp_path / "moved", progress=False))
    expected, _ = read_folder(fp8_to_bf16(fp8_folder, tmp_path / "expected", progress=False))
    assert moved.keys() == expected.keys()
    assert all(torch.equal(moved[n], expected[n]) for n in expected)


BROKEN = {
    "weight without its scale": (
        lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale_inv"),
        "o_proj.weight is FP8 but the checkpoint has no model.layers.0.self_attn.o_proj.weight_scale_inv",
    ),
    "scale without its weight": (
        lambda t: t.pop("model.layers.0.self_attn.o_proj.weight"),
        "o_proj.weight_scale_inv has no weight",
    ),
    "scale of an unquantised weight": (
        lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}),
        "has a model.layers.0.self_attn.o_proj.weight_scale_inv but is torch.bfloat16, not FP8",
    ),
    "scale of the wrong shape": (
        lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(2, 3)}),
        r"o_proj.weight_scale_inv: scale shape \(2, 3\) does not fit a \(64, 64\) weight",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_fp8_folder_raises_and_writes_nothing(fp8_copy, tmp_path, case):
    change, message = BROKEN[case]
    edit(fp8_copy, shard_of(fp8_copy, "model.layers.0.self_attn.o_proj.weight"), change)
    with pytest.raises(CheckpointError, match=message):
        fp8_to_bf16(fp8_copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fp8"]  # no staging folder left behind


def test_corrupt_safetensors_raises(fp8_copy, tmp_path):
    shard = sorted(fp8_copy.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated header
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read safetensors"):
        fp8_to_bf16(fp8_copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_source_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        fp8_to_bf16(tmp_path / "absent", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        bf16_to_fp8(tmp_path / "absent", tmp_path / "out")


def test_source_of_the_wrong_kind_raises(hf_folder, fp8_folder, tmp_path):
    with pytest.raises(CheckpointError, match="not an FP8 checkpoint"):
        fp8_to_bf16(hf_folder, tmp_path / "out")
    with pytest.raises(CheckpointError, match="already quantised"):
        bf16_to_fp8(fp8_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp8_tensors_without_quantization_config_raise(fp8_copy, tmp_path):
    config = json.loads((fp8_copy / "config.json").read_text())
    del config["quantization_config"]
    (fp8_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="already FP8 data"):
        bf16_to_fp8(fp8_copy, tmp_path / "out")


@pytest.mark.parametrize("inside", ["", "bf16"], ids=["same", "inside"])
def test_output_must_lie_outside_the_input(fp8_copy, inside):
    before = sorted(p.name for p in fp8_copy.iterdir())
    with pytest.raises(CheckpointError, match="must lie outside the input folder"):
        fp8_to_bf16(fp8_copy, fp8_copy / inside)
    assert sorted(p.name for p in fp8_copy.iterdir()) == before
