"""Folding adapters into their base: in place and reversibly, or into a plain model to save.

`merge_lora` adds each adapter's s B A to its base weight, after which the model computes
as its bases alone (no extra matmuls); `unmerge_lora` subtracts it again, giving the base
back up to float rounding. Both need full-precision bases: a quantised weight cannot hold
the sum, so they refuse a QLoRA model.

`merged_model` is what `mistura lora merge` saves: every LoRA layer replaced by its base with
the update folded in, and every quantised layer by a full-precision one holding its
dequantised weight. A QLoRA adapter thus becomes a full-precision checkpoint of the
dequantised base plus the adapters: the weights the adapters were trained against.
"""

from __future__ import annotations

import torch
from torch import nn

from mistura.lora.layers import check_mergeable
from mistura.lora.model import LoRALayer, adapted_layers, lora_layers
from mistura.model import Transformer
from mistura.model.moe import GroupedExperts
from mistura.quant.experts import PROJECTIONS, QuantExperts
from mistura.quant.linear import QuantLinear


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its full-precision base weight, in place; returns the model."""
    for layer in _checked(model).values():
        layer.merge()
    return model


def unmerge_lora(model: Transformer) -> Transformer:
    """Take merged adapters out of their base weights again, in place; returns the model."""
    for layer in _checked(model).values():
        layer.unmerge()
    return model


@torch.no_grad()
def merged_model(model: Transformer) -> Transformer:
    """`model` as a plain full-precision Transformer, in place: quantised layers dequantised, adapters folded
    in and removed. Its parameters require gradients again, as a freshly built model's."""
    dtype = model.tok_emb.weight.dtype
    replaced: tuple[str, ...] = ()
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantExperts)) and not name.startswith(replaced):  # not within experts
            model.set_submodule(name, _dequantized(module, dtype))
            replaced += (f"{name}.",)
    for name, layer in lora_layers(model).items():
        layer.merge()
        model.set_submodule(name, layer.base)
    return model.requires_grad_(True)


def _checked(model: Transformer) -> dict[str, LoRALayer]:
    """The LoRA layers, once every one is known to have a full-precision base (nothing changes otherwise)."""
    layers = adapted_layers(model)
    for name, layer in layers.items():
        check_mergeable(layer.base, name)
    return layers


def _dequantized(module: QuantLinear | QuantExperts, dtype: torch.dtype) -> nn.Module:
    """A full-precision layer holding the weights a quantised one stands for."""
    if isinstance(module, QuantExperts):
        stacks = {name: torch.stack([q.dequantize(dtype) for q in getattr(module, name)]) for name in PROJECTIONS}
        n_experts, d_expert, d_model = stacks["gate_proj"].shape
        experts = GroupedExperts(n_experts, d_model, d_expert).to(device=stacks["gate_proj"].device, dtype=dtype)
        for name, stack in stacks.items():
            getattr(experts, name).copy_(stack)
        return experts
    weight = module.dequantize(dtype)
    linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, weight.device, dtype)
    linear.weight.copy_(weight)
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    return linear
