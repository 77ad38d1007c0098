from pathlib import Path

import pytest

from mistura.data.corpus import load_machado
from mistura.data.prepare import prepare


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
def run_dict(prepared, tmp_path):
    """A seconds-long run on the small corpus; tests override what they exercise."""

    def make(model=None, **train):
        return {
            "model": {"preset": "llama-tiny", "n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2,
                      "d_ff": 64, "max_seq_len": 32, **(model or {})},
            "data": {"source": "unused", "dir": str(prepared), "vocab_size": 384},
            "train": {"out_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 12, "warmup_steps": 2,
                      "eval_interval": 6, "eval_batches": 2, "log_interval": 1, "checkpoint_interval": 6,
                      "keep_checkpoints": 2, **train},
        }

    return make
