import pytest

import mistura
from mistura.errors import DataError
from mistura.train.loop import IGNORE
from mistura.tune.encode import Encoder
from mistura.tune.pairs import encode_pair, read_pairs
from mistura.tune.template import tuning_template

PAIR = {"prompt": "Quem tinha olhos de cigana?", "chosen": "Capitu", "rejected": "Quincas Borba", "id": 7}


def test_a_pair_reads_as_two_conversations_labelled_on_their_replies(base, jsonl):
    [pair] = read_pairs(jsonl("pairs.jsonl", ["", PAIR]))
    assert (pair.prompt, pair.chosen, pair.rejected) == (PAIR["prompt"], "Capitu", "Quincas Borba")
    assert pair.where.endswith("pairs.jsonl, line 2")
    encoder = Encoder(mistura.load_tokenizer(base), tuning_template(base), 64)
    chosen, rejected = encode_pair(encoder, pair)
    tokenizer = mistura.load_tokenizer(base)
    for example, reply in ((chosen, "Capitu"), (rejected, "Quincas Borba")):
        learnt = [label for label in example.labels if label != IGNORE]
        assert tokenizer.decode(learnt, skip_special_tokens=True).strip() == reply
    prompt_ids = chosen.ids[: chosen.labels.index(next(x for x in chosen.labels if x != IGNORE))]
    assert rejected.ids[: len(prompt_ids)] == prompt_ids  # the same prompt before either reply


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ({"prompt": "a", "chosen": "b"}, "line 2: 'rejected' must be a non-empty string, got None"),
        ({"prompt": " ", "chosen": "b", "rejected": "c"}, "line 2: 'prompt' must be a non-empty string"),
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, "line 2: 'chosen' must be a non-empty string, got 3"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "line 2: 'chosen' and 'rejected' are the same reply"),
    ],
)
def test_a_bad_line_is_named(jsonl, line, message):
    with pytest.raises(DataError, match=message):
        read_pairs(jsonl("pairs.jsonl", [PAIR, line]))


def test_a_missing_empty_or_binary_file_is_a_clear_error(tmp_path, jsonl):
    with pytest.raises(DataError, match="preference file not found"):
        read_pairs(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="holds no pairs"):
        read_pairs(jsonl("empty.jsonl", ["", "  "]))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match="not UTF-8"):
        read_pairs(binary)


def test_a_pair_too_long_for_the_context_is_refused(base, jsonl):
    [pair] = read_pairs(jsonl("pairs.jsonl", [PAIR | {"chosen": "Capitu " * 80}]))
    encoder = Encoder(mistura.load_tokenizer(base), tuning_template(base), 64)
    with pytest.raises(DataError, match="line 1: the formatted conversation takes .* more than the model's context"):
        encode_pair(encoder, pair)
