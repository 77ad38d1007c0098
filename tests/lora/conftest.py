"""Tiny models of every kind LoRA adapts, and helpers to give adapters non-zero updates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mistura.checkpoint import save_model
from mistura.model import Transformer

MLA_HEADS = dict(qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
# The architectures and what each exercises.
KINDS = {
    "llama": ("llama-tiny", dict(n_kv_head=2)),  # GQA, SwiGLU, tied head
    "gpt2": ("gpt2-baseline-tiny", {}),  # learned positions, biases, GELU
    # A dense layer, then routed experts with a gated shared expert; biases on q/k/v (Qwen2-MoE).
    "qwen-moe": (
        "llama-tiny",
        dict(
            layer_mlp=["dense", "moe"],
            qkv_bias=True,
            moe=dict(n_experts=4, top_k=2, d_expert=16, d_shared=32, shared_gate=True),
        ),
    ),
    # DeepSeek-V3's shape scaled down: MLA (q_a/q_b, kv_a/kv_b, o), a dense layer, then fine experts and a shared one.
    "dragao": ("dragao-tiny", dict(n_layer=2, mla=dict(q_lora_rank=16, kv_lora_rank=16, **MLA_HEADS))),
}


@pytest.fixture
def build(tiny) -> Callable[[str], Transformer]:
    """build(kind): a tiny perturbed model of that kind in eval mode, the same every time."""

    def make(kind: str, **overrides) -> Transformer:
        preset, options = KINDS[kind]
        torch.manual_seed(0)
        model = Transformer(tiny(preset, **{**options, **overrides}))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn_like(param))
        return model.eval()

    return make


@pytest.fixture
def saved(build, tmp_path) -> Callable[[str], Path]:
    """saved(kind): build(kind) saved as a checkpoint."""
    return lambda kind, **overrides: save_model(tmp_path / f"{kind}-base", build(kind, **overrides))


@pytest.fixture
def randomize() -> Callable[..., torch.nn.Module]:
    """randomize(model): every adapter given a non-zero update, B drawn at random as after some training."""

    def draw(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B" in name:
                    param.copy_(std * torch.randn(param.shape, generator=generator))
        return model

    return draw


@pytest.fixture
def tokens() -> Callable[..., torch.Tensor]:
    """tokens(model): a fixed batch of token ids (2, 12) for it."""
    return lambda model, batch=2, length=12: torch.randint(
        0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2)
    )
