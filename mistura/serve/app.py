"""The OpenAI-compatible HTTP server: a FastAPI app over the serving engine.

    app = app_from_checkpoint("runs/quickstart", max_seqs=16)      # or create_app(model, tokenizer, template)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streamed as
server-sent events with `stream: true`), GET /health, GET /metrics (Prometheus). With an
`api_key`, /v1/* answers 401 unless the request carries `Authorization: Bearer <key>`.

A request becomes an engine Request (mistura.serve.engine) run by the Runner's thread; its
events come back token by token and each completion's text is decoded incrementally
(mistura.infer.generate.TextStream: a UTF-8 character split over tokens waits for its last
byte, and text that may begin a stop string is held back). A stop string ends the
completion, cut off; when every completion of the request has ended, the request is
aborted in the engine at once, as it is when the client disconnects. Chat requests are
formatted with the checkpoint's chat template (mistura.infer.chat), whose end-of-turn token
is the engine's EOS.

Errors are OpenAI's: a JSON body {"error": {"message", "type", "param", "code"}}, status
400 for a bad request (invalid JSON and wrong field types included), 401, 404 for an
unknown model, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from mistura.chat_template import ChatTemplate, load_chat_template
from mistura.errors import MisturaError
from mistura.infer.engine import check_prompts
from mistura.infer.generate import TextStream, encode_prompt, not_utf8
from mistura.infer.sampling import Sampling
from mistura.loading import load, load_tokenizer
from mistura.model import Transformer
from mistura.serve import protocol
from mistura.serve.engine import Engine, Event
from mistura.serve.engine import Request as EngineRequest
from mistura.serve.metrics import CountRequests, Metrics
from mistura.serve.protocol import (
    APIError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    Format,
    Message,
    Piece,
    SamplingFields,
    TokenLogprob,
)
from mistura.serve.runner import ABORTED, QueueFull, Runner

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the answer
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's is the rest of the context


def app_from_checkpoint(
    checkpoint: str | Path, device=None, dtype=None, model_name: str | None = None, **options
) -> FastAPI:
    """create_app for a checkpoint (anything `mistura.load` reads), named after its folder unless `model_name`."""
    model, tokenizer = load(checkpoint, device, dtype), load_tokenizer(checkpoint)
    name = model_name or Path(checkpoint).resolve().name
    return create_app(model, tokenizer, load_chat_template(checkpoint), model_name=name, **options)


def create_app(
    model: Transformer,
    tokenizer: Tokenizer,
    chat_template: ChatTemplate,
    *,
    model_name: str = "mistura",
    api_key: str | None = None,
    max_queue: int = 256,
    **engine_options,
) -> FastAPI:
    """The server's app; `engine_options` go to mistura.serve.engine.Engine (max_seqs, block_size, n_blocks...).

    The engine runs from the app's startup to its shutdown (its lifespan); `app.state.runner` is its Runner,
    `app.state.model_name` the model's name in the API.
    """
    runner = Runner(Engine(model, chat_template.eos_id(tokenizer), **engine_options), max_queue)
    metrics = Metrics(runner)
    api = Api(model_name, tokenizer, chat_template, model.config.max_seq_len, runner, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start(asyncio.get_running_loop())
        yield
        runner.stop()

    app = FastAPI(title="mistura", lifespan=lifespan)
    app.state.runner, app.state.model_name = runner, model_name
    add_error_handlers(app)
    app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(CountRequests, metrics=metrics)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics_text)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    return app


class Api:
    """The endpoints, over one model, its tokenizer and chat template, and the runner of its engine."""

    def __init__(
        self, name: str, tokenizer: Tokenizer, template: ChatTemplate, context: int, runner: Runner, metrics: Metrics
    ):
        self.name, self.tokenizer, self.template, self.context = name, tokenizer, template, context
        self.runner, self.metrics = runner, metrics
        self.created = int(time.time())

    async def health(self) -> JSONResponse:
        if not self.runner.alive:
            return JSONResponse({"status": "error", "message": "the engine's thread has stopped"}, 503)
        return JSONResponse({"status": "ok", "model": self.name})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict:
        model = {"id": self.name, "object": "model", "created": self.created, "owned_by": "mistura"}
        return {"object": "list", "data": [{**model, "max_model_len": self.context}]}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if isinstance(body.prompt, str):
            prompt = encode_prompt(self.tokenizer, body.prompt)
        else:
            (prompt,) = check_prompts([body.prompt], self.tokenizer.get_vocab_size())
        sampling = self.sampling(body, prompt, body.max_tokens, body.stop_strings, "prompt", DEFAULT_MAX_TOKENS)
        return await self.answer(request, body, CompletionFormat, prompt, sampling, body.logprobs)

    async def chat_completions(self, body: ChatRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompt = self.chat_prompt(body.messages)
        stop = (*body.stop_strings, *self.template.stop)
        sampling = self.sampling(body, prompt, body.max_new_tokens, stop, "messages", self.context)
        return await self.answer(request, body, ChatFormat, prompt, sampling, body.logprobs_count)

    def check_model(self, model: str) -> None:
        if model != self.name:
            message = f"The model '{model}' does not exist: this server serves '{self.name}'"
            raise APIError(404, message, param="model", code="model_not_found")

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """The conversation formatted by the chat template, as token ids (its special tokens from the text)."""
        turns = [message.as_template_input() for message in messages]
        for number, turn in enumerate(turns):
            problem = not_utf8(turn["content"])
            if problem:
                raise APIError(400, f"messages[{number}] is not valid UTF-8 text ({problem})", param="messages")
        return self.template.encode(self.tokenizer, turns)

    def sampling(
        self,
        body: SamplingFields,
        prompt: list[int],
        max_tokens: int | None,
        stop: tuple[str, ...],
        what: str,
        default: int,
    ) -> Sampling:
        """The request's Sampling: max_tokens must fit in the context after the prompt (default: `default`, or the
        room left); no seed draws a random one."""
        room = self.context - len(prompt)
        if room < 1:
            message = f"the {what}: {len(prompt)} tokens, which leave no room to generate in the model's context"
            raise APIError(400, f"{message} of {self.context} tokens", param=what, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            message = (
                f"max_tokens is {max_tokens}, but after the {len(prompt)} tokens of the {what} the model's context "
                f"of {self.context} tokens holds at most {room} new ones"
            )
            raise APIError(400, message, param="max_tokens", code="context_length_exceeded")
        return Sampling(
            max_new_tokens=max_tokens or min(default, room),
            temperature=body.temperature,
            top_k=None if body.top_k in (0, -1) else body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            stop=stop,
            seed=secrets.randbits(32) if body.seed is None else body.seed,
        )

    async def answer(
        self,
        request: Request,
        body: SamplingFields,
        format: Format,
        prompt: list[int],
        sampling: Sampling,
        logprobs: int | None,
    ) -> Response:
        """Run the request in the engine: its answer, streamed as server-sent events when it asks for it."""
        request_id = f"{format.id_prefix}-{uuid.uuid4().hex}"
        job = EngineRequest(prompt, sampling, body.n, logprobs)
        generation = Generation(self.runner, self.tokenizer, request_id, job, request, self.metrics)
        created = int(time.time())

        def show(choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
            return protocol.response(format, request_id, self.name, created, choices, usage, chunk)

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await stream(generation, format, show, include_usage)
        if not await generation.run():
            return Response(status_code=CLIENT_CLOSED)

        def choice(index: int, c: Choice) -> dict:
            shown = None if logprobs is None else format.logprobs(c.logprobs)
            return format.choice(index, c.stream.text, shown, c.finish_reason)

        return JSONResponse(show([choice(i, c) for i, c in enumerate(generation.choices)], generation.usage()))


@dataclass
class Choice:
    """One completion's progress: its text (decoded incrementally), tokens so far, logprobs, how it ended."""

    stream: TextStream
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    """A request in the engine, its n completions fed by the runner's events; aborted when the client leaves."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        request_id: str,
        job: EngineRequest,
        request: Request,
        metrics: Metrics,
    ):
        self.runner, self.tokenizer, self.request_id, self.metrics = runner, tokenizer, request_id, metrics
        self.prompt_tokens, self.arrival = len(job.prompt), time.monotonic()
        self.choices = [Choice(TextStream(tokenizer, job.sampling.stop)) for _ in range(job.n)]
        try:
            self.queue = runner.submit(request_id, job)
        except QueueFull as err:
            raise APIError(429, str(err), "requests", code="rate_limit_exceeded") from err
        self.watcher = asyncio.create_task(abort_on_disconnect(request, runner, request_id))

    async def pieces(self) -> AsyncIterator[Piece]:
        """What each event adds to a completion, until all have ended (or the client left); the engine's errors
        are raised. At the end the request is aborted in the engine if it still runs there (a stop string)."""
        try:
            while not all(choice.finish_reason for choice in self.choices):
                item = await self.queue.get()
                if item is ABORTED:
                    return
                if isinstance(item, Exception):  # the engine's: refused the request (400), or failed (500)
                    raise error_of(item) from item
                if all(choice.tokens == 0 for choice in self.choices):
                    self.metrics.time_to_first_token.observe(time.monotonic() - self.arrival)
                piece = self.advance(item)
                if piece is not None:
                    yield piece
        finally:
            self.watcher.cancel()
            self.runner.abort(self.request_id)

    async def run(self) -> bool:
        """Follow the request to its end; False when the client left first."""
        async with aclosing(self.pieces()) as pieces:
            async for _ in pieces:
                pass
        return all(choice.finish_reason for choice in self.choices)

    def advance(self, event: Event) -> Piece | None:
        """Add an event's token to its completion: the text that became final, and how it ended; None for a
        completion that already ended (at a stop string: the engine goes on until it is aborted)."""
        choice = self.choices[event.index]
        if choice.finish_reason is not None:
            return None
        choice.tokens += 1
        if event.finish_reason == "stop":  # the token is EOS, which the text never shows
            choice.finish_reason = "stop"
            return Piece(event.index, choice.stream.finish(), [], "stop")
        logprobs = [self.token_logprob(event, offset=len(choice.stream.text))] if event.logprob is not None else []
        text = choice.stream.push(event.token)
        if choice.stream.stopped:
            choice.finish_reason = "stop"
        elif event.finish_reason is not None:
            text += choice.stream.finish()
            choice.finish_reason = event.finish_reason
        choice.logprobs += logprobs
        return Piece(event.index, text, logprobs, choice.finish_reason)

    def token_logprob(self, event: Event, offset: int) -> TokenLogprob:
        top = [(self.token_text(token), logprob) for token, logprob in event.top_logprobs or []]
        return TokenLogprob(self.token_text(event.token), event.logprob, top, offset)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, sum(choice.tokens for choice in self.choices))


async def abort_on_disconnect(request: Request, runner: Runner, request_id: str) -> None:
    """Wait for the client to disconnect, then abort its request (at once, whatever the answer is doing)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    runner.abort(request_id)


async def stream(generation: Generation, format: Format, show: Callable[..., dict], include_usage: bool) -> Response:
    """The answer as server-sent events: a chunk per piece of text, then `data: [DONE]`.

    The first piece is awaited before the status is sent, so that a request the engine refuses is answered
    with its error status. An error later on is sent as an event holding OpenAI's error body.
    """
    pieces = generation.pieces()
    try:
        first = await anext(pieces)
    except StopAsyncIteration:
        return Response(status_code=CLIENT_CLOSED)

    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(piece: Piece) -> str:
        logprobs = format.logprobs(piece.logprobs) if piece.logprobs else None
        return event(show([format.delta(piece.index, piece.text, logprobs, piece.finish_reason)], chunk=True))

    async def every_piece() -> AsyncIterator[Piece]:
        yield first
        async for piece in pieces:
            yield piece

    async def events() -> AsyncIterator[str]:
        async with aclosing(pieces):
            try:
                for index in range(len(generation.choices)):
                    opening = format.opening(index)
                    if opening is not None:
                        yield event(show([opening], chunk=True))
                async for piece in every_piece():
                    if piece.text or piece.logprobs or piece.finish_reason:
                        yield chunk(piece)
                if include_usage:
                    yield event(show([], generation.usage(), chunk=True))
            except Exception as err:
                if not isinstance(err, MisturaError):
                    log.exception("request %s failed mid-stream", generation.request_id)
                yield event(error_of(err).body())
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


class RequireKey:
    """ASGI middleware: with an API key, /v1/* answers 401 to requests without `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'"
                error = APIError(401, message, code="invalid_api_key")
                await JSONResponse(error.body(), error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_of(err: Exception) -> APIError:
    """The APIError answering an exception: the user's (400) or a bug (500)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, MisturaError):
        return APIError(400, str(err))
    return APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error")


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON body; invalid request bodies are 400 (FastAPI's own is 422)."""

    async def answer(request: Request, err: Exception) -> JSONResponse:
        error = error_of(err)
        return JSONResponse(error.body(), error.status)

    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(problem["type"] == "json_invalid" for problem in problems):
            error = APIError(400, "the request body is not valid JSON")
        else:
            fields = [".".join(map(str, problem["loc"][1:])) for problem in problems]
            message = "; ".join(f"{name or 'body'}: {p['msg']}" for name, p in zip(fields, problems))
            error = APIError(400, f"invalid request: {message}", param=fields[0] or None)
        return JSONResponse(error.body(), error.status)

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        error = APIError(err.status_code, str(err.detail), code=None)
        return JSONResponse(error.body(), error.status)

    app.add_exception_handler(APIError, answer)
    app.add_exception_handler(MisturaError, answer)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, answer)
