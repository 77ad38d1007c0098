"""The generation engine: token ids in, token ids out, for a batch of prompts at once.

Prompts of different lengths are left-padded to a common length; the cache records
each row's padding (`Cache.pad`), so the model masks those slots and numbers every
row's positions from its first real token: a batch gives the same tokens as its
prompts one by one. The cache is preallocated for prompt + max_new_tokens tokens;
the prompt runs through the model once, then each step feeds one token per row:

    prefill:  logits = model(prompts (B, T_max), cache)[:, -1]
    step:     token = sample(penalize(logits)); logits = model(token (B, 1), cache)[:, -1]

A row ends at `eos_id`, or when `on_token` says so (a stop string, in generate.py);
the batch ends when every row has, or after max_new_tokens steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mistura.errors import ConfigError, DataError
from mistura.infer.sampling import Sampling, penalize_repetition, sample_next
from mistura.model import Transformer

# Receives each step's new tokens (B,); may return a (B,) bool mask of rows to end now.
OnToken = Callable[[torch.Tensor], "torch.Tensor | None"]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    sampling: Sampling,
    eos_id: int | None = None,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """The new ids of every prompt (each ending with eos_id if it was drawn); greedy when temperature is 0."""
    rows = check_prompts(prompts, model.config.vocab_size)
    steps = new_token_budget(model, max(map(len, rows)), sampling.max_new_tokens)
    device = model.tok_emb.weight.device
    ids, pad = left_pad(rows, device)
    cache = model.new_cache(len(rows), ids.shape[1] + steps)
    cache.pad = pad if bool(pad.any()) else None
    seen = _seen_tokens(rows, model.config.vocab_size, device) if sampling.repetition_penalty != 1.0 else None
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    out = torch.empty(len(rows), steps, dtype=torch.long, device=device)
    ended = torch.zeros(len(rows), dtype=torch.bool, device=device)
    lengths = torch.full((len(rows),), steps, device=device)  # new tokens kept per row
    logits = model(ids, cache)[:, -1]  # (B, V)
    for step in range(steps):
        if seen is not None:
            logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
        token = sample_next(logits, sampling, generator)  # (B,)
        out[:, step] = token
        if seen is not None:
            seen[torch.arange(len(rows), device=device), token] = True
        stop = on_token(token) if on_token is not None else None
        if eos_id is not None:
            stop = token == eos_id if stop is None else stop | (token == eos_id)
        if stop is not None:
            lengths = torch.where(stop & ~ended, step + 1, lengths)
            ended |= stop
            if bool(ended.all()):
                break
        if step < steps - 1:
            logits = model(token[:, None], cache)[:, -1]
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist(), strict=True)]


def compile_for_decoding(model: Transformer) -> Transformer:
    """The model under torch.compile with dynamic shapes: one graph for every batch, prompt and cache length, which
    still reads as the Transformer (config, new_cache, ...). Compiling takes a minute or so on a CPU, at the first
    prompt; then greedy decoding at batch 1 ran 1.2x to 2.7x faster (BENCHMARKS.md, benchmarks/vs_llamacpp.py)."""
    return torch.compile(model, dynamic=True)


def check_prompts(prompts: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of ids; no prompts, an empty prompt or an id outside the vocabulary is a DataError."""
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
    if not rows:
        raise DataError("no prompts to continue")
    for number, row in enumerate(rows, 1):
        if not row:
            raise DataError(f"prompt {number} is empty: give at least one token")
        if min(row) < 0 or max(row) >= vocab_size:
            raise DataError(f"prompt {number} has token ids outside the vocabulary [0, {vocab_size})")
    return rows


def new_token_budget(model: Transformer, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens, shortened to what the context holds after the longest prompt."""
    room = model.config.max_seq_len - prompt_len
    if room < 1:
        raise ConfigError(
            f"a prompt of {prompt_len} tokens leaves no room to generate: the model's context is "
            f"{model.config.max_seq_len} tokens"
        )
    return min(max_new_tokens, room)


def left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T_max) with each row right-aligned (padding id 0, masked anyway), and the padding per row (B,)."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
    pad = torch.tensor([width - len(row) for row in rows])
    return ids.to(device), pad.to(device)


def _seen_tokens(rows: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, V) bool: the tokens in each row's prompt."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        seen[b, row] = True
    return seen
