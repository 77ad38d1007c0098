"""Which layers of a model LoRA can adapt, and the module swap that adapts them.

Adaptable: the linear layers of attention (q/k/v/o; MLA's q_proj or q_a_proj/q_b_proj,
kv_a_proj, kv_b_proj, o_proj), of dense MLPs and of shared experts, full precision or
quantised, and the routed experts of MoE layers. Not adaptable: embeddings, norms, the
lm_head (often tied to the embedding), routers, and the collaborative experts of MoC.

`apply_lora` swaps each targeted layer for its LoRA layer in place and freezes every other
parameter, so that only the adapters get gradients and optimizer state. The adapters'
tensors are the state-dict entries `<layer>.lora_A` and `<layer>.lora_B` (`.lora_A.<proj>`
for experts): `adapter_state` gives them, `load_adapter_state` fills them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mistura.checkpoint import check_shapes
from mistura.errors import ConfigError
from mistura.lora.config import LoRAConfig
from mistura.lora.layers import LoRAExperts, LoRALinear
from mistura.model import Transformer
from mistura.model.attention import Attention
from mistura.model.mla import MultiHeadLatentAttention
from mistura.model.mlp import GeluMLP, SwiGLU
from mistura.model.moe import GroupedExperts, MoELayer
from mistura.quant.linear import QuantLinear

OWNERS = (Attention, MultiHeadLatentAttention, GeluMLP, SwiGLU)  # modules whose linear layers LoRA adapts
LoRALayer = LoRALinear | LoRAExperts


@dataclass(frozen=True)
class Share:
    """How many parameters train: the adapters', against the whole model's (adapters included)."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total

    def __str__(self) -> str:
        return f"{self.trainable:,} of {self.total:,} ({self.fraction:.2%})"


def adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer LoRA can adapt, by module name, in model order (see the module docstring)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, OWNERS):
            for child, layer in module.named_children():
                if isinstance(layer, (nn.Linear, QuantLinear)):
                    found[f"{name}.{child}"] = layer
        elif isinstance(module, MoELayer) and isinstance(module.experts, GroupedExperts):
            found[f"{name}.experts"] = module.experts
    return found


def apply_lora(model: Transformer, config: LoRAConfig) -> Transformer:
    """Adapt `model`'s layers that `config.targets` selects, in place, and freeze the rest; returns it."""
    _swap(model, _adapters(model, config))
    return model


def load_adapter_state(model: Transformer, config: LoRAConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Adapt `model` as `apply_lora` does, with the adapters' tensors from `state` (names as `adapter_state`'s).

    Every name and shape is checked before the model changes: CheckpointError names a mismatch.
    """
    adapters = _adapters(model, config)
    expected = {f"{name}.{key}": param for name, layer in adapters.items() for key, param in _own(layer).items()}
    check_shapes({name: tuple(t.shape) for name, t in state.items()}, {n: p.shape for n, p in expected.items()}, where)
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
    _swap(model, adapters)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The model's LoRA layers, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, (LoRALinear, LoRAExperts))}


def adapted_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """`lora_layers`, or a ConfigError where the model has none."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA adapters (apply_lora or load_adapter adds them)")
    return layers


def lora_config(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig the model was adapted with; ConfigError if it has no adapters."""
    return next(iter(adapted_layers(model).values())).config


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by state-dict name (`blocks.0.attn.q_proj.lora_A`, ...), detached, on the CPU."""
    return {
        f"{name}.{key}": param.detach().cpu().contiguous()
        for name, layer in lora_layers(model).items()
        for key, param in _own(layer).items()
    }


def trainable_share(model: nn.Module) -> Share:
    """The parameters that require gradients against all of them (a tied parameter once); a quantised
    layer's weight counts as its in x out values, though it is stored in buffers of codes."""
    params = list(model.parameters())
    quantised = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return Share(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantised)


def _adapters(model: Transformer, config: LoRAConfig) -> dict[str, LoRALayer]:
    """A new LoRA layer for each layer the targets select, not yet swapped in."""
    if lora_layers(model):
        raise ConfigError("the model already has LoRA adapters: fold them in (merged_model) or start from a fresh base")
    layers = adaptable(model)
    return {name: _wrap(layers[name], config) for name in config.select(list(layers))}


def _wrap(layer: nn.Module, config: LoRAConfig) -> LoRALayer:
    return LoRAExperts(layer, config) if isinstance(layer, GroupedExperts) else LoRALinear(layer, config)


def _own(layer: LoRALayer) -> dict[str, nn.Parameter]:
    """A LoRA layer's own tensors, by name within it: lora_A and lora_B (lora_A.gate_proj, ... for experts)."""
    return {name: param for name, param in layer.named_parameters() if name.startswith("lora_")}


def _swap(model: Transformer, adapters: dict[str, LoRALayer]) -> None:
    """Freeze every parameter of the model, then swap in the adapters, whose own tensors alone require gradients."""
    model.requires_grad_(False)
    for name, layer in adapters.items():
        model.set_submodule(name, layer)
