"""RLAIF's reward from a critic model: how strongly it answers yes when asked whether a response is good.

The trainer writes a judging prompt (the response, then a question such as "A resposta está correta?
Responda sim ou não:") and runs the critic on it; the next-token logits z (B, V) at the end give

    r = p(yes) / (p(yes) + p(no)) = sigmoid(logsumexp(z[yes ids]) - logsumexp(z[no ids]))   in [0, 1]

where p(yes) sums the probabilities of every spelling of the answer (" sim", " Sim", " SIM"), and
the softmax's normaliser cancels. This is how RLAIF (Lee et al. 2023) and Constitutional AI (Bai et al.
2022) read a soft label from the AI labeller's probabilities of the answer tokens, normalised over the
answers, here for one response judged alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from mistura.errors import ConfigError

# The critic is asked in Portuguese. English answers are left out: " no" is also Portuguese ("em" + "o"),
# a token any Portuguese model predicts often whatever it thinks of the reply.
YES = (" sim", " Sim", " SIM")
NO = (" não", " Não", " NÃO")


def yes_probability(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """r = p(yes) / (p(yes) + p(no)) (B,) from next-token logits (B, V), each answer's ids' probabilities summed."""
    if not yes_ids or not no_ids or set(yes_ids) & set(no_ids):
        raise ConfigError(f"the yes ids {list(yes_ids)} and no ids {list(no_ids)} must be non-empty and disjoint")
    logits = logits.float()
    yes = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)  # (B,) log p(yes) + log Z
    no = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
    return torch.sigmoid(yes - no)


def answer_token_ids(tokenizer: Tokenizer, spellings: Sequence[str]) -> list[int]:
    """The ids of the spellings that the tokenizer writes as one token (the critic's next token can only be
    one); the others are left out. Raises when none is a single token."""
    ids = []
    for spelling in spellings:
        encoded = tokenizer.encode(spelling, add_special_tokens=False).ids
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ConfigError(f"none of the answers {list(spellings)} is a single token of this tokenizer")
    return ids
