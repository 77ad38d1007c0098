import pytest

from mistura.errors import DataError
from mistura.tune.encode import Encoder
from mistura.tune.prompts import columns, encode_prompts, read_prompts
from mistura.tune.template import tuning_template
from tests.tune.conftest import PAIRS, TOY


def test_a_pairs_file_is_a_prompt_file_with_its_other_keys_as_columns(pairs):
    prompts = read_prompts(pairs)
    assert [p.text for p in prompts] == [p["prompt"] for p in PAIRS]
    assert columns(prompts)["chosen"] == [p["chosen"] for p in PAIRS]
    assert prompts[1].where.endswith("pairs.jsonl, line 2")


def test_a_conversation_file_gives_its_prompts_and_their_answers(toy):
    prompts = read_prompts(toy)
    assert [p.text for p in prompts] == ["Quem tinha olhos de cigana?", "Quem escreveu Dom Casmurro?"] + [
        "Olhos de cigana?",
        "Quem escreveu?",
    ]
    assert columns(prompts)["answer"] == [line.get("completion") or line["messages"][-1]["content"] for line in TOY]


def test_a_prompt_is_formatted_up_to_the_assistants_cue(base, pairs):
    template = tuning_template(base)
    encoder = Encoder(__import__("mistura").load_tokenizer(base), template, 64)
    prompt = encode_prompts(read_prompts(pairs)[:1], encoder, 8)[0]
    text = template.render([{"role": "user", "content": PAIRS[0]["prompt"]}], add_generation_prompt=True)
    assert encoder.tokenizer.decode(list(prompt.ids), skip_special_tokens=False) == text


def test_columns_missing_from_a_line_are_none(jsonl):
    prompts = read_prompts(jsonl("p.jsonl", [{"prompt": "a", "answer": "x"}, {"prompt": "b"}]))
    assert columns(prompts) == {"answer": ["x", None]}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a"}'], "line 1: 'prompt' must be a non-empty string"),
        (['{"prompt": "a"}', '{"prompt": "  "}'], "line 2: 'prompt' must be a non-empty string"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (["{nope"], "line 1: not valid JSON"),
        ([], "holds no prompts"),
        (
            [
                '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                '{"role": "assistant", "content": "c"}]}'
            ],
            "must end with a user message and its answer",
        ),
        (['{"messages": []}'], "'messages' is empty"),
    ],
)
def test_bad_prompt_files_name_the_line(jsonl, lines, message):
    with pytest.raises(DataError, match=message):
        read_prompts(jsonl("bad.jsonl", lines))


def test_a_prompt_that_leaves_no_room_for_the_reply_is_named(base, jsonl):
    encoder = Encoder(__import__("mistura").load_tokenizer(base), tuning_template(base), 64)
    prompts = read_prompts(jsonl("long.jsonl", [{"prompt": "curto"}, {"prompt": "Capitu " * 40}]))
    with pytest.raises(DataError, match=r"long.jsonl, line 2: the formatted prompt takes \d+ tokens"):
        encode_prompts(prompts, encoder, 8)
