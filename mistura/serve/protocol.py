"""OpenAI's wire format: the request bodies the server accepts, the objects it answers with, its error bodies.

Requests are validated strictly, as OpenAI does: a field of the wrong type ("5" for an
integer) is an error, not coerced. Fields OpenAI defines that mistura cannot honour
(`echo`) are refused; unknown fields are ignored. Besides OpenAI's sampling fields the
requests take vLLM's `top_k`, `min_p` and `repetition_penalty`.

Completions' `logprobs` follow the legacy format: per token its text, its logprob, the
top alternatives as {text: logprob} and its offset in the completion's text (0 for the
first token, as vLLM counts without `echo`). A token's text is the token decoded alone:
a token holding half of a UTF-8 character shows as U+FFFD there, never in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from mistura.serve.engine import MAX_LOGPROBS


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None  # vLLM's; 0 or -1: no top-k
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SamplingFields):
    prompt: str | list[int]  # text (after BOS, as documents were trained) or token ids taken as they are
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # default: OpenAI's 16, or the room left
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: Literal[False] = False


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        """The {"role", "content"} dict a chat template renders; "developer" is OpenAI's new name for "system"."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # default: the rest of the context
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        """How many alternatives per token the engine reports: None without logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


@dataclass
class TokenLogprob:
    """A generated token as the logprobs show it: its text, logprob and top alternatives (text, logprob)."""

    text: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int  # where the token's text starts in the completion's text


@dataclass
class Piece:
    """What one completion gained from one engine event: final text (maybe ""), the token, how it ended."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The legacy completions format of some tokens' logprobs."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The chat format of some tokens' logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.text, t.logprob), "top_logprobs": [entry(text, logprob) for text, logprob in t.top]}
            for t in tokens
        ]
    }


class CompletionFormat:
    """How /v1/completions shows its choices, whole or as stream chunks."""

    id_prefix, kind, chunk_kind = "cmpl", "text_completion", "text_completion"
    logprobs = staticmethod(completion_logprobs)

    @staticmethod
    def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    delta = choice

    @staticmethod
    def opening(index: int) -> dict | None:
        """The chunk choice that starts completion `index` of a stream, if any."""
        return None


class ChatFormat:
    """How /v1/chat/completions shows its choices: a message, or in a stream the role first and then deltas."""

    id_prefix, kind, chunk_kind = "chatcmpl", "chat.completion", "chat.completion.chunk"
    logprobs = staticmethod(chat_logprobs)

    @staticmethod
    def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def delta(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        delta = {"content": text} if text or finish_reason is None else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def opening(index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


Format = type[CompletionFormat] | type[ChatFormat]


def response(
    format: Format,
    request_id: str,
    model: str,
    created: int,
    choices: list[dict],
    usage: dict | None = None,
    chunk: bool = False,
) -> dict:
    """An answer, or with `chunk` one of its stream's chunks; `usage` when given."""
    kind = format.chunk_kind if chunk else format.kind
    body = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    return body if usage is None else {**body, "usage": usage}
