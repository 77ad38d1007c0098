"""Text in, text out: prompts through a tokenizer and a model, streamed or written as JSONL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mistura.data.tokenizer import BOS_ID, EOS_ID
from mistura.errors import DataError
from mistura.infer.sampling import Sampling
from mistura.model import Transformer


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """BOS followed by the prompt's ids, as documents were encoded for training."""
    if not prompt.strip():
        raise DataError("the prompt is empty: give some text to continue")
    return [BOS_ID, *tokenizer.encode(prompt).ids]


class StreamDecoder:
    """Turns a growing list of token ids into text pieces as they become printable.

    Byte-level BPE may split one UTF-8 character (an accented letter, say) across two
    tokens; the decoded text then ends in U+FFFD until the next token completes it, so
    such an incomplete tail is held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    sampling: Sampling,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The continuation of `prompt` (without the prompt), stopping at EOS; pieces go to on_text as they come."""
    device = model.tok_emb.weight.device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stream = StreamDecoder(tokenizer)

    def emit(token: torch.Tensor) -> None:
        piece = stream.push(int(token[0]))
        if on_text is not None and piece:
            on_text(piece)

    out = model.generate(
        ids,
        sampling.max_new_tokens,
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
        eos_id=EOS_ID,
        generator=generator,
        on_token=emit,
    )
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


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
    model: Transformer, tokenizer: Tokenizer, input_file: str | Path, output_file: str | Path, sampling: Sampling
) -> int:
    """Continue every prompt of input_file, writing one JSON object per line; returns the count."""
    prompts = read_prompts(input_file)
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    with output_file.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            completion = generate_text(model, tokenizer, prompt, sampling)
            f.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
    return len(prompts)
