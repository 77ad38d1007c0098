"""Choosing the next token from logits.

`Sampling` holds the settings; `next_token_probs` turns a batch of logits into the
distribution they describe, in this order (Hugging Face's):

    repetition penalty -> temperature -> top-k -> top-p (nucleus) -> min-p -> softmax

Temperature 0 is greedy decoding: the argmax, after the repetition penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mistura.errors import ConfigError


@dataclass
class Sampling:
    """How to continue a prompt: at most max_new_tokens tokens, drawn with a generator seeded by `seed`.

    min_p keeps the tokens at least min_p times as likely as the most likely one;
    repetition_penalty > 1 makes every token already in the row (prompt or output)
    less likely (CTRL's penalty: positive logits divided, negative ones multiplied);
    generation of a row ends at the first of its `stop` strings, which is cut off.
    """

    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 50
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        check_sampling(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_sampling(s: Sampling) -> None:
    """Raise ConfigError naming the first out-of-range setting."""
    if s.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if not (s.temperature >= 0 and math.isfinite(s.temperature)):
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {s.temperature}")
    if s.top_k is not None and s.top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {s.top_k}")
    if s.top_p is not None and not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.min_p is not None and not 0.0 <= s.min_p <= 1.0:
        raise ConfigError(f"min_p must be in [0, 1], got {s.min_p}")
    if not (s.repetition_penalty > 0 and math.isfinite(s.repetition_penalty)):
        raise ConfigError(f"repetition_penalty must be > 0 (1 is none), got {s.repetition_penalty}")
    if any(not stop for stop in s.stop):
        raise ConfigError("stop strings must not be empty")


def penalize_repetition(
    logits: torch.Tensor,  # (B, V)
    seen: torch.Tensor,  # (B, V) bool: tokens already in the row
    penalty: float,
) -> torch.Tensor:
    """CTRL's repetition penalty on the tokens `seen` in each row (no-op for penalty 1)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def next_token_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The sampling distribution (B, V), fp32, of logits (B, V) after temperature, top-k, top-p and min-p.

    The repetition penalty is applied before (see penalize_repetition); s.temperature must be > 0.
    """
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        logits = _nucleus(logits, s.top_p)
    probs = torch.softmax(logits, dim=-1)
    if s.min_p:
        floor = s.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row (B,) from logits (B, V): the argmax when greedy, else a draw."""
    if s.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(next_token_probs(logits, s), 1, generator=generator).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always the top one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
