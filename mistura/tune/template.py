"""The chat template a fine-tune formats its data with: the base checkpoint's own, else the Portuguese script.

A base model has no chat template, and mistura.infer.chat talks to it in a script of
lines ("Usuário: ..." / "Assistente: ..."), its replies cut where it starts the next
user line. A fine-tune of it learns only the assistant's tokens, never the user line
that follows, so the script it learns ends each reply with the eos token as well:

    <|bos|>Usuário: De que obra é este trecho? ...
    Assistente: Dom Casmurro<|eos|>

Fine-tuned checkpoints save this template as chat_template.jinja, so `mistura chat` and
`mistura finetune-eval` format the conversation as training did and a reply ends at its
eos token. A checkpoint with a template of its own (chat_template.jinja, or the
chat_template of tokenizer_config.json) is fine-tuned, and saved, with that one.
"""

from __future__ import annotations

from pathlib import Path

from mistura.chat_template import ChatTemplate, load_chat_template

SCRIPT_WITH_EOS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'user' %}Usuário: {% elif message.role == 'assistant' %}Assistente: {% endif %}"
    "{{ message.content }}{{ eos_token if message.role == 'assistant' else '' }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistente:{% endif %}"
)


def tuning_template(checkpoint: str | Path) -> ChatTemplate:
    """The checkpoint's chat template, or SCRIPT_WITH_EOS for a checkpoint without one."""
    return load_chat_template(checkpoint, default=SCRIPT_WITH_EOS)


def is_own(template: ChatTemplate) -> bool:
    """Whether the template is the checkpoint's own rather than SCRIPT_WITH_EOS, which a fine-tune must save."""
    return template.source != SCRIPT_WITH_EOS
