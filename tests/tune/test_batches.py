import pytest
import torch

from mistura.data.tokenizer import PAD_ID
from mistura.errors import CheckpointError
from mistura.train.loop import IGNORE
from mistura.tune.batches import ExampleBatches, PairBatches, collate, collate_pairs, fixed_batches
from mistura.tune.encode import Example

N = IGNORE  # a label not learnt


def example(ids, learnt_from):
    """ids with the labels of positions from `learnt_from` on."""
    return Example(tuple(ids), tuple(i if n >= learnt_from else N for n, i in enumerate(ids)), "test")


def test_batches_are_right_padded_and_padding_is_never_learnt():
    x, y = collate([example([1, 5, 6, 7, 2], 3), example([1, 8, 2], 1)])
    assert x.tolist() == [[1, 5, 6, 7], [1, 8, PAD_ID, PAD_ID]]
    assert y.tolist() == [[N, N, 7, 2], [8, 2, N, N]]


def test_the_stream_visits_every_example_once_an_epoch_in_a_seeded_order():
    examples = [example([1, 10 + n, 2], 1) for n in range(5)]
    batches = ExampleBatches(examples, batch_size=2, seed=7)
    drawn = [row[1] for _ in range(5) for row in batches.next_batch()[0].tolist()]  # 10 = two epochs
    assert sorted(drawn[:5]) == sorted(drawn[5:]) == [10, 11, 12, 13, 14]
    assert drawn[:5] != drawn[5:]  # each epoch its own order
    again = ExampleBatches(examples, batch_size=2, seed=7)
    assert [row[1] for _ in range(5) for row in again.next_batch()[0].tolist()] == drawn
    assert batches.tokens_drawn == 10 * 2  # two input tokens an example


def test_a_restored_state_draws_the_batches_that_followed():
    examples = [example([1, *range(10, 10 + n), 2], 1) for n in range(1, 8)]
    batches = ExampleBatches(examples, batch_size=3, seed=1)
    for _ in range(4):
        batches.next_batch()
    state, tokens, following = batches.state_dict(), batches.tokens_drawn, [batches.next_batch() for _ in range(3)]
    resumed = ExampleBatches(examples, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert resumed.tokens_drawn == tokens
    for (x, y), (rx, ry) in zip(following, [resumed.next_batch() for _ in range(3)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(CheckpointError, match="batches_drawn"):
        resumed.load_state_dict({"seed": 1})


def test_tokens_drawn_counts_the_input_tokens_without_padding():
    examples = [example([1, *range(10, 10 + n), 2], 1) for n in range(1, 8)]
    batches = ExampleBatches(examples, batch_size=3, seed=2)
    counted = 0
    for _ in range(6):  # 18 examples: two epochs and a half
        x, _ = batches.next_batch()
        counted += int((x != PAD_ID).sum())
        assert batches.tokens_drawn == counted


def test_validation_batches_are_the_first_examples_in_order():
    examples = [example([1, 10 + n, 2], 1) for n in range(5)]
    batches = list(fixed_batches(examples, batch_size=2, limit=2, device="cpu"))
    assert [x[:, 1].tolist() for x, _ in batches] == [[10, 11], [12, 13]]
    assert len(list(fixed_batches(examples, batch_size=2, limit=20, device="cpu"))) == 3


def test_unshifted_batches_keep_each_example_whole_with_its_labels_in_place():
    x, y = collate([example([1, 5, 6, 7, 2], 3), example([1, 8, 2], 1)], shift=False)
    assert x.tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, PAD_ID, PAD_ID]]
    assert y.tolist() == [[N, N, N, 7, 2], [N, 8, 2, N, N]]


def test_a_pair_batch_is_its_chosen_rows_then_its_rejected_rows():
    a, b = example([1, 5, 6, 7, 2], 3), example([1, 8, 2], 1)
    x, y = collate_pairs([(a, b), (b, a)])
    assert torch.equal(x, collate([a, b, b, a])[0]) and torch.equal(y, collate([a, b, b, a])[1])
    batches = PairBatches([(a, b)], batch_size=1, seed=0)
    assert batches.next_batch()[0].shape[0] == 2 and batches.tokens_drawn == 4 + 2
