import pytest
import torch

from mistura.config import ModelConfig

torch.set_num_threads(2)

# Tiny shapes keep every test fast on two CPU cores.
TINY = dict(vocab_size=97, max_seq_len=32, n_layer=2, d_model=32, n_head=4)


@pytest.fixture
def tiny():
    """A tiny config of a named preset: tiny("llama-tiny", n_kv_head=1)."""

    def make(preset: str = "llama-tiny", **overrides) -> ModelConfig:
        return ModelConfig.from_name(preset, **{**TINY, "d_ff": 64, **overrides})

    return make
