"""Which layers of a model are quantised, and the module swap that quantises them.

Quantised: every `nn.Linear` of attention (q/k/v/o; MLA's q_proj, q_a_proj, q_b_proj,
kv_a_proj, o_proj), of dense MLPs and of shared experts, and the stacked routed experts of
MoE layers (`QuantExperts`). Kept in full precision, with the norms and embeddings:
- `lm_head`: the logits are the most sensitive output, and a tied head is the embedding
  itself, which a quantised copy would have to duplicate. DeepSeek-V3's FP8 checkpoint
  keeps it too.
- router gates (`gate`, `shared_gate`, MoC's `score`): small logit gaps decide the routing,
  and the routers read their weights directly.
- MLA's `kv_b_proj`: the absorbed decoding path reads its weight as a matrix, folding it
  into the queries and outputs; so does `nn.MultiheadAttention` (MoC's attentions) with
  its projections, and MoC with its experts' stacked weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.model.moe import GroupedExperts, MoELayer
from mistura.quant.experts import QuantExperts
from mistura.quant.fp8 import Fp8Linear
from mistura.quant.int4 import Int4Linear
from mistura.quant.int8 import Int8Linear
from mistura.quant.linear import QuantLinear

FORMATS: dict[str, type[QuantLinear]] = {"fp8": Fp8Linear, "int8": Int8Linear, "int4": Int4Linear}
DEFAULT_GROUP_SIZE = {"fp8": 128, "int8": None, "int4": 128}  # int8: None, one scale per output row
KEPT = ("lm_head", "gate", "shared_gate", "score", "kv_b_proj")


@dataclass
class QuantConfig:
    """A quantisation recipe; a quantised checkpoint's config.json keeps it as its `quantization` section.

    group_size counts the input channels that share a scale: fp8's blocks are 128 x 128 (DeepSeek-V3's
    format, fixed); int8's default is the whole row (see int8.py), int4's 128.
    """

    format: str
    group_size: int | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"unknown quantization format '{self.format}': choose {', '.join(FORMATS)}")
        default = DEFAULT_GROUP_SIZE[self.format]
        if self.format == "fp8" and self.group_size not in (None, default):
            raise ConfigError(
                f"fp8 uses DeepSeek-V3's fixed {default} x {default} weight blocks and 1 x {default} activation "
                f"groups, not a group size of {self.group_size}; --group-size applies to int8 and int4"
            )
        if self.group_size is None:
            self.group_size = default
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group size must be a positive number of input channels, got {self.group_size}")
        if self.format == "int4" and self.group_size % 2:
            raise ConfigError(f"int4 group size must be even (two 4-bit codes share a byte), got {self.group_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_model(model: Transformer, quant: QuantConfig) -> Transformer:
    """Quantise `model` in place, layer by layer (see the module docstring); returns it."""
    for name, module in _checked_targets(model, quant):
        model.set_submodule(name, _empty_like(module, quant).quantize_from(module))
    return model


def quantized_skeleton(model: Transformer, quant: QuantConfig) -> Transformer:
    """Swap `model`'s target layers for empty quantised ones, to load a quantised checkpoint into."""
    for name, module in _checked_targets(model, quant):
        model.set_submodule(name, _empty_like(module, quant))
    return model


def targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer to quantise: the nn.Linear layers not KEPT, and MoE routed experts."""
    found = []
    for name, module in model.named_modules():
        # Exactly nn.Linear: MultiheadAttention's out_proj is a subclass, whose weight its owner reads.
        if type(module) is nn.Linear and name.rpartition(".")[2] not in KEPT:
            found.append((name, module))
        elif isinstance(module, MoELayer):
            found.append((f"{name}.experts", module.experts))
    return found


def _checked_targets(model: Transformer, quant: QuantConfig) -> list[tuple[str, nn.Module]]:
    """targets(model), once every one is known to take quant's group size."""
    if any(isinstance(module, (QuantLinear, QuantExperts)) for module in model.modules()):
        raise ConfigError("the model is already quantised")
    found = targets(model)
    if quant.format == "fp8" or quant.group_size is None:  # edge blocks, or whole rows: any width fits
        return found
    widths = [(name, width) for name, module in found for width in _input_widths(module)]
    for name, in_features in widths:
        if in_features % quant.group_size:
            common = math.gcd(*(width for _, width in widths))
            raise ConfigError(
                f"{quant.format} group size {quant.group_size} does not divide the {in_features} input channels "
                f"of {name}; every layer's input width is a multiple of {common}: choose a divisor of {common}"
            )
    return found


def _input_widths(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, GroupedExperts):
        _, d_expert, d_model = module.gate_proj.shape
        return d_model, d_expert
    return (module.in_features,)


def _empty_like(module: nn.Module, quant: QuantConfig) -> QuantLinear | QuantExperts:
    linear = FORMATS[quant.format]
    if isinstance(module, GroupedExperts):
        empty = QuantExperts.like(module, linear, quant.group_size)
    else:
        empty = linear.like(module, quant.group_size)
    return empty.to(next(module.parameters()).device)
