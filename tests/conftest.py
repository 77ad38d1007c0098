from pathlib import Path

import pytest
import torch

from mistura.config import ModelConfig
from mistura.data.corpus import load_machado
from mistura.data.prepare import prepare

# Tiny shapes run fastest on one thread, and one thread cannot spin-wait on a busy machine.
torch.set_num_threads(1)

# Tiny shapes keep every test fast on two CPU cores.
TINY = dict(vocab_size=97, max_seq_len=32, n_layer=2, d_model=32, n_head=4)


@pytest.fixture
def tiny():
    """A tiny config of a named preset: tiny("llama-tiny", n_kv_head=1)."""

    def make(preset: str = "llama-tiny", **overrides) -> ModelConfig:
        return ModelConfig.from_name(preset, **{**TINY, "d_ff": 64, **overrides})

    return make


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Six short works of the embedded corpus, as a folder of .txt files."""
    folder = tmp_path_factory.mktemp("corpus")
    works = sorted(load_machado(), key=lambda d: len(d.text))[10:16]
    for i, doc in enumerate(works):
        (folder / f"{i}.txt").write_text(doc.text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def prepared(small_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(str(small_corpus), out, vocab_size=384, val_fraction=0.3, seed=0, log=lambda *a: None)
    return out


@pytest.fixture
def eager_flex(monkeypatch) -> list:
    """Paged flex attention uncompiled: exact through its mask_mod alone, with no compile to wait for. The list
    it gives grows by one for every call of the kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    from mistura.model import paged_attention

    calls = []

    def kernel(*args, **kwargs):
        calls.append(None)
        return flex_attention(*args, **kwargs)

    monkeypatch.setattr(paged_attention, "flex_kernel", lambda: kernel)
    return calls


@pytest.fixture
def greedy():
    """greedy(model, prompt (B, T), n): the engine's greedy continuation as (B, T + n), like Hugging Face's generate."""
    from mistura.infer.engine import generate
    from mistura.infer.sampling import Sampling

    def run(model, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        new = generate(model, prompt, Sampling(max_new_tokens=max_new_tokens, temperature=0))
        return torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)], dim=1)

    return run


def tiny_run(data_dir: Path, model: dict | None = None, **train) -> dict:
    """A seconds-long `mistura train` run on the prepared small corpus, as a config dict; callers give
    train's out_dir and override the model and train fields they exercise."""
    return {
        "model": {
            "preset": "llama-tiny",
            "n_layer": 2,
            "d_model": 32,
            "n_head": 4,
            "n_kv_head": 2,
            "d_ff": 64,
            "max_seq_len": 32,
            **(model or {}),
        },
        "data": {"source": "unused", "dir": str(data_dir), "vocab_size": 384},
        "train": {
            "batch_size": 4,
            "max_steps": 12,
            "warmup_steps": 2,
            "eval_interval": 6,
            "eval_batches": 2,
            "log_interval": 1,
            "checkpoint_interval": 6,
            "keep_checkpoints": 2,
            **train,
        },
    }
