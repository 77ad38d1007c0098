from collections import Counter

import pytest

from mistura.errors import ConfigError, DataError
from mistura.tune import tasks
from mistura.tune.data import read_conversations
from mistura.tune.tasks import PASSAGE_WORDS, PASSAGES, QUESTION, TEST_SHARE, WORKS, build_task, passages, write_task


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
    assert passages(text, 3, 10) == [
        " ".join(f"w{i}" for i in range(0, 10)),
        " ".join(f"w{i}" for i in range(45, 55)),
        " ".join(f"w{i}" for i in range(90, 100)),
    ]
    with pytest.raises(DataError, match="cannot give 11 passages of 10 words"):
        passages(text, 11, 10)


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
