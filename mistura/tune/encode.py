"""Conversations as training examples: the chat template's text as token ids, labelled on the assistant's tokens.

An example's labels are its ids on the tokens of each assistant message, up to and
including the end-of-turn that closes it, and IGNORE everywhere else (the system prompt,
the user's messages, the template's own words such as "Assistente:"), so the loss covers
only what the model is to say, as TRL's assistant-only loss does.

The assistant's tokens are found by rendering the conversation prefix by prefix, as
Hugging Face's `return_assistant_tokens_mask` and TRL do. For assistant message i:

    before  = render(messages[:i], add_generation_prompt=True)   the conversation up to the reply
    through = render(messages[:i + 1])                            ... and the reply with its end of turn
    full    = render(messages)                                    the whole conversation

and the reply's tokens are those of `full` from len(tokens(before)) to len(tokens(through)).
That holds only where both are token prefixes of `full`: a template that renders an
earlier turn differently once later turns follow, or a tokenizer merge across the boundary
(a message ending in whitespace, say), breaks it, and such a conversation is a DataError
naming its line rather than a silently wrong mask. When the template's eos_token lies
inside a reply's span, the span ends with it: what follows (a newline before the next
turn) is the template's, not the reply's.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from mistura.chat_template import ChatTemplate, Message
from mistura.errors import CheckpointError, DataError
from mistura.train.loop import IGNORE
from mistura.tune.data import Conversation


@dataclass(frozen=True)
class Example:
    """A formatted conversation's token ids, and per token its label: the id where it is learnt, else IGNORE."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    where: str

    @property
    def learnt(self) -> int:
        """How many tokens the loss covers."""
        return sum(label != IGNORE for label in self.labels)


class Encoder:
    """Formats conversations with a chat template and tokenizes them into Examples that fit `context` tokens."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, context: int):
        self.tokenizer, self.template, self.context = tokenizer, template, context
        self.eos_id = tokenizer.token_to_id(template.eos_token)

    def encode(self, conversation: Conversation) -> Example:
        messages, where = list(conversation.messages), conversation.where
        ids = self.tokens(messages, False, where)
        if len(ids) > self.context:
            raise DataError(
                f"{where}: the formatted conversation takes {len(ids)} tokens, more than the model's context of "
                f"{self.context}: shorten it or leave it out"
            )
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = self.reply_span(messages, i, ids, where)
                labels[start:end] = ids[start:end]
        return Example(tuple(ids), tuple(labels), where)

    def reply_span(self, messages: list[Message], i: int, ids: list[int], where: str) -> tuple[int, int]:
        """Where assistant message i lies in the whole conversation's `ids`: [start, end)."""
        before = self.tokens(messages[:i], True, where)
        through = self.tokens(messages[: i + 1], False, where)
        for prefix, what in ((before, "up to"), (through, "through")):
            if ids[: len(prefix)] != prefix:
                raise DataError(
                    f"{where}: the chat template's rendering of the conversation {what} message {i + 1} is not a "
                    f"token prefix of the whole conversation's, so the assistant's tokens cannot be told apart "
                    f"(a message ending in whitespace, or a template that renders earlier turns differently?)"
                )
        start, end = len(before), len(through)
        if end <= start:
            raise DataError(f"{where}: the chat template renders assistant message {i + 1} as no tokens")
        if self.eos_id in ids[start:end]:
            end = ids.index(self.eos_id, start, end) + 1
        return start, end

    def tokens(self, messages: list[Message], add_generation_prompt: bool, where: str) -> list[int]:
        """The ids of the rendered messages; the special tokens come from the template's text, none added."""
        try:
            return self.template.encode(self.tokenizer, messages, add_generation_prompt)
        except CheckpointError as err:
            raise DataError(f"{where}: the chat template cannot format this conversation: {err}") from err
