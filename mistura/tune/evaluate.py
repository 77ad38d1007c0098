"""How well a model answers held-out conversations: exact match of its greedy reply, and ranking of the answers.

Each conversation's last message is the assistant's answer; the prompt is every message
before it, formatted by the chat template with its generation prompt. Two scores, as
fractions of the conversations:

- exact match: the greedy reply, up to the template's end of turn, is the answer
  (surrounding whitespace aside);
- ranking: among the candidates, the distinct answers of the whole set, the answer is the
  one the model finds most likely: the sum of the log-probabilities of its tokens, end of
  turn included, the tokens fine-tuning learns (see mistura.tune.encode). Earlier assistant
  turns are the same for every candidate, so they do not change the ranking. Chance is one
  over the number of candidates.

`mistura finetune-eval CKPT --data FILE.jsonl` prints both; measured before and after
fine-tuning, they say what the fine-tune taught.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from mistura.chat_template import ChatTemplate
from mistura.errors import DataError
from mistura.infer.generate import generate_text
from mistura.infer.sampling import Sampling
from mistura.model import Transformer
from mistura.train.loop import IGNORE
from mistura.tune.batches import collate
from mistura.tune.data import Conversation
from mistura.tune.encode import Encoder

SPARE_TOKENS = 4  # a greedy reply may run this much past the longest answer before it is cut


@dataclass(frozen=True)
class Score:
    examples: int
    candidates: tuple[str, ...]
    exact_match: float
    ranking: float

    @property
    def chance(self) -> float:
        """The ranking score of a random guess."""
        return 1 / len(self.candidates)

    def __str__(self) -> str:
        return (
            f"{self.examples} examples, {len(self.candidates)} candidate answers: exact match {self.exact_match:.1%}, "
            f"ranking {self.ranking:.1%} (chance {self.chance:.1%})"
        )


def score(
    model: Transformer,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conversations: list[Conversation],
    batch_size: int = 32,
) -> Score:
    """Exact match and ranking (see the module docstring) over conversations that end with the assistant's answer."""
    for conversation in conversations:
        if conversation.messages[-1]["role"] != "assistant":
            raise DataError(f"{conversation.where}: the last message must be the assistant's answer to score")
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    encoder = Encoder(tokenizer, template, model.config.max_seq_len)
    answers = [conversation.messages[-1]["content"] for conversation in conversations]
    candidates = tuple(sorted(set(answers)))
    ranked = [candidates[best] for best in _best_candidates(model, encoder, conversations, candidates, batch_size)]
    replies = _greedy_replies(model, encoder, conversations, candidates, batch_size)
    return Score(
        examples=len(conversations),
        candidates=candidates,
        exact_match=sum(r.strip() == a.strip() for r, a in zip(replies, answers)) / len(answers),
        ranking=sum(r == a for r, a in zip(ranked, answers)) / len(answers),
    )


@torch.no_grad()
def _best_candidates(
    model: Transformer, encoder: Encoder, conversations: list[Conversation], candidates: tuple[str, ...], batch: int
) -> list[int]:
    """For each conversation, the index of the candidate answer the model finds most likely."""
    device = model.tok_emb.weight.device
    examples = [
        encoder.encode(Conversation((*c.messages[:-1], {"role": "assistant", "content": answer}), c.where))
        for c in conversations
        for answer in candidates
    ]
    likelihoods = []
    for start in range(0, len(examples), batch):
        x, y = collate(examples[start : start + batch], device)
        logits = model(x).float()  # (B, T, V)
        losses = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")  # (B, T)
        likelihoods.append(-losses.sum(dim=1))
    per_candidate = torch.cat(likelihoods).view(len(conversations), len(candidates))  # (N, K)
    return per_candidate.argmax(dim=1).tolist()


def _greedy_replies(
    model: Transformer, encoder: Encoder, conversations: list[Conversation], candidates: tuple[str, ...], batch: int
) -> list[str]:
    """Each conversation's greedy reply to its prompt, at most a few tokens longer than the longest candidate."""
    longest = max(len(encoder.tokenizer.encode(answer, add_special_tokens=False).ids) for answer in candidates)
    greedy = Sampling(max_new_tokens=longest + SPARE_TOKENS, temperature=0, stop=encoder.template.stop)
    prompts = [encoder.tokens(list(c.messages[:-1]), True, c.where) for c in conversations]
    tokenizer, eos_id = encoder.tokenizer, encoder.eos_id
    replies = []
    for start in range(0, len(prompts), batch):
        replies += generate_text(model, tokenizer, prompts[start : start + batch], greedy, eos_id=eos_id)
    return replies
