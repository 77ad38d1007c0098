"""Fine-tuning data: JSONL files of conversations, read and checked line by line.

Each line is a JSON object in one of two formats:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}     one exchange: the user's prompt, the assistant's reply

Roles are system (the first message only), user and assistant; every content is a
non-empty string; a conversation holds at least one assistant message, since only the
assistant's tokens are learnt. Other keys (an id, metadata) are ignored, and so are blank
lines. Any problem is a DataError naming the file and the line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistura.chat_template import Message
from mistura.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """The messages of one line of a data file, and where it came from ("FILE, line N")."""

    messages: tuple[Message, ...]
    where: str


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a JSONL file, in file order."""
    conversations = [Conversation(parse_line(line, where), where) for where, line in jsonl_lines(path, "data")]
    if not conversations:
        raise DataError(f"{path} holds no examples: expected one JSON object per line")
    return conversations


def jsonl_lines(path: str | Path, what: str) -> list[tuple[str, str]]:
    """The non-blank lines of a UTF-8 file, each with where it is ("FILE, line N"); `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from err
    return [(f"{path}, line {number}", line) for number, line in enumerate(lines, 1) if line.strip()]


def parse_line(line: str, where: str) -> tuple[Message, ...]:
    """The checked messages of one JSONL line, in either format."""
    record = json_object(line, where)
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise DataError(f"{where}: give either 'messages' or 'prompt' and 'completion', not both")
        return check_messages(record["messages"], where)
    if "prompt" in record or "completion" in record:
        return check_messages(exchange(record, where), where)
    raise DataError(f"{where}: expected a 'messages' list or 'prompt' and 'completion' strings")


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line as the JSON object it must hold."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def exchange(record: dict[str, Any], where: str) -> list[Message]:
    """A prompt/completion record as the messages it stands for: the user's prompt, the assistant's completion."""
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: '{key}' must be a string, got {record.get(key)!r}")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def check_messages(messages: Any, where: str) -> tuple[Message, ...]:
    """`messages` as a tuple of {"role", "content"}, once every rule of the module docstring holds."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    checked = tuple(_message(message, number, where) for number, message in enumerate(messages, 1))
    for number, message in enumerate(checked[1:], 2):
        if message["role"] == "system":
            raise DataError(f"{where}: message {number} is a system message; only the first message may be one")
    if not any(message["role"] == "assistant" for message in checked):
        raise DataError(f"{where}: no assistant message, so nothing to learn")
    return checked


def _message(message: Any, number: int, where: str) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {number} must be an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise DataError(f"{where}: message {number} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"{where}: message {number} ({role}) has no content (a non-empty string)")
    return {"role": role, "content": content}


def hold_out(
    conversations: list[Conversation], fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a seeded `fraction` of the conversations (at least one) held out, both in file order."""
    if not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {fraction}")
    if len(conversations) < 2:
        raise DataError("a single example cannot be split: give a validation file too (--val, data.val)")
    count = min(len(conversations) - 1, max(1, round(fraction * len(conversations))))
    held = set(random.Random(seed).sample(range(len(conversations)), count))
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]
