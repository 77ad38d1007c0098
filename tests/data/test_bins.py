import json

import numpy as np
import pytest
import torch

from mistura.data import BatchLoader, open_tokens, token_dtype, write_tokens
from mistura.errors import CheckpointError, DataError


@pytest.mark.parametrize(("vocab_size", "dtype"), [(8192, "uint16"), (65536, "uint16"), (65537, "uint32")])
def test_write_and_open_round_trip(tmp_path, vocab_size, dtype):
    ids = [0, 1, 2, vocab_size - 1, 7, 7]
    path = tmp_path / "train.bin"
    assert write_tokens(ids, path, vocab_size) == dtype == token_dtype(vocab_size).name
    assert path.stat().st_size == len(ids) * np.dtype(dtype).itemsize
    tokens = open_tokens(path, dtype)
    assert tokens.tolist() == ids
    with pytest.raises(ValueError):
        tokens[0] = 5
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]


def test_write_refuses_ids_that_would_wrap(tmp_path):
    with pytest.raises(DataError, match=r"\[0, 8192\)"):
        write_tokens([1, 8192], tmp_path / "train.bin", 8192)
    with pytest.raises(DataError, match="no tokens"):
        write_tokens([], tmp_path / "train.bin", 8192)
    assert not list(tmp_path.iterdir())


def test_open_refuses_missing_empty_and_truncated_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_tokens(tmp_path / "val.bin", "uint16")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        open_tokens(tmp_path / "empty.bin", "uint16")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="not a whole number of uint16"):
        open_tokens(tmp_path / "odd.bin", "uint16")


@pytest.fixture
def counting_tokens(tmp_path):
    """Token i is i, so a window's values tell where it came from."""
    write_tokens(np.arange(5000), tmp_path / "train.bin", 5000)
    return open_tokens(tmp_path / "train.bin", "uint16")


def test_batches_are_shifted_windows(counting_tokens):
    x, y = BatchLoader(counting_tokens, batch_size=8, block_size=16, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows
    assert torch.equal(y, x + 1)  # y is x moved one token on


def test_offsets_reach_both_ends_of_the_file(tmp_path):
    write_tokens(np.arange(10), tmp_path / "tiny.bin", 100)
    loader = BatchLoader(open_tokens(tmp_path / "tiny.bin", "uint16"), batch_size=64, block_size=4, seed=3)
    starts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(4)])
    assert starts.min().item() == 0
    assert starts.max().item() == 10 - 4 - 1  # the last y token is the file's last token


def test_same_seed_same_batches(counting_tokens):
    first, second = (BatchLoader(counting_tokens, 4, 32, seed=1337) for _ in range(2))
    batches = [first.next_batch() for _ in range(3)]
    for x, _ in batches:
        assert torch.equal(x, second.next_batch()[0])
    assert not torch.equal(batches[0][0], batches[1][0])
    other = BatchLoader(counting_tokens, 4, 32, seed=1338)
    assert not torch.equal(other.next_batch()[0], BatchLoader(counting_tokens, 4, 32, seed=1337).next_batch()[0])


def test_resume_continues_the_same_sequence(counting_tokens):
    loader = BatchLoader(counting_tokens, 4, 32, seed=5)
    for _ in range(3):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    assert state == {"seed": 5, "batches_drawn": 3}
    expected = [loader.next_batch() for _ in range(2)]
    resumed = BatchLoader(counting_tokens, 4, 32, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch() for _ in range(2)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(CheckpointError, match="batches_drawn"):
        resumed.load_state_dict({"seed": 5})


def test_a_file_shorter_than_one_window_is_refused(tmp_path):
    write_tokens(np.arange(16), tmp_path / "short.bin", 100)
    tokens = open_tokens(tmp_path / "short.bin", "uint16")
    with pytest.raises(DataError, match="16 tokens, too few for one window of block_size \\+ 1 = 17"):
        BatchLoader(tokens, batch_size=2, block_size=16, seed=0)
    x, y = BatchLoader(tokens, batch_size=2, block_size=15, seed=0).next_batch()
    assert x[0].tolist() == list(range(15)) and y[0].tolist() == list(range(1, 16))
