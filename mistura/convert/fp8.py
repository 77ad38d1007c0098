"""FP8 weights in DeepSeek-V3's format, and the folder converters to and from it.

A quantised linear weight W (out, in) is stored as two tensors:

    NAME.weight            float8_e4m3fn (out, in)                          q = e4m3(W / s)
    NAME.weight_scale_inv  float32 (ceil(out / 128), ceil(in / 128))       s = amax(|W| in the block) / 448

so that W ~= q * s, one scale per 128 x 128 block (edge blocks may be smaller). 448 is e4m3's
largest finite value: each block's largest element lands on it, so the 8 bits cover the
block's own range and one outlier only costs its block, not the whole matrix. An all-zero
block gets s = 1 (q = 0 either way) instead of 0 / 0.

Error: e4m3 keeps 4 significant bits, so a value whose scaled magnitude |W / s| is normal
(>= 2^-6) comes back within 2^-4 of itself; a smaller, subnormal one within 2^-10 * s, half the
spacing 2^-9 of e4m3's subnormals. Both together: |q * s - W| <= 2^-4 |W| + 2^-10 s.

Activations are quantised at run time the same way over groups of 1 x 128 along their last
dimension, one scale per group (DeepSeek's `act_quant`): `quantize_fp8_groups`.

The converters rewrite a Hugging Face folder (config.json, `model.safetensors` or shards plus
`model.safetensors.index.json`) one input shard at a time: each output shard, named like its
input, is built in memory, written, and dropped. A scale stored in another shard than its
weight is read alone from that file. The output folder appears only once complete.

    >>> fp8_to_bf16("DeepSeek-V3", "DeepSeek-V3-bf16")
    >>> bf16_to_fp8("my-model", "my-model-fp8")

What `bf16_to_fp8` leaves in high precision, as DeepSeek-V3's own FP8 checkpoint does:
embeddings and the output head (every token reads a full row of them, and the logits are
sensitive), the MoE routers and Qwen's shared-expert gate (their small logit differences
decide the routing), norms and biases (1-D, and tiny). Every other 2-D `*.weight` is a
linear layer's and is quantised. `quantization_config.modules_to_not_convert` lists the
linear layers kept, so that transformers does not swap them for FP8 layers when loading.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mistura.atomic import atomic_directory
from mistura.convert.hf import read_json
from mistura.errors import CheckpointError
from mistura.shards import INDEX, WeightFiles, listed_files

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
BLOCK = (128, 128)
GROUP = 128
SCALE_SUFFIX = "_scale_inv"  # NAME.weight -> NAME.weight_scale_inv

# The last component of the modules whose 2-D weights bf16_to_fp8 keeps (see the module docstring).
KEPT_MODULES = ("embed_tokens", "lm_head", "wte", "wpe", "gate", "shared_expert_gate")

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------
# Tensors.


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (..., R, C) -> q float8_e4m3fn (..., R, C), scale_inv fp32 (..., ceil(R / b0), ceil(C / b1)).

    Leading dimensions, such as stacked experts (E, F, D), are quantised matrix by matrix.
    """
    rows, cols = weight.shape[-2:]
    n_rows, n_cols = _blocks(rows, block[0]), _blocks(cols, block[1])
    # Zero padding completes the edge blocks without changing their amax.
    padded = F.pad(weight.float(), (0, n_cols * block[1] - cols, 0, n_rows * block[0] - rows))
    tiles = padded.unflatten(-1, (n_cols, block[1])).unflatten(-3, (n_rows, block[0]))  # (..., nR, b0, nC, b1)
    amax = tiles.abs().amax(dim=(-3, -1))  # (..., nR, nC)
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    # amax / s can land a hair above 448, and e4m3fn has no infinity: where a backend's cast does
    # not saturate (PyTorch's CPU cast does), out of range is NaN. Clamp first.
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2, -1).flatten(-3, -2)[..., :rows, :cols].contiguous(), scale_inv


def dequantize_fp8_blocks(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = BLOCK, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """q (..., R, C) times its block scales scale_inv (..., ceil(R / b0), ceil(C / b1)), as `dtype`.

    A scale tensor of another shape raises ValueError.
    """
    rows, cols = q.shape[-2:]
    expected = (*q.shape[:-2], _blocks(rows, block[0]), _blocks(cols, block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale shape {tuple(scale_inv.shape)} does not fit a {tuple(q.shape)} weight in "
            f"{block[0]} x {block[1]} blocks: expected {expected}"
        )
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return (q.float() * scale[..., :rows, :cols]).to(dtype)


def quantize_fp8_groups(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x (..., K) -> q float8_e4m3fn (..., K), scales fp32 (..., ceil(K / group)), x ~= q * scale.

    The blocks of a 1-row matrix: each row's groups of `group` consecutive channels share a scale.
    """
    q, scales = quantize_fp8_blocks(x.unsqueeze(-2), (1, group))
    return q.squeeze(-2), scales.squeeze(-2)


def dequantize_fp8_groups(
    q: torch.Tensor, scales: torch.Tensor, group: int = GROUP, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The inverse of `quantize_fp8_groups`: q (..., K) times scales (..., ceil(K / group)), as `dtype`."""
    return dequantize_fp8_blocks(q.unsqueeze(-2), scales.unsqueeze(-2), (1, group), dtype).squeeze(-2)


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Whether bf16_to_fp8 quantises this tensor of a Hugging Face checkpoint: a linear layer's weight."""
    module, _, parameter = name.rpartition(".")
    kept = module.rpartition(".")[2] in KEPT_MODULES
    return parameter == "weight" and tensor.ndim == 2 and tensor.is_floating_point() and not kept


# ---------------------------------------------------------------------------------------
# Folders.


def fp8_to_bf16(src: str | Path, dst: str | Path, progress: bool = True) -> Path:
    """Write `dst`, a copy of the FP8 folder `src` with every FP8 weight dequantised to bf16.

    The scales disappear, other tensors are copied unchanged, and config.json loses its
    quantization_config.
    """
    src = Path(src)
    config = _read_config(src)
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        raise CheckpointError(f"{src}: not an FP8 checkpoint (config.json has no fp8 quantization_config)")
    block = _block_size(quant, src)

    def convert(weights: WeightFiles, name: str) -> Tensors:
        scale_name = name + SCALE_SUFFIX
        if name.endswith(SCALE_SUFFIX):
            if name.removesuffix(SCALE_SUFFIX) not in weights.shapes:
                raise CheckpointError(f"{src}: {name} has no weight {name.removesuffix(SCALE_SUFFIX)}")
            return {}
        tensor = weights.read(name)
        if tensor.dtype != FP8:
            if scale_name in weights.shapes:
                raise CheckpointError(f"{src}: {name} has a {scale_name} but is {tensor.dtype}, not FP8")
            return {name: tensor}
        if scale_name not in weights.shapes:
            raise CheckpointError(f"{src}: {name} is FP8 but the checkpoint has no {scale_name}")
        try:
            return {name: dequantize_fp8_blocks(tensor, weights.read(scale_name), block)}
        except ValueError as err:
            raise CheckpointError(f"{src}: {scale_name}: {err}") from err

    del config["quantization_config"]
    return _rewrite_folder(src, dst, convert, lambda: config, progress)


def bf16_to_fp8(src: str | Path, dst: str | Path, block: tuple[int, int] = BLOCK, progress: bool = True) -> Path:
    """Write `dst`, a copy of the folder `src` with its linear weights in DeepSeek-V3's FP8 format.

    Each quantised `NAME.weight` is followed by its `NAME.weight_scale_inv` in the same shard;
    config.json gains a quantization_config.
    """
    if len(block) != 2 or min(block) < 1:
        raise CheckpointError(f"FP8 block size must be two positive integers, got {tuple(block)}")
    src = Path(src)
    config = _read_config(src)
    if "quantization_config" in config:
        quant = config["quantization_config"]
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise CheckpointError(f"{src}: already quantised (quantization_config: {method})")
    kept: list[str] = []

    def convert(weights: WeightFiles, name: str) -> Tensors:
        tensor = weights.read(name)
        if tensor.dtype == FP8 or name.endswith(SCALE_SUFFIX):
            raise CheckpointError(f"{src}: {name} is already FP8 data, yet config.json does not say so")
        if not is_quantizable(name, tensor):
            if tensor.ndim == 2 and name.endswith(".weight"):
                kept.append(name.removesuffix(".weight"))
            return {name: tensor}
        q, scale_inv = quantize_fp8_blocks(tensor, block)
        if not torch.isfinite(scale_inv).all():
            raise CheckpointError(f"{src}: {name} holds inf or NaN, which FP8 cannot represent")
        return {name: q, name + SCALE_SUFFIX: scale_inv}

    def quantized_config() -> dict[str, Any]:
        quant = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
            "modules_to_not_convert": kept,
        }
        return config | {"quantization_config": quant}

    return _rewrite_folder(src, dst, convert, quantized_config, progress)


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    return read_json(folder / "config.json")


def _block_size(quant: dict[str, Any], path: Path) -> tuple[int, int]:
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{path}: quantization_config.weight_block_size must be two positive integers, got {block!r} "
            "(only block-wise FP8 scales are supported)"
        )
    if quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{path}: FP8 format {quant['fmt']!r} is not supported, only e4m3")
    return block[0], block[1]


def _rewrite_folder(
    src: Path,
    dst: str | Path,
    convert: Callable[[WeightFiles, str], Tensors],
    config: Callable[[], dict[str, Any]],
    progress: bool,
) -> Path:
    """Write `dst` from `src`: each shard's tensors through `convert` into a shard of the same name,
    the index, config.json as `config()` returns it once the shards are done, and the other files.

    `convert(weights, name)` returns the output tensors of input tensor `name`; it may read
    other tensors (a scale) from `weights`, which reads one tensor at a time.
    """
    dst = Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CheckpointError(f"{dst}: the output folder must lie outside the input folder {src}")
    with WeightFiles(src) as weights, atomic_directory(dst) as out:
        weight_map: dict[str, str] = {}
        total_size = 0
        for path, names in listed_files(src).items():  # names None: the single file holds them all
            tensors: Tensors = {}
            for name in tqdm(names or list(weights.shapes), desc=path.name, unit="tensor", disable=not progress):
                tensors |= convert(weights, name)
            save_file(tensors, out / path.name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, path.name)
            total_size += sum(tensor.nbytes for tensor in tensors.values())
        if (src / INDEX).is_file():
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (out / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        (out / "config.json").write_text(json.dumps(config(), indent=2), encoding="utf-8")
        _copy_other_files(src, out)
    return dst


def _copy_other_files(src: Path, out: Path) -> None:
    """Tokenizer files, generation_config.json, code, ...: all but the weights, their index and config.json."""
    for item in src.iterdir():
        if item.name in (INDEX, "config.json") or item.suffix == ".safetensors":
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
