"""Preference data: JSONL files of (prompt, chosen, rejected) triples, read and checked line by line.

Each line is a JSON object

    {"prompt": "...", "chosen": "...", "rejected": "..."}

the user's prompt and two replies, the preferred one first: what a reward model (Bradley-Terry)
and DPO learn from, in TRL's "prompt-chosen-rejected" format. Every field is a non-empty string
and the replies differ (a pair of equal replies prefers nothing). Other keys are ignored, and
so are blank lines. A pair becomes two conversations, [user prompt, assistant chosen] and
[user prompt, assistant rejected], which mistura.tune.encode labels on the reply's tokens.
Any problem is a DataError naming the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mistura.errors import DataError
from mistura.tune.data import Conversation, exchange, json_object, jsonl_lines
from mistura.tune.encode import Encoder, Example

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    """One line of a preference file: the prompt, the preferred and the dispreferred reply, and where it came from."""

    prompt: str
    chosen: str
    rejected: str
    where: str

    def conversations(self) -> tuple[Conversation, Conversation]:
        """The two conversations the pair compares: (prompt, chosen) and (prompt, rejected)."""
        return tuple(
            Conversation(tuple(exchange({"prompt": self.prompt, "completion": reply}, self.where)), self.where)
            for reply in (self.chosen, self.rejected)
        )


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file, in file order."""
    pairs = [parse_pair(line, where) for where, line in jsonl_lines(path, "preference")]
    if not pairs:
        raise DataError(f"{path} holds no pairs: expected one JSON object per line with {', '.join(FIELDS)}")
    return pairs


def parse_pair(line: str, where: str) -> Pair:
    """The checked pair of one JSONL line."""
    record = json_object(line, where)
    for key in FIELDS:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply, so the pair prefers nothing")
    return Pair(record["prompt"], record["chosen"], record["rejected"], where)


def encode_pair(encoder: Encoder, pair: Pair) -> tuple[Example, Example]:
    """The chosen and the rejected conversation as Examples, each labelled on its reply's tokens."""
    chosen, rejected = pair.conversations()
    return encoder.encode(chosen), encoder.encode(rejected)
