"""Text in, text out: prompts through a tokenizer and the engine, streamed, cut at stop strings, or written as JSONL."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mistura.atomic import atomic_write
from mistura.data.tokenizer import BOS_ID, EOS_ID
from mistura.errors import DataError
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.model import Transformer


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """BOS followed by the prompt's ids, as documents were encoded for training."""
    check_prompt(prompt)
    return [BOS_ID, *tokenizer.encode(prompt).ids]


def check_prompt(prompt: str) -> None:
    """A DataError for a prompt that cannot be continued: empty, or not valid UTF-8 text."""
    if not prompt.strip():
        raise DataError("the prompt is empty: give some text to continue")
    problem = not_utf8(prompt)
    if problem:
        raise DataError(f"the prompt is not valid UTF-8 text ({problem})")


def not_utf8(text: str) -> str | None:
    """Where `text` stops being valid Unicode, or None: the first of its lone surrogates.

    Python hands bytes that are not UTF-8 on in str as lone surrogates (U+DC80 to U+DCFF,
    "surrogateescape"): command-line arguments always, stdin under the C locale. No
    tokenizer encodes them, so a prompt holding one must be refused with this message.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"{what} at character {err.start + 1}"
    return None


class TextStream:
    """One row's new tokens as text, decoded incrementally and cut at the first stop string.

    Each token decodes only a short window (the tokens since the last printable
    boundary), so a step costs the same at token 10 and at token 1000. Byte-level BPE
    may split a UTF-8 character across tokens: text ending in U+FFFD waits for the next
    token. Text that could be the start of a stop string is held back until it is
    clear it is not one, so a stream never shows part of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded into text already
        self.text = ""  # decoded so far, stop string cut off
        self.shown = 0  # characters of text handed out by push
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd"):
            return ""
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        cut = min(
            (i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        else:
            end = len(self.text) - self._held_back()
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of text that begins a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)

    def finish(self) -> str:
        """The text still held back at the end of generation (a partial stop string that never completed)."""
        piece, self.shown = self.text[self.shown :], len(self.text)
        return piece


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str | list[int]],
    sampling: Sampling,
    on_text: Callable[[int, str], None] | None = None,
    eos_id: int | None = EOS_ID,
) -> list[str]:
    """The continuation of every prompt (without the prompt), in one batch.

    A str prompt is encoded after BOS (encode_prompt); a list of ids is taken as is (a
    chat template's output, say). A row ends at eos_id (a chat template's end of turn,
    say) or at a stop string of sampling.stop, which is cut off. `on_text(row, piece)`
    receives each row's text as it becomes final.
    """
    rows = [encode_prompt(tokenizer, p) if isinstance(p, str) else p for p in prompts]
    streams = [TextStream(tokenizer, sampling.stop) for _ in rows]

    def emit(row: int, piece: str) -> None:
        if on_text is not None and piece:
            on_text(row, piece)

    def on_token(token: torch.Tensor) -> torch.Tensor:
        for row, (stream, token_id) in enumerate(zip(streams, token.tolist(), strict=True)):
            emit(row, stream.push(token_id))
            if token_id == eos_id:  # the row has ended: what the batch draws for it next is not its text
                stream.stopped = True
        return torch.tensor([s.stopped for s in streams], device=token.device)

    generate(model, rows, sampling, eos_id=eos_id, on_token=on_token)
    for row, stream in enumerate(streams):
        emit(row, stream.finish())
    return [s.text for s in streams]


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; a blank line inside the file is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(f"{path}, line {number}: empty prompt")
    return lines


def generate_file(
    model: Transformer,
    tokenizer: Tokenizer,
    input_file: str | Path,
    output_file: str | Path,
    sampling: Sampling,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Continue every prompt of input_file in batches, writing one JSON object per line; returns the count.

    The output appears whole or not at all. `on_batch(n)` is told each finished batch's size.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    prompts = read_prompts(input_file)
    Path(output_file).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output_file) as f:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            for prompt, completion in zip(batch, generate_text(model, tokenizer, batch, sampling), strict=True):
                line = json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False)
                f.write((line + "\n").encode("utf-8"))
            if on_batch is not None:
                on_batch(len(batch))
    return len(prompts)
