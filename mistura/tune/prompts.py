"""RL prompts: JSONL files of prompts to sample replies to, read and checked line by line.

Each line is a JSON object with a "prompt", a non-empty string, the user's message:

    {"prompt": "Continue o trecho: «...»", "work": "romance/domCasmurro"}

Its other keys are columns handed to the reward with the replies, as TRL hands a dataset's
columns to its reward functions (a reference answer, say): a key missing from a line is None
there. A file of preference pairs ({"prompt", "chosen", "rejected"}) is a prompt file too, and
so is a file of conversations (mistura.tune.data's {"messages": [...]}, SFT's format) whose last
message is the assistant's: the conversation before it is the prompt, and its content the column
"answer", the reference a verifiable reward (exact:answer) checks a reply against. A line's
"completion" (SFT's other format) is its "answer" too.
Blank lines are ignored; any problem is a DataError naming the file and the line.

A prompt is formatted by the chat template, ending where the assistant's reply starts, and must
leave room in the model's context for the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistura.chat_template import Message
from mistura.errors import DataError
from mistura.tune.data import check_messages, json_object, jsonl_lines
from mistura.tune.encode import Encoder


@dataclass(frozen=True)
class Prompt:
    messages: tuple[Message, ...]  # the conversation the model replies to, ending with the user's message
    where: str  # "FILE, line N"
    columns: dict[str, Any] = field(default_factory=dict)  # the line's other keys
    ids: tuple[int, ...] = ()  # the messages formatted for the model (see encode_prompts)

    @property
    def text(self) -> str:
        """The user's last message: the prompt a reward reads."""
        return self.messages[-1]["content"]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a JSONL file, in file order."""
    prompts = [parse_prompt(json_object(line, where), where) for where, line in jsonl_lines(path, "prompt")]
    if not prompts:
        raise DataError(f"{path} holds no prompts: expected one JSON object per line with a 'prompt'")
    return prompts


def parse_prompt(record: dict[str, Any], where: str) -> Prompt:
    """The prompt of one line: a "prompt" string, or a conversation ending with the assistant's answer."""
    if "messages" in record and "prompt" not in record:
        messages = check_messages(record.pop("messages"), where)
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
            raise DataError(f"{where}: a conversation used as a prompt must end with a user message and its answer")
        record.setdefault("answer", messages[-1]["content"])
        return Prompt(messages[:-1], where, record)
    text = record.pop("prompt", None)
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: 'prompt' must be a non-empty string, got {text!r}")
    if isinstance(record.get("completion"), str):  # SFT's prompt/completion line: the completion is the answer
        record.setdefault("answer", record["completion"])
    return Prompt(({"role": "user", "content": text},), where, record)


def encode_prompts(prompts: Sequence[Prompt], encoder: Encoder, reply_tokens: int) -> list[Prompt]:
    """The prompts with their ids: the user's message and the cue of the assistant's reply, which must leave
    `reply_tokens` of the encoder's context free."""
    encoded = []
    for prompt in prompts:
        ids = encoder.tokens(list(prompt.messages), True, prompt.where)
        if len(ids) + reply_tokens > encoder.context:
            raise DataError(
                f"{prompt.where}: the formatted prompt takes {len(ids)} tokens; with {reply_tokens} for the reply "
                f"(rl.max_new_tokens) that is more than the model's context of {encoder.context}: shorten it"
            )
        encoded.append(Prompt(prompt.messages, prompt.where, prompt.columns, tuple(ids)))
    return encoded


def columns(prompts: Sequence[Prompt]) -> dict[str, list[Any]]:
    """The prompts' columns as lists, one value per prompt (None where a line lacks the key)."""
    keys = dict.fromkeys(key for prompt in prompts for key in prompt.columns)
    return {key: [prompt.columns.get(key) for prompt in prompts] for key in keys}
