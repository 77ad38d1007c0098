"""Model-parallel shards: a checkpoint split for n ranks, one file per rank, as DeepSeek-V3 loads them.

Tensor parallelism splits each attention and MLP layer into a column-parallel first
projection and a row-parallel second one (Megatron-LM): a rank runs n_head / n heads, or
d_ff / n hidden channels, from the full input, and its output projection, reading only
those columns, yields a partial sum of the layer's output. Summing over ranks (the
all-reduce) gives the full output. Expert parallelism gives each rank n_experts / n whole
routed experts; the router, replicated, scores all of them, and a rank adds up the
outputs of the assignments that fall on its experts.

| tensors (per block unless top-level)                  | split along                  |
|-------------------------------------------------------|------------------------------|
| tok_emb, lm_head                                      | 0: vocabulary rows           |
| attn.q_proj, k_proj, v_proj (weight, bias)            | 0: whole query / kv heads    |
| MLA attn.q_proj or q_b_proj, kv_b_proj                | 0: whole heads               |
| attn.o_proj.weight                                    | 1: its heads' columns        |
| mlp.gate_proj, up_proj, mlp.shared.gate/up (w, b)     | 0: hidden channels           |
| mlp.down_proj.weight, mlp.shared.down_proj.weight     | 1: hidden channels           |
| mlp.experts.gate_proj, up_proj, down_proj (E, ., .)   | 0: whole experts             |
| biases of o_proj and down_proj                        | none: rank 0 whole, 0 others |
| norms, pos_emb, router, shared_gate, MLA's q_a_proj,  | none: replicated             |
| q_a_norm, kv_a_proj, kv_a_norm                        |                              |

A head's rows are contiguous in every split projection (MLA's q rows are [nope, rope] per
head, kv_b's [k_nope, v]), so whole heads land on each rank. The embedding is split by
vocabulary: a rank embeds the tokens of its range and zeros for the others, so the sum
over ranks is the embedding; the head's vocabulary slices of logits are concatenated.

A row-parallel bias must be added once, not once per rank: rank 0 holds it and the other
ranks hold zeros of the same shape. Every rank then has the same tensor names and shapes
(one rank-local model class loads any rank) and the plain sum of their outputs is the full
output. The shared-expert gate multiplies the shared expert's output, so each rank applies
it to its partial sum, which stays a partial sum.

Collaborative-experts ("moc") layers are refused: every token runs all experts, the router
attends over all their answers and the fusion over the selected ones, so no rank could
compute its part from a slice. Routed experts are split whole, so d_expert need not divide.

Files:

    <out>/model{rank}-mp{n}.safetensors   rank's tensors, under the full model's names (as `weights_of`
                                          stores them: a tied lm_head is tok_emb)
    <out>/config.json                     the full model's ModelConfig
    <out>/parallel.json                   {"world_size": n, "tensors": {name: {"dim": d or null,
                                          "experts": bool, "rank0": bool}}}; rank0: a bias held by rank 0
    <out>/tokenizer.json                  when given

`mistura.load` reads such a folder through `load_model_parallel`, which merges the ranks;
a tensor-parallel process reads its own rank's file alone through `read_rank`
(mistura.parallel.tensor).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mistura.atomic import atomic_directory
from mistura.checkpoint import check_names, complete_weights, read_tensors
from mistura.config import ModelConfig
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer

Tensors = dict[str, torch.Tensor]
PARALLEL = "parallel.json"

# Modules by their name within a block (or at the top level).
COLUMN_PARALLEL = {
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.q_b_proj",
    "attn.kv_b_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.shared.gate_proj",
    "mlp.shared.up_proj",
}
ROW_PARALLEL = {"attn.o_proj", "mlp.down_proj", "mlp.shared.down_proj"}
VOCAB_PARALLEL = {"tok_emb", "lm_head"}
EXPERT_PARALLEL = {"mlp.experts"}
REPLICATED = {
    "attn_norm",
    "mlp_norm",
    "norm",
    "pos_emb",
    "attn.q_norm",
    "attn.k_norm",
    "attn.q_a_proj",
    "attn.q_a_norm",
    "attn.kv_a_proj",
    "attn.kv_a_norm",
    "mlp.router",
    "mlp.router.gate",
    "mlp.shared_gate",
}


@dataclass(frozen=True)
class Placement:
    """Where one tensor goes."""

    dim: int | None  # split in n equal slices along dim; None: whole
    experts: bool = False  # the split runs over stacked experts
    rank0: bool = False  # whole on rank 0, zeros on the others (a row-parallel bias)


def placement(name: str) -> Placement:
    """The placement of a tensor, by its name in a mistura state dict."""
    module, _, parameter = block_role(name).rpartition(".")
    if module in VOCAB_PARALLEL or module in COLUMN_PARALLEL:
        return Placement(0)
    if module in ROW_PARALLEL:
        return Placement(1) if parameter == "weight" else Placement(None, rank0=True)
    if module in EXPERT_PARALLEL:
        return Placement(0, experts=True)
    if module in REPLICATED:
        return Placement(None)
    raise CheckpointError(f"{name}: no model-parallel rule for this tensor")


def block_role(name: str) -> str:
    """A name within its block ("blocks.3.attn.q_proj" -> "attn.q_proj"); top-level names as they are."""
    return re.sub(r"^blocks\.\d+\.", "", name)


def parallel_plan(config: ModelConfig) -> dict[str, int | None]:
    """The split dimension of every stored tensor of `Transformer(config)` (None: not split)."""
    return {name: placement(name).dim for name in expected_shapes(config)}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The stored tensors of `Transformer(config)` and their shapes; a tied lm_head is stored as tok_emb."""
    check_no_collaborative_experts(config)
    with torch.device("meta"):  # allocates nothing and runs no init
        model = Transformer(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def check_no_collaborative_experts(config: ModelConfig) -> None:
    """ConfigError if any layer is a collaborative-experts one, which no rank can compute a part of."""
    if "moc" in config.layer_mlp:
        raise ConfigError(
            "model.layer_mlp: collaborative-experts ('moc') layers cannot be split for model parallelism: "
            "every token runs all experts and the router attends over all their answers"
        )


def check_world_size(config: ModelConfig, n: int, experts: bool = True) -> None:
    """ConfigError unless n ranks can split every head count and width that `config` splits.

    experts=False leaves the routed experts whole (tensor parallelism keeps them on every rank).
    """
    if n < 1:
        raise ConfigError(f"model parallelism: the number of ranks must be >= 1, got {n}")
    widths = {"vocab_size": config.vocab_size, "n_head": config.n_head, "n_kv_head": config.n_kv_head}
    if "dense" in config.layer_mlp:
        widths["d_ff"] = config.d_ff
    if "moe" in config.layer_mlp:
        if experts:
            widths["moe.n_experts"] = config.moe.n_experts
        if config.moe.d_shared:
            widths["moe.d_shared"] = config.moe.d_shared
    for field, value in widths.items():
        if value % n:
            raise ConfigError(f"model.{field}: {value} does not split evenly over {n} model-parallel ranks")


def shard_state_dict(state_dict: Tensors, config: ModelConfig, rank: int, n: int) -> Tensors:
    """Rank `rank`'s tensors of a mistura state dict split for n ranks (full names, sliced tensors).

    A tied lm_head, if present, is left out: it is tok_emb.weight.
    """
    shapes = _checked_shapes(config, list(state_dict), n)
    if not 0 <= rank < n:
        raise ConfigError(f"model parallelism: rank {rank} is not in 0 .. {n - 1}")
    return _rank_tensors(shapes, state_dict.__getitem__, rank, n)


def write_model_parallel(
    out_dir: str | Path,
    config: ModelConfig,
    get_tensor: Callable[[str], torch.Tensor],
    names: list[str],
    n: int,
    tokenizer_file: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write the n rank files of a model (see the module docstring), one rank at a time.

    `get_tensor(name)` returns a full tensor; it is called once per tensor and rank, so it
    should read lazily (a `safe_open` handle's get_tensor): only one rank's tensors are
    held in memory. A tied lm_head among `names` is left out. The folder appears only once
    complete.
    """
    out_dir = Path(out_dir)
    shapes = _checked_shapes(config, names, n)
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise CheckpointError(f"{tokenizer_file}: no such tokenizer file")
    with atomic_directory(out_dir) as tmp:
        for rank in tqdm(range(n), desc=out_dir.name, unit="rank", disable=not progress):
            save_file(_rank_tensors(shapes, get_tensor, rank, n), tmp / rank_file(rank, n), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
        layout = {"world_size": n, "tensors": _layout(shapes)}
        (tmp / PARALLEL).write_text(json.dumps(layout, indent=1), encoding="utf-8")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    return out_dir


def rank_file(rank: int, n: int) -> str:
    return f"model{rank}-mp{n}.safetensors"


def _checked_shapes(config: ModelConfig, names: list[str], n: int) -> dict[str, tuple[int, ...]]:
    """The expected shapes, once n ranks and the tensor names are known to fit the config."""
    check_world_size(config, n)
    shapes = expected_shapes(config)
    stored = [name for name in names if not (config.tie_embeddings and name == "lm_head.weight")]
    check_names(stored, shapes, "the state dict")
    return shapes


def _rank_tensors(
    shapes: dict[str, tuple[int, ...]], get_tensor: Callable[[str], torch.Tensor], rank: int, n: int
) -> Tensors:
    return {name: _slice(name, get_tensor(name), shape, rank, n) for name, shape in shapes.items()}


def _slice(name: str, tensor: torch.Tensor, shape: tuple[int, ...], rank: int, n: int) -> torch.Tensor:
    """Rank `rank`'s part of one full tensor."""
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, the config expects {shape}")
    where = placement(name)
    if where.rank0:
        return tensor if rank == 0 else torch.zeros_like(tensor)
    if where.dim is None:
        return tensor
    size = shape[where.dim] // n
    return tensor.narrow(where.dim, rank * size, size).clone()  # its own storage, not a view of the full tensor


def _layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, int | bool | None]]:
    """parallel.json's tensors table."""
    return {name: _describe(placement(name)) for name in shapes}


def _describe(where: Placement) -> dict[str, int | bool | None]:
    return {"dim": where.dim, "experts": where.experts, "rank0": where.rank0}


# ---------------------------------------------------------------------------------------
# Reading the rank files back.


def is_model_parallel(directory: str | Path) -> bool:
    """Whether `directory` holds model-parallel rank files (it has a parallel.json)."""
    return (Path(directory) / PARALLEL).is_file()


def load_model_parallel(
    directory: Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """A model-parallel folder, its ranks merged, as a ready model in eval mode."""
    config, state = merge_model_parallel(directory)
    model = Transformer(config)
    model.load_state_dict(complete_weights(state, model, str(directory)))
    return model.to(device=device, dtype=dtype).eval()


def merge_model_parallel(directory: str | Path) -> tuple[ModelConfig, Tensors]:
    """The config and full state dict of a model-parallel folder, bit for bit the tensors it was split from.

    The state dict is in the stored form (a tied lm_head is absent: it is tok_emb.weight).
    """
    directory = Path(directory)
    n, config, shapes = _read_folder(directory)
    files = _rank_files(directory, n)
    try:
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(path, framework="pt")) for path in files]
            for path, handle in zip(files, handles):
                check_names(handle.keys(), shapes, str(path))
            merged = {name: _merge(name, [h.get_tensor(name) for h in handles], shapes[name], n) for name in shapes}
        return config, merged
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{directory}: cannot read the rank files ({err})") from err


def model_parallel_size(directory: str | Path) -> int:
    """The number of ranks a model-parallel folder is split for (its parallel.json's world_size)."""
    return _read_layout(Path(directory) / PARALLEL)[0]


def read_rank(directory: str | Path, rank: int) -> tuple[ModelConfig, Tensors]:
    """The config and rank `rank`'s tensors (its slices, under the full names) of a model-parallel folder.

    Only that rank's file is read; its names and slice shapes are checked against the config.
    The state dict is in the stored form, as in `merge_model_parallel`.
    """
    directory = Path(directory)
    n, config, shapes = _read_folder(directory)
    if not 0 <= rank < n:
        raise CheckpointError(f"{directory}: rank {rank} is not in 0 .. {n - 1} of this folder's {n} ranks")
    path = _rank_files(directory, n)[rank]
    tensors = read_tensors(path)
    check_names(tensors, shapes, str(path))
    for name, tensor in tensors.items():
        _check_part(name, tensor, shapes[name], rank, n)
    return config, tensors


def _read_folder(directory: Path) -> tuple[int, ModelConfig, dict[str, tuple[int, ...]]]:
    """A model-parallel folder's world size, config and full tensor shapes, its layout checked against the config."""
    n, placed = _read_layout(directory / PARALLEL)
    try:
        config = ModelConfig.from_json(directory / "config.json")
        shapes = expected_shapes(config)
    except ConfigError as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from err
    expected = _layout(shapes)
    if placed != expected:
        check_names(placed, shapes, str(directory / PARALLEL))
        moved = next(name for name in expected if placed[name] != expected[name])
        raise CheckpointError(
            f"{directory / PARALLEL}: {moved} is placed {placed[moved]}, the config says {expected[moved]}"
        )
    return n, config, shapes


def _read_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """parallel.json's world size and tensors table."""
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8 or not JSON
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from err
    n, placed = (layout.get("world_size"), layout.get("tensors")) if isinstance(layout, dict) else (None, None)
    if not isinstance(n, int) or n < 1 or not isinstance(placed, dict):
        raise CheckpointError(f"{path}: needs an integer world_size >= 1 and a tensors table")
    return n, placed


def _rank_files(directory: Path, n: int) -> list[Path]:
    files = [directory / rank_file(rank, n) for rank in range(n)]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: missing rank file(s) {', '.join(missing)} of world size {n}")
    extra = sorted({path.name for path in directory.glob("model*-mp*.safetensors")} - {path.name for path in files})
    if extra:
        raise CheckpointError(f"{directory}: unexpected rank file(s) {', '.join(extra)} for world size {n}")
    return files


def _merge(name: str, parts: list[torch.Tensor], shape: tuple[int, ...], n: int) -> torch.Tensor:
    """The full tensor from its n rank parts."""
    for rank, part in enumerate(parts):
        _check_part(name, part, shape, rank, n)
    dim = placement(name).dim
    return parts[0] if dim is None else torch.cat(parts, dim=dim)


def _check_part(name: str, part: torch.Tensor, shape: tuple[int, ...], rank: int, n: int) -> None:
    """CheckpointError unless `part` has the shape of rank `rank`'s part of a full tensor of `shape`."""
    dim = placement(name).dim
    part_shape = shape if dim is None else (*shape[:dim], shape[dim] // n, *shape[dim + 1 :])
    if tuple(part.shape) != part_shape:
        raise CheckpointError(f"{rank_file(rank, n)}: {name} has shape {tuple(part.shape)}, expected {part_shape}")
