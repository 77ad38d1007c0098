"""Small Portuguese post-training task sets made from the embedded Machado de Assis corpus.

Both tasks cut passages from five works of the corpus (WORKS: three novels, two of his
translations), PASSAGES per work, evenly spaced through it and never overlapping. Each
work's passages are shuffled with the seed and TEST_SHARE of them held out, so both halves
hold every work in the same proportion and no passage is in both. `write_task` writes
train.jsonl and test.jsonl (the held-out half) into a new folder, whole or not at all. Every
line carries the work's corpus name as "work", which training ignores.

`machado-obras` (fine-tuning conversations) asks, of a passage of PASSAGE_WORDS words, which
work it comes from; the answer is the work's title (score it with mistura.tune.evaluate):

    {"messages": [{"role": "user", "content": "De que obra é este trecho? «... Capitu ...»"},
                  {"role": "assistant", "content": "Dom Casmurro"}], "work": "romance/domCasmurro"}

`machado-pares` (preference pairs, as mistura.tune.pairs reads them, for a reward model or
DPO; an RL run can take their prompts) asks to continue the first PROMPT_WORDS words of a
passage; the chosen reply is the text's next REPLY_WORDS words, the rejected one the same
words in a seeded shuffled order that always differs from the text's, a preference for fluent
Portuguese over word salad:

    {"prompt": "Continue o trecho: «... 20 words ...»", "chosen": "the next 12 words",
     "rejected": "12 the words next", "work": "romance/domCasmurro"}
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mistura.atomic import atomic_directory
from mistura.data.corpus import Document, load_machado
from mistura.errors import ConfigError, DataError

WORKS = {
    "romance/domCasmurro": "Dom Casmurro",
    "romance/memoriasBras": "Memórias Póstumas de Brás Cubas",
    "romance/quincas": "Quincas Borba",
    "traducao/oliverTwist": "Oliver Twist",
    "traducao/trabalhadoresMar": "Os Trabalhadores do Mar",
}
QUESTION = "De que obra é este trecho?"  # machado-obras
CONTINUE = "Continue o trecho:"  # machado-pares
PASSAGES = 200  # per work, in each task
PASSAGE_WORDS = 28  # machado-obras
PROMPT_WORDS = 20  # machado-pares: the words to continue ...
REPLY_WORDS = 12  # ... and the words that continue them
TEST_SHARE = 0.2
SEED = 1337
_WORD = re.compile(r"\S+")

Record = dict[str, Any]
# A task's record from a passage's words, the work it comes from and the task's random generator.
Maker = Callable[[list[str], str, random.Random], Record]


def passage_words(text: str, count: int, words: int) -> list[list[str]]:
    """`count` runs of `words` consecutive words of `text`, evenly spaced from its start to its end."""
    tokens = _WORD.findall(text)
    if len(tokens) < count * words:
        raise DataError(f"a text of {len(tokens)} words cannot give {count} passages of {words} words")
    step = (len(tokens) - words) / max(count - 1, 1)
    starts = [round(i * step) for i in range(count)]
    return [tokens[start : start + words] for start in starts]


def example(passage: str, work: str) -> Record:
    """One conversation of machado-obras, with the work's corpus name beside it (ignored by fine-tuning)."""
    return {
        "messages": [
            {"role": "user", "content": f"{QUESTION} «{passage}»"},
            {"role": "assistant", "content": WORKS[work]},
        ],
        "work": work,
    }


def scramble(words: list[str], rng: random.Random) -> list[str]:
    """`words` in a shuffled order that differs from theirs (rotated when the shuffle gives them back)."""
    shuffled = list(words)
    rng.shuffle(shuffled)
    for turn in range(len(shuffled)):
        order = shuffled[turn:] + shuffled[:turn]
        if order != words:
            return order
    raise DataError(f"no order of the words {' '.join(words)!r} differs from theirs, so no pair can be made")


def pair(words: list[str], work: str, rng: random.Random) -> Record:
    """One preference pair of machado-pares: a passage's first PROMPT_WORDS words to continue, its next
    REPLY_WORDS words chosen over the same words shuffled, with the work's corpus name beside it."""
    head, reply = words[:PROMPT_WORDS], words[PROMPT_WORDS : PROMPT_WORDS + REPLY_WORDS]
    return {
        "prompt": f"{CONTINUE} «{' '.join(head)}»",
        "chosen": " ".join(reply),
        "rejected": " ".join(scramble(reply, rng)),
        "work": work,
    }


# Each task: how many words its passages hold, and the record it makes of one.
_TASKS: dict[str, tuple[int, Maker]] = {
    "machado-obras": (PASSAGE_WORDS, lambda words, work, rng: example(" ".join(words), work)),
    "machado-pares": (PROMPT_WORDS + REPLY_WORDS, pair),
}
TASKS = tuple(_TASKS)


def _known(name: str) -> None:
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")


def build_task(documents: list[Document], seed: int = SEED, name: str = "machado-obras") -> tuple[list, list]:
    """(train, test) records of task `name` from the corpus's documents, each half shuffled with `seed`."""
    _known(name)
    words, make = _TASKS[name]
    texts = {doc.name: doc.text for doc in documents}
    missing = [work for work in WORKS if work not in texts]
    if missing:
        raise DataError(f"the corpus lacks the work(s) {', '.join(missing)} that {name} is made from")
    rng = random.Random(seed)
    train, test = [], []
    for work in WORKS:
        runs = passage_words(texts[work], PASSAGES, words)
        rng.shuffle(runs)
        held = round(TEST_SHARE * len(runs))
        test += [make(run, work, rng) for run in runs[:held]]
        train += [make(run, work, rng) for run in runs[held:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _new_folder(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} already exists and is not an empty folder: choose another")


def write_jsonl_folder(out_dir: str | Path, files: dict[str, list[Record]]) -> dict[str, int]:
    """Write each list of records as FILE.jsonl, one JSON object a line, into the new (or empty) folder
    `out_dir`, whole or not at all; returns the number of records of each file."""
    out_dir = Path(out_dir)
    _new_folder(out_dir)
    with atomic_directory(out_dir) as tmp:
        for stem, records in files.items():
            lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            (tmp / f"{stem}.jsonl").write_text("".join(lines), encoding="utf-8")
    return {stem: len(records) for stem, records in files.items()}


def write_task(name: str, out_dir: str | Path, seed: int = SEED) -> dict[str, int]:
    """Write task `name`'s train.jsonl and test.jsonl into the new (or empty) folder `out_dir`; returns the counts."""
    _known(name)
    _new_folder(Path(out_dir))  # before reading the corpus
    train, test = build_task(load_machado(), seed, name)
    return write_jsonl_folder(out_dir, {"train": train, "test": test})
