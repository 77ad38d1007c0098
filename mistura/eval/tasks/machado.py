"""`machado_cloze`, an lm-evaluation-harness task built offline from the embedded corpus.

Which of four words comes next in a passage of Machado de Assis? A question is the opening of
a paragraph cut before a word; the answer is that word, and the three distractors are words of
the same frequency band (how often they occur, in powers of two), so that knowing which words
are common does not give the answer away: only reading the passage does. Every question comes
from the works that `mistura data prepare` holds out for validation (the default split: 10 %,
seed 1337), so a model trained on the default data has never read them. Chance is 25 %.

The harness calls `load` (the YAML's `custom_dataset`); the questions are drawn with a fixed
seed, so every run scores the same ones.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter

from mistura.data.corpus import Document, load_machado, split_documents

QUESTIONS = 400
SEED = 1337
MIN_PARAGRAPH = 200  # characters
GAP_AT = (80, 400)  # where in the paragraph the missing word may start, in characters
MIN_COUNT = 3  # an answer or a distractor occurs at least this often in the held-out works
TOP_BAND = 7  # words seen 2**7 = 128 times or more share one band
WORD = re.compile(r"(?<![\w-])[a-zà-ÿ]{4,}(?![\w-])")  # lower-case words: no names, no short function words


def load(questions: int = QUESTIONS, seed: int = SEED, **_metadata) -> dict:
    """The task's one split, "test": a `datasets.Dataset` of {obra, contexto, opcoes, resposta}."""
    import datasets

    return {"test": datasets.Dataset.from_list(make_questions(questions, seed))}


def make_questions(questions: int = QUESTIONS, seed: int = SEED) -> list[dict]:
    """Up to `questions` questions, one per sampled paragraph of the held-out works."""
    held_out = held_out_works()
    counts = Counter(word for doc in held_out for word in WORD.findall(doc.text))
    bands: dict[int, list[str]] = {}
    for word in sorted(word for word, count in counts.items() if count >= MIN_COUNT):
        bands.setdefault(band(counts[word]), []).append(word)
    paragraphs = [(doc.name, p) for doc in held_out for p in doc.text.split("\n") if len(p) >= MIN_PARAGRAPH]
    rng = random.Random(seed)
    found = []
    for work, paragraph in rng.sample(paragraphs, len(paragraphs)):
        gaps = [m for m in WORD.finditer(paragraph, *GAP_AT) if counts[m.group()] >= MIN_COUNT]
        if gaps:
            gap = rng.choice(gaps)
            found.append(question(work, paragraph[: gap.start()].rstrip(), gap.group(), bands, counts, rng))
        if len(found) == questions:
            break
    return found


@functools.cache
def held_out_works() -> list[Document]:
    """The default split's validation works, read once per process (the harness builds the task anew for every
    model a comparison scores, and the corpus takes seconds to decompress)."""
    return split_documents(load_machado())[1]


def band(count: int) -> int:
    return min(TOP_BAND, int(math.log2(count)))


def question(
    work: str, context: str, answer: str, bands: dict[int, list[str]], counts: Counter, rng: random.Random
) -> dict:
    """The answer among three other words of its frequency band, in a random order."""
    options = rng.sample([word for word in bands[band(counts[answer])] if word != answer], 3) + [answer]
    rng.shuffle(options)
    return {"obra": work, "contexto": context, "opcoes": options, "resposta": options.index(answer)}
