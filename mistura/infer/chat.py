"""A conversation with a checkpoint: a history kept to the context window, and the REPL.

Each reply formats the whole conversation with the checkpoint's chat template
(mistura.chat_template), whose default is a script of lines:

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

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tokenizers import Tokenizer

from mistura.chat_template import ChatTemplate, Message, load_chat_template
from mistura.errors import ConfigError, DataError, MisturaError
from mistura.infer.generate import generate_text, not_utf8
from mistura.infer.sampling import Sampling
from mistura.loading import load, load_tokenizer
from mistura.model import Transformer

OnText = Callable[[str], None]
# (prompt ids, sampling with the template's stop strings, end-of-turn id, on_text) -> the reply's text
Generate = Callable[[list[int], Sampling, int, OnText], str]
ReadLine = Callable[[], str | None]  # the user's next line, None at the end of the input

PROMPT = "> "
HELP = """commands:
  /sair, /exit      end the conversation (Ctrl-D too)
  /limpar, /clear   forget the conversation so far
  /ajuda, /help     this list
Ctrl-C stops a reply."""


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
        eos_id = template.eos_id(tokenizer)
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
        return self.template.encode(self.tokenizer, [*self.system, *turns])

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
