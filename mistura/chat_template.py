"""A checkpoint's chat template: Hugging Face's convention, read where a checkpoint keeps it.

A Jinja template in `chat_template.jinja`, or the `chat_template` field of
`tokenizer_config.json`, rendered with `messages` (a list of {"role", "content"}),
`add_generation_prompt`, `bos_token` and `eos_token`. A base model, which has none, gets
DEFAULT_TEMPLATE, a script of lines ("Usuário: ...", "Assistente: ..."), whose replies end where
the model starts the next user line (DEFAULT_STOP). Chat (mistura.infer.chat), fine-tuning,
serving and GGUF export all read it from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from mistura.checkpoint import resolve
from mistura.data.tokenizer import BOS, EOS
from mistura.errors import CheckpointError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}

DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}Usuário: {% elif message.role == 'assistant' %}Assistente: {% endif %}"
    "{{ message.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistente:{% endif %}"
)
DEFAULT_STOP = ("\nUsuário:",)


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

    def encode(self, tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """The ids of the rendered conversation: its special tokens come from the template's text, none added."""
        return tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def eos_id(self, tokenizer: Tokenizer) -> int:
        """The id of eos_token, which ends a reply; a CheckpointError if the tokenizer lacks it."""
        eos_id = tokenizer.token_to_id(self.eos_token)
        if eos_id is None:
            raise CheckpointError(f"{self.where}: eos_token {self.eos_token!r} is not in the tokenizer")
        return eos_id

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
