"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft proposes, the target verifies.

With `ids` the text so far, each model's cache holds a prefix of ids; a round is

    draft:   x_1 .. x_g, one forward pass each, x_i drawn from q_i = q(. | ids, x_<i)
    target:  ONE forward pass over its uncached tail of ids and x_1 .. x_g: p_1 .. p_g+1
    keep:    the proposals up to the first rejected one, then one token of the target's:
             the correction at that rejection, or a bonus token from p_g+1 if none was
    rewind:  both caches forget the rejected proposals (Cache.rewind); nothing is recomputed

Greedy decoding accepts x_i when it is the target's argmax and corrects with the argmax,
so the output is token for token the target's own greedy decoding. Sampling accepts x_i
with probability min(1, p_i(x_i) / q_i(x_i)) and on rejection draws from max(0, p_i - q_i)
renormalised: every token then follows the target's distribution exactly (Leviathan et
al., appendix A.1), whatever the draft. p and q are the distributions after the
repetition penalty, temperature, top-k, top-p and min-p, so both models obey the same
settings.

A round costs g draft steps and one target pass over g + 1 tokens, and yields 1 to g + 1
tokens: the speedup is the tokens per target pass over the round's cost counted in target
steps (about 1.3 for that pass on a CPU, plus g draft steps of a few hundredths each for a
draft 15 times smaller). What decides it is how often the draft guesses the target's
choice; a draft distilled from its target (mistura.train.distill) guesses it more often.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from mistura.data.tokenizer import EOS_ID
from mistura.errors import CheckpointError, ConfigError
from mistura.infer.engine import check_prompts, new_token_budget
from mistura.infer.generate import TextStream, encode_prompt
from mistura.infer.sampling import Sampling, next_token_probs, penalize_repetition
from mistura.model import Transformer
from mistura.model.cache import Cache

# Receives each new token id as it is kept; returning True ends generation after it.
OnTokenId = Callable[[int], "bool | None"]


@dataclass
class SpeculativeStats:
    """What one speculative generation did."""

    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of which the target kept
    target_passes: int = 0
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_pass(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0


@torch.no_grad()
def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompt: Sequence[int],
    sampling: Sampling,
    gamma: int = 4,
    eos_id: int | None = None,
    on_token: OnTokenId | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """The target's continuation of one prompt (new ids, ending with eos_id if drawn), drafted gamma at a time.

    Like the engine's generate, max_new_tokens is shortened to the target's context; near
    the end of a draft's shorter context the target decodes alone.
    """
    check_pair(target, draft)
    if gamma < 1:
        raise ConfigError(f"gamma (draft tokens per round) must be >= 1, got {gamma}")
    ids = check_prompts([prompt], target.config.vocab_size)[0]
    start, end = len(ids), len(ids) + new_token_budget(target, len(ids), sampling.max_new_tokens)
    decoding = _Decoding(target, draft, ids, end, sampling)
    stats, ended = SpeculativeStats(), False
    while len(decoding.ids) < end and not ended:
        room = min(end - len(decoding.ids) - 1, draft.config.max_seq_len - len(decoding.ids) + 1)
        proposals, q = decoding.propose(max(0, min(gamma, room)))
        kept = decoding.verify(proposals, q)
        stats.proposed += len(proposals)
        stats.accepted += len(kept) - 1
        stats.target_passes += 1
        kept, ended = _until_end(kept, eos_id, on_token)
        decoding.keep(kept)
    stats.new_tokens = len(decoding.ids) - start
    return decoding.ids[start:], stats


def _until_end(kept: list[int], eos_id: int | None, on_token: OnTokenId | None) -> tuple[list[int], bool]:
    """The kept tokens up to the first that ends generation (EOS, or on_token's word), and whether one did."""
    for n, token in enumerate(kept, 1):
        if (on_token is not None and on_token(token)) or token == eos_id:
            return kept[:n], True
    return kept, False


def check_pair(target: Transformer, draft: Transformer) -> None:
    """A draft must speak the target's vocabulary and live on its device."""
    draft_vocab, vocab = draft.config.vocab_size, target.config.vocab_size
    if draft_vocab != vocab:
        raise ConfigError(
            f"the draft's vocabulary ({draft_vocab} tokens) differs from the target's ({vocab}): "
            "speculative decoding needs one tokenizer for both"
        )
    draft_device, device = draft.tok_emb.weight.device, target.tok_emb.weight.device
    if draft_device != device:
        raise ConfigError(f"the draft is on {draft_device} and the target on {device}: load both on one device")


def check_tokenizers(target: Tokenizer, draft: Tokenizer) -> None:
    """Equal vocabularies: the same token id means the same text in both models."""
    if draft.get_vocab(with_added_tokens=True) != target.get_vocab(with_added_tokens=True):
        raise CheckpointError(
            "the draft's tokenizer differs from the target's: train the draft on the target's prepared data "
            "(the same data.dir), so both share one tokenizer"
        )


def speculative_generate_text(
    target: Transformer,
    draft: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    sampling: Sampling,
    gamma: int = 4,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, SpeculativeStats]:
    """The continuation of a text prompt, ending at EOS or a stop string (cut off); pieces go to on_text."""
    stream = TextStream(tokenizer, sampling.stop)

    def on_token(token: int) -> bool:
        piece = stream.push(token)
        if on_text is not None and piece:
            on_text(piece)
        return stream.stopped

    _, stats = speculative_generate(target, draft, encode_prompt(tokenizer, prompt), sampling, gamma, EOS_ID, on_token)
    rest = stream.finish()
    if on_text is not None and rest:
        on_text(rest)
    return stream.text, stats


class _Decoding:
    """Both models' caches and the text so far: `ids`, of which each cache holds a prefix."""

    def __init__(self, target: Transformer, draft: Transformer, ids: list[int], end: int, sampling: Sampling):
        self.target, self.draft, self.ids, self.sampling = target, draft, ids, sampling
        self.device = target.tok_emb.weight.device
        self.target_cache = target.new_cache(1, end)
        self.draft_cache = draft.new_cache(1, min(end, draft.config.max_seq_len))
        self.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        self.seen = None  # (1, V) bool: tokens in ids, for the repetition penalty
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, target.config.vocab_size, dtype=torch.bool, device=self.device)
            self.seen[0, ids] = True

    def propose(self, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g draft tokens (g,) and, when sampling, the distributions they were drawn from (g, V)."""
        s = self.sampling
        proposals = torch.empty(g, dtype=torch.long, device=self.device)
        q = None if s.greedy else torch.empty(g, self.draft.config.vocab_size, device=self.device)
        seen = None if self.seen is None else self.seen.clone()
        tokens = self._uncached(self.draft_cache)  # (1, t)
        for i in range(g):
            logits = self.draft(tokens, self.draft_cache)[:, -1]  # (1, V)
            if seen is not None:
                logits = penalize_repetition(logits, seen, s.repetition_penalty)
            if s.greedy:
                token = logits.argmax(dim=-1)  # (1,)
            else:
                q[i] = next_token_probs(logits, s)[0]
                token = torch.multinomial(q[i : i + 1], 1, generator=self.generator)[0]
            proposals[i] = token[0]
            tokens = token[None]  # (1, 1)
            if seen is not None:
                seen[0, token] = True
        return proposals, q

    def verify(self, proposals: torch.Tensor, q: torch.Tensor | None) -> list[int]:
        """One target pass over the uncached ids and the proposals; the tokens kept (accepted ones + one)."""
        g = len(proposals)
        tokens = torch.cat([self._uncached(self.target_cache), proposals[None]], dim=1)  # (1, t + g)
        logits = self.target(tokens, self.target_cache)[0, -(g + 1) :]  # (g + 1, V)
        if self.seen is not None:
            seen = self.seen.repeat(g + 1, 1)  # (g + 1, V): row i has also seen x_1 .. x_i
            for i, token in enumerate(proposals.tolist()):
                seen[i + 1 :, token] = True
            logits = penalize_repetition(logits, seen, self.sampling.repetition_penalty)
        if self.sampling.greedy:
            return accept_greedy(logits.argmax(dim=-1), proposals)
        return accept_sampled(next_token_probs(logits, self.sampling), q, proposals, self.generator)

    def keep(self, kept: list[int]) -> None:
        """Extend ids; both caches forget what was not kept, the last token included (the next pass feeds it)."""
        self.ids += kept
        if self.seen is not None:
            self.seen[0, kept] = True
        self.target_cache.rewind(len(self.ids) - 1)
        self.draft_cache.rewind(min(self.draft_cache.pos, len(self.ids) - 1))

    def _uncached(self, cache: Cache) -> torch.Tensor:
        return torch.tensor([self.ids[cache.pos :]], device=self.device)  # (1, t)


def accept_greedy(best: torch.Tensor, proposals: torch.Tensor) -> list[int]:
    """The proposals (g,) that match the target's argmax best (g + 1,), then the target's own next token."""
    k = int((best[:-1] == proposals).cumprod(dim=0).sum())
    return [*proposals[:k].tolist(), int(best[k])]


def accept_sampled(
    p: torch.Tensor,  # (g + 1, V) target distributions after each prefix
    q: torch.Tensor,  # (g, V) the draft's, from which the proposals were drawn
    proposals: torch.Tensor,  # (g,)
    generator: torch.Generator,
) -> list[int]:
    """Leviathan et al.'s rejection sampling: the kept proposals, then a correction or bonus token.

    x_i is accepted when u_i < p_i(x_i) / q_i(x_i) (u_i uniform); the first rejected one
    is replaced by a draw from max(0, p_i - q_i), and if none is, a bonus token is drawn
    from p_g+1. Each kept token is thereby distributed as the target alone would draw it.
    """
    g = len(proposals)
    rows = torch.arange(g, device=p.device)
    u = torch.rand(g, generator=generator, device=p.device)
    accepted = u * q[rows, proposals] < p[rows, proposals]  # u < p / q without dividing
    k = int(accepted.cumprod(dim=0).sum())
    weights = p[k]
    if k < g:
        residual = (p[k] - q[k]).clamp(min=0)
        if bool(residual.sum() > 0):  # p == q up to rounding leaves no residual: p is then the answer
            weights = residual
    token = torch.multinomial(weights[None], 1, generator=generator)
    return [*proposals[:k].tolist(), int(token)]
