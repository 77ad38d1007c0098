import shutil

import pytest

from mistura.chat_template import ChatTemplate
from mistura.data.tokenizer import BOS_ID, EOS_ID
from mistura.errors import DataError
from mistura.loading import load_tokenizer
from mistura.train.loop import IGNORE
from mistura.tune.data import Conversation
from mistura.tune.encode import Encoder
from mistura.tune.template import SCRIPT_WITH_EOS, is_own, tuning_template

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders the last message alone in capitals: earlier turns look different once a later one follows.
SHIFTY = (
    "{% for message in messages %}"
    "{% if loop.last %}{{ message.content | upper }}{% else %}{{ message.content }}{% endif %}\n"
    "{% endfor %}"
)
MESSAGES = (
    {"role": "system", "content": "Seja breve."},
    {"role": "user", "content": "Quem é Capitu?"},
    {"role": "assistant", "content": "Capitu tinha olhos de cigana."},
    {"role": "user", "content": "E o amor?"},
    {"role": "assistant", "content": "Uma planta que cresce devagar."},
)


def conversation(*messages):
    return Conversation(tuple(messages or MESSAGES), "data.jsonl, line 1")


def learnt_text(tokenizer, example) -> list[str]:
    """The learnt tokens' text, one string per run of consecutive learnt positions."""
    runs, current = [], []
    for token, label in zip(example.ids, example.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def test_the_script_learns_each_reply_and_its_eos_and_nothing_else(base):
    tokenizer = load_tokenizer(base)
    template = tuning_template(base)
    assert template.source == SCRIPT_WITH_EOS and not is_own(template)
    example = Encoder(tokenizer, template, 128).encode(conversation())
    assert example.ids[0] == BOS_ID and BOS_ID not in example.ids[1:]
    assert tokenizer.decode(list(example.ids), skip_special_tokens=False) == (
        "<|bos|>Seja breve.\nUsuário: Quem é Capitu?\nAssistente: Capitu tinha olhos de cigana.<|eos|>\n"
        "Usuário: E o amor?\nAssistente: Uma planta que cresce devagar.<|eos|>\n"
    )
    assert learnt_text(tokenizer, example) == [
        " Capitu tinha olhos de cigana.<|eos|>",
        " Uma planta que cresce devagar.<|eos|>",
    ]
    assert example.learnt == sum(label != IGNORE for label in example.labels)


def test_a_checkpoint_template_is_used_and_its_reply_span_ends_at_the_eos(base, tmp_path):
    folder = shutil.copytree(base, tmp_path / "ckpt")
    (folder / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    template = tuning_template(folder)
    assert is_own(template)
    tokenizer = load_tokenizer(folder)
    example = Encoder(tokenizer, template, 64).encode(conversation(*MESSAGES[1:3]))
    assert learnt_text(tokenizer, example) == ["Capitu tinha olhos de cigana.<|eos|>"]  # not the "\n" after it
    assert example.ids[-2] == EOS_ID and example.labels[-1] == IGNORE


def test_a_template_whose_prefixes_render_differently_is_refused(base):
    encoder = Encoder(load_tokenizer(base), ChatTemplate(SHIFTY, where="shifty"), 64)
    with pytest.raises(DataError, match="line 1: the chat template's rendering of the conversation up to message 2"):
        encoder.encode(conversation(*MESSAGES[1:3]))


def test_a_token_merged_across_the_end_of_a_reply_is_refused(base):
    bare = ChatTemplate("{% for message in messages %}{{ message.content }}{% endfor %}", where="bare")
    reply, user = {"role": "assistant", "content": "Capi"}, {"role": "user", "content": "tu tinha olhos"}
    with pytest.raises(DataError, match="rendering of the conversation through message 2 is not a token prefix"):
        Encoder(load_tokenizer(base), bare, 64).encode(conversation(MESSAGES[1], reply, user))  # "Capitu" is one token


def test_a_template_that_cannot_format_the_data_is_an_error_naming_the_line(base):
    refuses = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    encoder = Encoder(load_tokenizer(base), ChatTemplate(refuses + CHATML, where="strict"), 64)
    with pytest.raises(DataError, match="line 1: the chat template cannot format this conversation: .*no system role"):
        encoder.encode(conversation())


def test_a_conversation_longer_than_the_context_is_an_error_naming_the_line(base):
    encoder = Encoder(load_tokenizer(base), tuning_template(base), 16)
    with pytest.raises(DataError, match=r"line 1: the formatted conversation takes \d+ tokens, more than .* 16"):
        encoder.encode(conversation())
