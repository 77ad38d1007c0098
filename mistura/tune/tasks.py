"""A small Portuguese fine-tuning task made from the embedded corpus: which work a passage comes from.

`machado-obras` asks, of a passage of PASSAGE_WORDS words, which of five works of the
embedded Machado de Assis corpus (WORKS: three novels, two of his translations) it comes
from; the answer is the work's title:

    {"messages": [{"role": "user", "content": "De que obra é este trecho? «... Capitu ...»"},
                  {"role": "assistant", "content": "Dom Casmurro"}], "work": "romance/domCasmurro"}

Each work gives PASSAGES passages, evenly spaced through it and never overlapping. Each
work's passages are shuffled with the seed and TEST_SHARE of them held out, so both
halves hold every work in the same proportion and no passage is in both. `write_task`
writes train.jsonl and test.jsonl (the held-out examples, to score with
mistura.tune.evaluate) into a new folder, whole or not at all.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from mistura.atomic import atomic_directory
from mistura.data.corpus import Document, load_machado
from mistura.errors import ConfigError, DataError

TASKS = ("machado-obras",)
WORKS = {
    "romance/domCasmurro": "Dom Casmurro",
    "romance/memoriasBras": "Memórias Póstumas de Brás Cubas",
    "romance/quincas": "Quincas Borba",
    "traducao/oliverTwist": "Oliver Twist",
    "traducao/trabalhadoresMar": "Os Trabalhadores do Mar",
}
QUESTION = "De que obra é este trecho?"
PASSAGES = 200  # per work
PASSAGE_WORDS = 28
TEST_SHARE = 0.2
SEED = 1337
_WORD = re.compile(r"\S+")


def passages(text: str, count: int, words: int) -> list[str]:
    """`count` passages of `words` consecutive words of `text`, evenly spaced from its start to its end,
    each on one line (the text's line breaks become spaces)."""
    tokens = _WORD.findall(text)
    if len(tokens) < count * words:
        raise DataError(f"a text of {len(tokens)} words cannot give {count} passages of {words} words")
    step = (len(tokens) - words) / max(count - 1, 1)
    starts = [round(i * step) for i in range(count)]
    return [" ".join(tokens[start : start + words]) for start in starts]


def example(passage: str, work: str) -> dict[str, Any]:
    """One conversation of the task, with the work's corpus name beside it (ignored by fine-tuning)."""
    return {
        "messages": [
            {"role": "user", "content": f"{QUESTION} «{passage}»"},
            {"role": "assistant", "content": WORKS[work]},
        ],
        "work": work,
    }


def build_task(documents: list[Document], seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, test) examples of machado-obras from the corpus's documents, each half shuffled with `seed`."""
    texts = {doc.name: doc.text for doc in documents}
    missing = [work for work in WORKS if work not in texts]
    if missing:
        raise DataError(f"the corpus lacks the work(s) {', '.join(missing)} that machado-obras asks about")
    rng = random.Random(seed)
    train, test = [], []
    for work in WORKS:
        chosen = passages(texts[work], PASSAGES, PASSAGE_WORDS)
        rng.shuffle(chosen)
        held = round(TEST_SHARE * len(chosen))
        test += [example(passage, work) for passage in chosen[:held]]
        train += [example(passage, work) for passage in chosen[held:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_task(name: str, out_dir: str | Path, seed: int = SEED) -> dict[str, int]:
    """Write task `name`'s train.jsonl and test.jsonl into the new (or empty) folder `out_dir`; returns the counts."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} already exists and is not an empty folder: choose another")
    halves = dict(zip(("train", "test"), build_task(load_machado(), seed)))
    with atomic_directory(out_dir) as tmp:
        for half, examples in halves.items():
            lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in examples)
            (tmp / f"{half}.jsonl").write_text("".join(lines), encoding="utf-8")
    return {half: len(examples) for half, examples in halves.items()}
