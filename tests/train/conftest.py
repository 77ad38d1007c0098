import pytest


@pytest.fixture
def run_dict(prepared, tmp_path):
    """A seconds-long run on the small corpus; tests override what they exercise."""

    def make(model=None, **train):
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
            "data": {"source": "unused", "dir": str(prepared), "vocab_size": 384},
            "train": {
                "out_dir": str(tmp_path / "run"),
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

    return make
