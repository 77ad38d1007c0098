"""A conversation with a checkpoint: its chat template, a history kept to the context window, the REPL.

Each reply formats the whole conversation with the checkpoint's chat template, Hugging
Face's convention: a Jinja template in `chat_template.jinja`, or the `chat_template`
field of `tokenizer_config.json`, rendered with `messages` (a list of {"role",
"content"}), `add_generation_prompt`, `bos_token` and `eos_token`. A base model, which
has none, gets DEFAULT_TEMPLATE, a script of lines:

    <|bos|>system prompt
    Usuário: Olá
    Assistente: Bom dia.
    Usuário: Quem é Capitu?
    Assistente:

A reply ends at the template's end-of-turn token (its eos_token) or, for the default
template, where the model starts the next user line ("\\nUsuário:"). When the
conversation and a full reply no longer fit the model's context, the oldest turns are
dropped, a user message and its reply at a time; the system prompt and the latest user
message stay.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from mistura.checkpoint import resolve
from mistura.data.tokenizer import BOS, EOS
from mistura.errors import CheckpointError, ConfigError, DataError, MisturaError
from mistura.infer.generate import generate_text, not_utf8
from mistura.infer.sampling import Sampling
from mistura.loading import load, load_tokenizer
from mistura.model import Transformer

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
OnText = Callable[[str], None]
# (prompt ids, sampling with the template's stop strings, end-of-turn id, on_text) -> the reply's text
Generate = Callable[[list[int], Sampling, int, OnText], str]
ReadLine = Callable[[], str | None]  # the user's next line, None at the end of the input

DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}Usuário: {% elif message.role == 'assistant' %}Assistente: {% endif %}"
    "{{ message.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistente:{% endif %}"
)
DEFAULT_STOP = ("\nUsuário:",)
PROMPT = "> "
HELP = """commands:
  /sair, /exit      end the conversation (Ctrl-D too)
  /limpar, /clear   forget the conversation so far
  /ajuda, /help     this list
Ctrl-C stops a reply."""


def _raise_exception(message: str) -> None:
    """Templates call raise_exception(...) to refuse a conversation (e.g. roles that do not alternate)."""
    raise TemplateError(message)


# Hugging Face's rendering settings: blocks swallow their own line break and indentation.
_ENVIRONMENT = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_ENVIRONMENT.globals["raise_exception"] = _raise_exception


class ChatTemplate:
    """A compiled Jinja chat template, the special tokens it is rendered with, and what ends a reply.

    A template that does not compile, or fails to render a conversation, is a CheckpointError naming `where`.
    """

    def __init__(
        self,
        source: str,
        bos_token: str = BOS,
        eos_token: str = EOS,
        stop: tuple[str, ...] = (),  # strings that end a reply besides the eos token
        where: str = "the default chat template",
    ):
        self.source, self.bos_token, self.eos_token, self.stop, self.where = source, bos_token, eos_token, stop, where
        with self._errors():
            self.template = _ENVIRONMENT.from_string(source)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        with self._errors():
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except TemplateError as err:
            raise CheckpointError(f"{self.where}: chat template error: {err}") from err


def load_chat_template(checkpoint: str | Path, default: str = DEFAULT_TEMPLATE) -> ChatTemplate:
    """The checkpoint's chat template (chat_template.jinja first, then tokenizer_config.json), else `default`."""
    directory = template_directory(checkpoint)
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    tokens = {name: _token_text(config, name, config_path) for name in ("bos_token", "eos_token")}
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        return ChatTemplate(jinja_path.read_text(encoding="utf-8"), **tokens, where=str(jinja_path))
    if "chat_template" in config:
        source = config["chat_template"]
        if not isinstance(source, str):
            raise CheckpointError(f"{config_path}: chat_template must be a string (a Jinja template)")
        return ChatTemplate(source, **tokens, where=f"{config_path} (chat_template)")
    return ChatTemplate(default, **tokens, stop=DEFAULT_STOP)


def template_directory(checkpoint: str | Path) -> Path:
    """Where a checkpoint's template files are: the folder itself when it holds one (a LoRA adapter folder, which
    has no config.json), else the checkpoint `resolve` finds (a run's latest)."""
    path = Path(checkpoint)
    if any((path / name).is_file() for name in ("chat_template.jinja", "tokenizer_config.json")):
        return path
    return resolve(checkpoint)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def _token_text(config: dict, name: str, path: Path) -> str:
    """A special token's text: a string, or Hugging Face's {"content": ...}; mistura's own when absent."""
    value = config.get(name) or {"bos_token": BOS, "eos_token": EOS}[name]
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise CheckpointError(f"{path}: {name} must be a string or an object with a 'content' string")
    return value


class Chat:
    """A conversation: `reply(text)` answers a user message and remembers both.

    `messages` holds the turns so far (user, assistant, user, ...), the system prompt
    apart; `notice` receives a line whenever old turns are dropped to fit the context.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        generate: Generate,
        sampling: Sampling,
        context: int,
        system: str | None = None,
        notice: Callable[[str], None] = print,
    ):
        if sampling.max_new_tokens >= context:
            raise ConfigError(
                f"max_new_tokens ({sampling.max_new_tokens}) leaves no room for the conversation in the model's "
                f"context of {context} tokens"
            )
        if system and not_utf8(system):
            raise ConfigError(f"the system prompt is not valid UTF-8 text ({not_utf8(system)})")
        eos_id = tokenizer.token_to_id(template.eos_token)
        if eos_id is None:
            raise CheckpointError(f"{template.where}: eos_token {template.eos_token!r} is not in the tokenizer")
        self.tokenizer, self.template, self.generate, self.context = tokenizer, template, generate, context
        self.sampling = replace(sampling, stop=(*sampling.stop, *template.stop))
        self.eos_id, self.notice = eos_id, notice
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[Message] = []
        self.replies = 0  # each reply draws with its own seed: sampling.seed + replies so far

    def reply(self, text: str, on_text: OnText | None = None) -> str:
        """The assistant's answer to `text`, streamed through on_text; a too long message is a DataError.

        Ctrl-C (KeyboardInterrupt) stops the reply: the turn is kept with what was said so far.
        A message that is not valid UTF-8 text (see not_utf8) is a DataError.
        """
        if not_utf8(text):
            raise DataError(f"the message is not valid UTF-8 text ({not_utf8(text)})")
        turns = [*self.messages, {"role": "user", "content": text}]
        prompt, dropped = self.fit(turns)
        if dropped:
            self.messages = self.messages[dropped:]
            self.notice(f"[{dropped} earlier messages dropped to fit the model's context of {self.context} tokens]")
        pieces: list[str] = []

        def stream(piece: str) -> None:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

        sampling = replace(self.sampling, seed=self.sampling.seed + self.replies)
        self.replies += 1
        try:
            answer = self.generate(prompt, sampling, self.eos_id, stream).strip()
        except KeyboardInterrupt:
            self.remember(text, "".join(pieces).strip())
            raise
        self.remember(text, answer)
        return answer

    def remember(self, text: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]

    def fit(self, turns: list[Message]) -> tuple[list[int], int]:
        """The prompt ids of the latest turns that leave room for a full reply, and how many messages it leaves out."""
        room = self.context - self.sampling.max_new_tokens
        for start in range(0, len(turns), 2):  # whole turns, so that the kept ones start with a user message
            ids = self.encode(turns[start:])
            if len(ids) <= room:
                return ids, start
        raise DataError(
            f"the message is too long: the conversation formatted around it takes {len(ids)} tokens, and with a "
            f"reply of up to {self.sampling.max_new_tokens} tokens that exceeds the model's context of "
            f"{self.context} tokens"
        )

    def encode(self, turns: list[Message]) -> list[int]:
        """The ids of the formatted conversation; its special tokens come from the template's text, none added."""
        text = self.template.render([*self.system, *turns])
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def clear(self) -> None:
        self.messages = []


def open_chat(
    checkpoint: str | Path,
    sampling: Sampling,
    system: str | None = None,
    notice: Callable[[str], None] = print,
    loader: Callable[[str | Path], Transformer] = load,
) -> Chat:
    """A conversation with a checkpoint (or a run's latest one) through the generation engine.

    `loader` reads the model: `mistura.load`, or (under torchrun) this rank's tensor-parallel part of it.
    """
    model, tokenizer = loader(checkpoint), load_tokenizer(checkpoint)

    def generate(prompt: list[int], sampling: Sampling, eos_id: int, on_text: OnText) -> str:
        return generate_text(model, tokenizer, [prompt], sampling, lambda _, piece: on_text(piece), eos_id)[0]

    return Chat(tokenizer, load_chat_template(checkpoint), generate, sampling, model.config.max_seq_len, system, notice)


def repl(chat: Chat, read: ReadLine | None = None) -> None:
    """Answer user messages and print the replies as they come, until the end of the input or /sair.

    `read` gives the next line, None at the end (default: stdin_reader(), a terminal or a pipe).
    A line that is not UTF-8 (binary input, a terminal in another encoding) is reported and skipped.
    """
    read = read or stdin_reader()
    number = 0  # lines read
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            print("\n(/sair or Ctrl-D to leave)")
            continue
        if line is None:
            print()
            return
        number += 1
        problem = not_utf8(line)
        if problem:
            print(f"error: line {number} is not valid UTF-8 text ({problem}); skipped")
            continue
        if line in ("/sair", "/exit"):
            return
        if line:
            run_line(chat, line)


def stdin_reader() -> ReadLine:
    """A reader of stdin's lines, each stripped, None at its end; a terminal gets line editing and history."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    # Under a UTF-8 locale stdin decodes strictly: input() would raise UnicodeDecodeError, and the rest of the
    # bytes it had read (other lines) would be lost. Bytes that are not UTF-8 come as lone surrogates instead.
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")

    def read() -> str | None:
        try:
            return input(PROMPT).strip()
        except EOFError:
            return None

    return read


def run_line(chat: Chat, line: str) -> None:
    """A command, or a message to answer; errors and Ctrl-C end the line, not the conversation."""
    if line in ("/limpar", "/clear"):
        chat.clear()
        print("[conversation cleared]")
    elif line in ("/ajuda", "/help"):
        print(HELP)
    elif line.startswith("/") and len(line.split()) == 1:
        print(f"unknown command {line}; /ajuda lists the commands")
    else:
        try:
            chat.reply(line, on_text=_printer())
            print()
        except KeyboardInterrupt:
            print("\n[reply stopped]")
        except MisturaError as err:
            print(f"error: {err}")


def _printer() -> OnText:
    """Prints a reply's pieces as they come, without its leading or trailing whitespace."""
    held = None  # whitespace waiting for more text; None until the reply's first visible character

    def write(piece: str) -> None:
        nonlocal held
        text = piece.lstrip() if held is None else held + piece
        body = text.rstrip()
        if body:
            print(body, end="", flush=True)
            held = text[len(body) :]
        elif held is not None:
            held = text

    return write
