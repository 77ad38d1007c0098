import pytest

from mistura.errors import DataError
from mistura.tune.data import hold_out, read_conversations

USER = {"role": "user", "content": "Olá"}
REPLY = {"role": "assistant", "content": "Bom dia."}
GOOD = {"messages": [USER, REPLY]}


def test_both_formats_read_as_conversations_and_blank_lines_are_skipped(jsonl):
    path = jsonl("data.jsonl", [GOOD, "", {"prompt": "Olá", "completion": "Bom dia.", "id": 7}])
    first, second = read_conversations(path)
    assert first.messages == second.messages == (USER, REPLY)
    assert first.where == f"{path}, line 1" and second.where == f"{path}, line 3"


@pytest.mark.parametrize(
    "line, says",
    [
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ({"text": "Olá"}, "expected a 'messages' list or 'prompt' and 'completion'"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": "Olá"}, "'messages' must be a list"),
        ({"messages": [USER]}, "no assistant message"),
        ({"messages": [USER, "Bom dia."]}, "message 2 must be an object"),
        ({"messages": [USER, {"role": "bot", "content": "Oi"}]}, "message 2 has role 'bot'"),
        ({"messages": [USER, {"role": "assistant", "content": " \n"}]}, "message 2 (assistant) has no content"),
        ({"messages": [USER, {"role": "assistant"}]}, "message 2 (assistant) has no content"),
        ({"messages": [USER, REPLY, {"role": "system", "content": "S"}]}, "only the first message"),
        ({"prompt": "Olá"}, "'completion' must be a string"),
        ({"prompt": "Olá", "completion": ""}, "message 2 (assistant) has no content"),
        ({"prompt": "Olá", "completion": "Oi", "messages": [USER, REPLY]}, "not both"),
    ],
)
def test_a_malformed_line_is_an_error_naming_it(jsonl, line, says):
    path = jsonl("data.jsonl", [GOOD, GOOD, line])
    with pytest.raises(DataError, match=f"{path}, line 3: ") as error:
        read_conversations(path)
    assert says in str(error.value)


@pytest.mark.parametrize("content, says", [(None, "not found"), (b"", "holds no examples"), (b"\xff\n", "not UTF-8")])
def test_a_missing_empty_or_binary_file_is_an_error(tmp_path, content, says):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=says):
        read_conversations(path)


def test_hold_out_is_seeded_disjoint_and_keeps_the_file_order(jsonl):
    conversations = read_conversations(jsonl("data.jsonl", [GOOD] * 20))
    train, val = hold_out(conversations, 0.2, seed=3)
    assert (train, val) == hold_out(conversations, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert {c.where for c in train}.isdisjoint(c.where for c in val)
    lines = [int(c.where.rsplit(" ", 1)[1]) for c in train]
    assert lines == sorted(lines)
    assert hold_out(conversations, 0.2, seed=4)[1] != val
    with pytest.raises(DataError, match="single example"):
        hold_out(conversations[:1], 0.2, seed=3)
