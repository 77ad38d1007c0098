import math

import pytest
import torch

from mistura.data.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
from mistura.errors import ConfigError
from mistura.tune.rlaif import YES, answer_token_ids, yes_probability


def test_yes_probability_sums_the_spellings():
    probs = [0.1, 0.2, 0.3, 0.1, 0.2, 0.1]  # yes = ids 1 and 2 (0.5), no = id 3 (0.1)
    logits = torch.tensor([[math.log(p) + 4.0 for p in probs]])  # any shift: the normaliser cancels
    assert yes_probability(logits, [1, 2], [3]).item() == pytest.approx(0.5 / 0.6)


def test_yes_probability_stays_in_bounds_and_grows_with_the_yes_logit():
    logits = torch.randn(8, 20, generator=torch.Generator().manual_seed(0)) * 3
    score = yes_probability(logits, [1, 2], [3, 4])
    assert ((score >= 0) & (score <= 1)).all()
    extreme = torch.zeros(2, 5)
    extreme[0, 1], extreme[1, 3] = 1e4, 1e4
    assert yes_probability(extreme, [1], [3]).tolist() == [1.0, 0.0]
    higher = logits.clone()
    higher[:, 1] += 1.0
    assert (yes_probability(higher, [1, 2], [3, 4]) > score).all()


def test_overlapping_or_empty_answers_are_refused():
    with pytest.raises(ConfigError, match="disjoint"):
        yes_probability(torch.zeros(1, 5), [1, 2], [2])
    with pytest.raises(ConfigError, match="non-empty"):
        yes_probability(torch.zeros(1, 5), [], [2])


def test_answer_token_ids_keep_the_single_token_spellings():
    tokenizer = train_tokenizer(["ele disse sim, não, Sim"] * 50, vocab_size=MIN_VOCAB_SIZE + 20)
    ids = answer_token_ids(tokenizer, YES)
    assert ids == [tokenizer.encode(" sim").ids[0], tokenizer.encode(" Sim").ids[0]]  # " yes" is several tokens
    with pytest.raises(ConfigError, match="single token"):
        answer_token_ids(tokenizer, [" yes", " Yes"])
