import json
import random
from collections import Counter

import pytest

from mistura.cli import main
from mistura.errors import ConfigError, DataError
from mistura.tune import tasks
from mistura.tune.data import read_conversations
from mistura.tune.pairs import read_pairs
from mistura.tune.tasks import (
    CONTINUE,
    PASSAGE_WORDS,
    PASSAGES,
    PROMPT_WORDS,
    QUESTION,
    REPLY_WORDS,
    TEST_SHARE,
    WORKS,
    build_task,
    passage_words,
    scramble,
    write_task,
)


def passage_of(record) -> str:
    return record["messages"][0]["content"]


def test_the_task_is_deterministic_and_no_passage_is_in_both_halves(corpus):
    train, test = build_task(corpus, seed=5)
    assert (train, test) == build_task(corpus, seed=5)
    assert build_task(corpus, seed=6) != (train, test)
    assert {passage_of(r) for r in train}.isdisjoint(passage_of(r) for r in test)
    assert len({passage_of(r) for r in train + test}) == len(train + test) == PASSAGES * len(WORKS)
    held = round(TEST_SHARE * PASSAGES)
    assert Counter(r["work"] for r in test) == dict.fromkeys(WORKS, held)
    assert Counter(r["messages"][1]["content"] for r in train) == dict.fromkeys(WORKS.values(), PASSAGES - held)
    first = test[0]["messages"][0]["content"]
    assert first.startswith(f"{QUESTION} «") and len(first[len(QUESTION) + 2 : -1].split()) == PASSAGE_WORDS


def test_passages_are_evenly_spaced_and_do_not_overlap():
    text = " ".join(f"w{i}" for i in range(100))
    assert passage_words(text, 3, 10) == [
        [f"w{i}" for i in range(0, 10)],
        [f"w{i}" for i in range(45, 55)],
        [f"w{i}" for i in range(90, 100)],
    ]
    with pytest.raises(DataError, match="cannot give 11 passages of 10 words"):
        passage_words(text, 11, 10)


def test_write_task_writes_both_halves_as_fine_tuning_data_into_a_new_folder(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "load_machado", lambda: corpus)
    counts = write_task("machado-obras", tmp_path / "obras")
    held = round(TEST_SHARE * PASSAGES) * len(WORKS)
    assert counts == {"train": len(WORKS) * PASSAGES - held, "test": held}
    assert len(read_conversations(tmp_path / "obras" / "test.jsonl")) == counts["test"]
    with pytest.raises(ConfigError, match="already exists"):
        write_task("machado-obras", tmp_path / "obras")
    with pytest.raises(ConfigError, match="unknown task 'machado-autores'"):
        write_task("machado-autores", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obras"]


def test_the_pairs_continue_their_passage_and_prefer_it_to_its_words_shuffled(corpus):
    train, test = build_task(corpus, seed=5, name="machado-pares")
    assert (train, test) == build_task(corpus, seed=5, name="machado-pares")
    assert build_task(corpus, seed=6, name="machado-pares") != (train, test)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    assert len({r["prompt"] for r in train + test}) == len(train + test) == PASSAGES * len(WORKS)
    held = round(TEST_SHARE * PASSAGES)
    assert Counter(r["work"] for r in test) == dict.fromkeys(WORKS, held)
    assert Counter(r["work"] for r in train) == dict.fromkeys(WORKS, PASSAGES - held)
    texts = {doc.name: " ".join(doc.text.split()) for doc in corpus}
    for record in train + test:
        assert record["prompt"].startswith(f"{CONTINUE} «") and record["prompt"].endswith("»")
        head = record["prompt"][len(CONTINUE) + 2 : -1]
        assert len(head.split()) == PROMPT_WORDS and len(record["chosen"].split()) == REPLY_WORDS
        assert record["chosen"] != record["rejected"]
        assert sorted(record["chosen"].split()) == sorted(record["rejected"].split())
    for record in test:  # the chosen reply is where the text goes
        assert f"{record['prompt'][len(CONTINUE) + 2 : -1]} {record['chosen']}" in texts[record["work"]]


def test_scramble_always_changes_the_order_of_the_words():
    assert {tuple(scramble(["a", "b"], random.Random(seed))) for seed in range(20)} == {("b", "a")}
    for seed in range(20):
        assert scramble(["a", "a", "b"], random.Random(seed)) != ["a", "a", "b"]
    with pytest.raises(DataError, match="no order of the words 'x x' differs"):
        scramble(["x", "x"], random.Random(0))


def test_write_task_writes_the_pairs_as_preference_data(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "load_machado", lambda: corpus)
    counts = write_task("machado-pares", tmp_path / "pares", seed=7)
    held = round(TEST_SHARE * PASSAGES) * len(WORKS)
    assert counts == {"train": len(WORKS) * PASSAGES - held, "test": held}
    for half, count in counts.items():
        read = read_pairs(tmp_path / "pares" / f"{half}.jsonl")
        assert len(read) == count and all(p.chosen != p.rejected for p in read)
    train, test = build_task(corpus, seed=7, name="machado-pares")
    assert [json.loads(line) for line in (tmp_path / "pares" / "test.jsonl").read_text("utf-8").splitlines()] == test
    with pytest.raises(ConfigError, match="unknown task 'machado-x'; known: machado-obras, machado-pares"):
        write_task("machado-x", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pares"]


def test_finetune_data_writes_the_pairs(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tasks, "load_machado", lambda: corpus)
    monkeypatch.chdir(tmp_path)
    assert main(["finetune-data", "machado-pares"]) == 0
    assert "800 training and 200 held-out examples written to data/machado-pares" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data" / "machado-pares").iterdir()) == ["test.jsonl", "train.jsonl"]
    assert main(["finetune-data", "machado-pares", "elsewhere", "--seed", "3"]) == 0
    assert len(read_pairs(tmp_path / "elsewhere" / "train.jsonl")) == 800
