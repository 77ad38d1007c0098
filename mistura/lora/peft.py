"""PEFT's LoRA format both ways, under the Hugging Face names that `mistura convert to-hf` gives the base.

    <dir>/adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, use_rslora,
                                       target_modules, target_parameters, rank_pattern, alpha_pattern
    <dir>/adapter_model.safetensors    base_model.model.<hf module>.lora_A.weight (r, in), .lora_B.weight (out, r)

so that `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), dir)`
computes what mistura computes with the adapter. The names come from the model type's name
table (mistura.convert.families), expanded as `to_hf` expands it:

- A renamed linear (q_proj, MLA's kv_a_proj as kv_a_proj_with_mqa, ...) keeps its A and B.
- A fused tensor holds several of mistura's layers along its rows (GPT-2's c_attn: q, k, v).
  Their updates become one of rank n r: A stacks the n A's, B is block-diagonal, placing each
  B on its layer's rows; `rank_pattern` gives that rank and `alpha_pattern` the alpha that
  keeps each update's scale. A layer not adapted leaves its rows zero.
- Routed experts: transformers 5 keeps them stacked as `mlp.experts.gate_up_proj` (E, 2F, D,
  gate and up fused) and `mlp.experts.down_proj` (E, D, F); PEFT adapts such tensors through
  `target_parameters`, with one A/B pair per expert (A (E r, in) expert-major, B (out, r E)
  rank-major), so mistura's per-expert adapters carry over exactly, gate and up fused as
  above. Transformers 4 kept experts as separate modules: this layout is transformers 5's.
- In a MoE model, PEFT reads a target module named gate_proj, up_proj or down_proj as one of
  transformers 4's expert projections and moves it onto the stacked experts; the dense MLPs
  and shared experts of MoE models are therefore adapted through their `weight` parameter
  (target_parameters), which PEFT adapts as it adapts the module, under the same names.

PEFT cannot drop out inside a parameter's adapter: an adapter with target_parameters is
written with lora_dropout 0, which changes no output (dropout acts in training only).

Import reads any PEFT LoRA adapter of these names: each fused tensor's update is cut back
into its layers (block by block where it is block-diagonal, else every layer taking the whole
A and its own rows of B), each update's scale folded into B, and adapters of lower rank
padded with zeros to the highest. What mistura cannot run is refused by name: DoRA, LoRA
biases, modules_to_save, adapters of the embeddings or lm_head.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mistura.atomic import atomic_directory
from mistura.config import ModelConfig
from mistura.convert.families import model_type_for
from mistura.convert.hf import hf_config, read_json, tensor_map
from mistura.errors import CheckpointError
from mistura.lora.checkpoint import read_adapter_config, read_adapter_weights, save_adapter
from mistura.lora.config import LoRAConfig
from mistura.lora.layers import projection_shape
from mistura.lora.model import adaptable, load_adapter_state
from mistura.model import Transformer
from mistura.quant.experts import PROJECTIONS

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the model's own names
# transformers 5's stacked experts: parameter -> mistura's projections along its rows, in its order of parameters.
EXPERT_PARAMETERS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
# In a MoE model, PEFT reads target_modules of these names as transformers 4's expert projections.
EXPERT_LIKE = (".gate_proj", ".up_proj", ".down_proj")
Pair = tuple[torch.Tensor, torch.Tensor]  # an update's (A (..., r, in), B (..., out, r))
# PEFT options that change what an adapter computes and that mistura does not run, with their inactive values.
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None,
               "layer_replication": None}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One Hugging Face tensor that PEFT adapts, and the mistura layers whose updates it holds."""

    module: str  # the Hugging Face module
    parameter: str | None  # the parameter of it adapted through target_parameters, or None (target_modules)
    parts: tuple[tuple[str, int], ...]  # (mistura layer, or experts.projection; its rows), along the tensor's rows
    rows: torch.Tensor | None  # mistura's order of the tensor's rows: ours = hf[rows]
    transposed: bool  # a Conv1D (GPT-2), which PEFT adapts with fan_in_fan_out
    experts: int = 0  # stacked experts, or 0

    @property
    def name(self) -> str:
        """Its entry in target_modules or target_parameters, and in rank_pattern and alpha_pattern."""
        return self.module if self.parameter is None else f"{self.module}.{self.parameter}"


def export_peft(adapter: str | Path, out_dir: str | Path, base_name: str | None = None) -> Path:
    """Write a mistura adapter folder as a PEFT folder for the base that `to_hf` exports; returns out_dir.

    `base_name` becomes base_model_name_or_path (the exported Hugging Face folder, say).
    """
    config, metadata = read_adapter_config(Path(adapter))
    state = read_adapter_weights(Path(adapter))
    targets = [t for t in hf_targets(ModelConfig.from_dict(metadata["base"]["config"])) if _adapted(t, state)]
    parameters = [t for t in targets if t.parameter]
    tensors, ranks, alphas = {}, {}, {}
    for target in targets:
        updates = [_update(state, part) for part, _ in target.parts]
        A, B = _fused(target, updates)
        n = len(updates) - updates.count(None)
        if n > 1:
            ranks[target.name], alphas[target.name] = n * config.rank, config.alpha * _growth(n, config)
        key = _peft_key(target, parameters)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = _to_peft_layout(A, B, target)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0 if parameters else config.dropout,
        "use_rslora": config.rslora,
        "target_modules": [t.name for t in targets if not t.parameter],
        "target_parameters": [t.name for t in parameters],
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "fan_in_fan_out": any(t.transposed for t in targets),
        "bias": "none",
        "inference_mode": True,
    }
    with atomic_directory(out_dir) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
    return Path(out_dir)


def import_peft(
    peft_dir: str | Path, out_dir: str | Path, base: Transformer, base_path: str | Path | None = None
) -> Path:
    """Read a PEFT LoRA folder onto `base` (adapting it in place) and save it as a mistura adapter folder."""
    peft_dir = Path(peft_dir)
    peft, tensors = _read_peft(peft_dir)
    where = str(peft_dir / PEFT_WEIGHTS)
    updates = _updates(peft, tensors, hf_targets(base.config), where)
    layers = list(dict.fromkeys(part.rpartition(".")[0] if _is_expert(part) else part for part in updates))
    rank = max(A.shape[-2] for A, _, _ in updates.values())
    alpha, rslora = float(peft["lora_alpha"]), bool(peft.get("use_rslora", False))
    config = LoRAConfig(rank, alpha, float(peft.get("lora_dropout", 0.0)), rslora, tuple(layers))
    state = {}
    for layer in layers:
        for part in [f"{layer}.{p}" for p in PROJECTIONS] if layer.endswith(".experts") else [layer]:
            A, B, scaling = updates.get(part) or _no_update(base, part)
            state[_key(part)], state[_key(part, "B")] = _padded(A, B * (scaling / config.scale), rank)
    load_adapter_state(base, config, state, where)
    return save_adapter(base, out_dir, base_path)


def hf_targets(config: ModelConfig) -> list[Target]:
    """Every Hugging Face tensor PEFT may adapt in the export of a model of `config`, in model order."""
    model_type = model_type_for(config)
    mapped = tensor_map(model_type, config, hf_config(config, model_type))
    with torch.device("meta"):
        layers = adaptable(Transformer(config))
    moe = config.moe is not None and "moe" in config.layer_mlp
    targets: dict[str, Target] = {}
    for layer in layers:
        if layer.endswith(".experts"):
            module = f"model.layers.{layer.split('.')[1]}.mlp.experts"
            for parameter, projections in EXPERT_PARAMETERS.items():
                parts = tuple((f"{layer}.{p}", mapped.shapes[f"{layer}.{p}"][1]) for p in projections)
                targets[f"{module}.{parameter}"] = Target(module, parameter, parts, None, False, config.moe.n_experts)
            continue
        hf_name = mapped.feeds[f"{layer}.weight"][0]
        rule = mapped.rules[hf_name]
        parts = tuple((t.removesuffix(".weight"), mapped.shapes[t][0]) for t in rule.targets)
        module = hf_name.removesuffix(".weight")
        parameter = "weight" if moe and module.endswith(EXPERT_LIKE) else None
        targets.setdefault(module, Target(module, parameter, parts, rule.rows, rule.transposed))
    return list(targets.values())


def _is_expert(part: str) -> bool:
    layer, _, projection = part.rpartition(".")
    return projection in PROJECTIONS and layer.endswith(".experts")


def _key(part: str, factor: str = "A") -> str:
    """The adapter-state name of a part's A or B: `<layer>.lora_A`, or `<experts>.lora_A.<proj>` for experts."""
    if _is_expert(part):
        layer, _, projection = part.rpartition(".")
        return f"{layer}.lora_{factor}.{projection}"
    return f"{part}.lora_{factor}"


def _adapted(target: Target, state: dict[str, torch.Tensor]) -> bool:
    return any(_key(part) in state for part, _ in target.parts)


def _update(state: dict[str, torch.Tensor], part: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A part's (A, B) in an adapter state, or None where the part is not adapted."""
    return (state[_key(part)], state[_key(part, "B")]) if _key(part) in state else None


def _growth(n: int, config: LoRAConfig) -> float:
    """How much alpha grows for an update of rank n r to keep the scale of each rank-r part."""
    return math.sqrt(n) if config.rslora else n


def _fused(target: Target, updates: list[Pair | None]) -> Pair:
    """One update from the parts' (A (..., r, in), B (..., rows, r)), None for a layer not adapted:
    A (..., n r, in) stacked, B (..., all rows, n r) block-diagonal, in Hugging Face's row order."""
    present = [pair for pair in updates if pair is not None]
    A = torch.cat([a for a, _ in present], dim=-2)
    r, sizes = present[0][0].shape[-2], [n for _, n in target.parts]
    B = torch.zeros(*A.shape[:-2], sum(sizes), A.shape[-2], dtype=A.dtype)
    block, start = 0, 0
    for pair, n in zip(updates, sizes):
        if pair is not None:
            B[..., start : start + n, block * r : (block + 1) * r] = pair[1]
            block += 1
        start += n
    if target.rows is not None:
        B = B[..., target.rows.argsort(), :]
    return A, B


def _split(A: torch.Tensor, B: torch.Tensor, target: Target) -> list[Pair]:
    """The inverse of `_fused`: each part's (A, B), block by block where B is block-diagonal over the parts,
    else each taking all of A and its own rows of B."""
    if target.rows is not None:
        B = B[..., target.rows, :]
    sizes = [n for _, n in target.parts]
    rows = B.split(sizes, dim=-2)
    n, rank = len(sizes), A.shape[-2]
    if n > 1 and rank % n == 0:
        k = rank // n
        blocks = [b[..., p * k : (p + 1) * k] for p, b in enumerate(rows)]
        if all(b.count_nonzero() == whole.count_nonzero() for b, whole in zip(blocks, rows)):
            return [(A[..., p * k : (p + 1) * k, :], b) for p, b in enumerate(blocks)]
    return [(A, b) for b in rows]


def _to_peft_layout(A: torch.Tensor, B: torch.Tensor, target: Target) -> Pair:
    """Stacked experts' A (E, r, in) -> (E r, in) expert-major, B (E, out, r) -> (out, r E) rank-major."""
    if not target.experts:
        return A, B
    return A.flatten(0, 1), B.permute(1, 2, 0).flatten(1)


def _from_peft_layout(A: torch.Tensor, B: torch.Tensor, target: Target) -> Pair:
    """The inverse of `_to_peft_layout`."""
    if not target.experts:
        return A, B
    return A.unflatten(0, (target.experts, -1)), B.unflatten(1, (-1, target.experts)).permute(2, 0, 1)


def _peft_key(target: Target, parameters: list[Target]) -> str:
    """The state-dict prefix of a target's tensors, given every target adapted through target_parameters.
    PEFT nests the wrappers of one module's parameters in the module's order of parameters (`hf_targets`'
    order), the first innermost: each wrapper outside it adds a `base_layer`."""
    siblings = [t.parameter for t in parameters if t.module == target.module]
    depth = len(siblings) - 1 - siblings.index(target.parameter) if target.parameter in siblings else 0
    return PREFIX + target.module + ".base_layer" * depth


def _read_peft(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA folder's config and tensors, once its options are ones mistura runs."""
    if not (folder / PEFT_CONFIG).is_file():
        raise CheckpointError(f"{folder} has no {PEFT_CONFIG}: not a PEFT adapter folder")
    peft = read_json(folder / PEFT_CONFIG)
    if peft.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder / PEFT_CONFIG}: peft_type {peft.get('peft_type')!r}, only LORA is supported")
    for option, inactive in UNSUPPORTED.items():
        if peft.get(option, inactive) not in (inactive, [], {}):
            raise CheckpointError(f"{folder / PEFT_CONFIG}: {option}={peft[option]!r} is not supported by mistura")
    if not (folder / PEFT_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} has no {PEFT_WEIGHTS} (pickled adapter_model.bin files are refused)")
    try:
        return peft, load_file(folder / PEFT_WEIGHTS)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {folder / PEFT_WEIGHTS}: {err}") from err


def _updates(peft: dict[str, Any], tensors: dict[str, torch.Tensor], targets: list[Target], where: str) -> dict:
    """mistura part -> (A, B, scaling) for every update the PEFT tensors hold, in mistura's layouts."""
    wanted = peft.get("target_parameters") or []
    parameters = [t for t in targets if t.parameter and any(t.name == w or t.name.endswith(f".{w}") for w in wanted)]
    keys = {_peft_key(t, parameters): t for t in targets if not t.experts or t in parameters}
    unknown = sorted({name.rpartition(".lora_")[0] or name for name in tensors} - keys.keys())
    if unknown:
        raise CheckpointError(f"{where}: adapters of {', '.join(unknown[:3])}, which mistura cannot adapt")
    updates = {}
    for key, target in keys.items():
        if f"{key}.lora_A.weight" not in tensors:
            continue
        A, B = tensors[f"{key}.lora_A.weight"].float(), tensors[f"{key}.lora_B.weight"].float()
        A, B = _from_peft_layout(A, B, target)
        alpha = _pattern(peft.get("alpha_pattern") or {}, target.name, peft["lora_alpha"])
        scaling = alpha / (math.sqrt(A.shape[-2]) if peft.get("use_rslora") else A.shape[-2])
        for (part, _), (a, b) in zip(target.parts, _split(A, B, target)):
            updates[part] = (a, b, scaling)
    if not updates:
        raise CheckpointError(f"{where}: no LoRA tensors")
    return updates


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the end of `name`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _no_update(base: Transformer, part: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A zero update (rank 1) for an expert projection that the PEFT adapter leaves alone."""
    layer, _, projection = part.rpartition(".")
    n_experts, out_features, in_features = projection_shape(base.get_submodule(layer), projection)
    return torch.zeros(n_experts, 1, in_features), torch.zeros(n_experts, out_features, 1), 1.0


def _padded(A: torch.Tensor, B: torch.Tensor, rank: int) -> Pair:
    """A (..., r, in) and B (..., out, r) padded with zeros to `rank`: the same update B A."""
    pad = rank - A.shape[-2]
    return torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad))
