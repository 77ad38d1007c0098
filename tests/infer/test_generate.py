"""Text generation: incremental decoding, stop strings, batches of text prompts, prompts files."""

import json

import pytest
import torch

from mistura.config import ModelConfig
from mistura.data.tokenizer import BOS_ID, load_tokenizer
from mistura.errors import DataError
from mistura.infer.generate import TextStream, generate_file, generate_text
from mistura.infer.sampling import Sampling
from mistura.model import Transformer

TEXT = "Capitu olhou para mim, e disse: — Não é nada.\n\nFim do capítulo. Ação, coração!"


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return load_tokenizer(prepared / "tokenizer.json")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = dict(vocab_size=tokenizer.get_vocab_size(), max_seq_len=64, n_layer=2, d_model=32, n_head=4, d_ff=64)
    return Transformer(ModelConfig.from_name("llama-tiny", **config)).eval()


def stream(tokenizer, text: str, stop=()) -> tuple[TextStream, list[str]]:
    s = TextStream(tokenizer, stop)
    pieces = [s.push(i) for i in tokenizer.encode(text).ids]
    return s, [*pieces, s.finish()]


def test_incremental_decoding_rebuilds_the_text(tokenizer):
    s, pieces = stream(tokenizer, TEXT)
    assert "".join(pieces) == s.text == tokenizer.decode(tokenizer.encode(TEXT).ids)
    assert sum(1 for p in pieces if p) > 10  # streamed, not all at the end
    assert not any("\ufffd" in p for p in pieces)  # no half of an accented letter


@pytest.mark.parametrize("stop", [("\n\n",), ("capítulo", "nada"), ("— Não",)])
def test_stop_strings_end_the_text_and_never_show_in_the_stream(tokenizer, stop):
    s, pieces = stream(tokenizer, TEXT, stop)
    first = min(TEXT.index(x) for x in stop)
    assert s.stopped and s.text == TEXT[:first] and "".join(pieces) == s.text
    assert all(x not in "".join(pieces) for x in stop)


def test_a_partial_stop_string_is_released_at_the_end(tokenizer):
    s, pieces = stream(tokenizer, "Era uma vez\n", ("\nFim",))
    assert not s.stopped and pieces[-1].endswith("\n") and "".join(pieces) == "Era uma vez\n"


def test_text_batch_equals_prompts_one_by_one(model, tokenizer):
    prompts = ["Capitu", "O amor é uma coisa", "Naquele tempo, a cidade"]
    settings = Sampling(max_new_tokens=12, temperature=0)
    streamed = {}
    batched = generate_text(
        model, tokenizer, prompts, settings, on_text=lambda row, t: streamed.update({row: streamed.get(row, "") + t})
    )
    assert batched == [generate_text(model, tokenizer, [p], settings)[0] for p in prompts]
    assert streamed == {row: text for row, text in enumerate(batched) if text}


def test_stop_strings_cut_each_row_of_a_batch(model, tokenizer):
    prompts = ["Capitu", "O amor é uma coisa"]
    free = generate_text(model, tokenizer, prompts, Sampling(max_new_tokens=20, temperature=0))
    stop = free[0][3:6]
    cut = generate_text(model, tokenizer, prompts, Sampling(max_new_tokens=20, temperature=0, stop=(stop,)))
    for full, short in zip(free, cut, strict=True):
        assert short == (full[: full.index(stop)] if stop in full else full)


def test_prompts_as_token_ids_are_taken_as_they_are(model, tokenizer, monkeypatch):
    import mistura.infer.generate as text_generation

    seen = []
    monkeypatch.setattr(text_generation, "generate", lambda model, rows, *args, **kwargs: seen.extend(rows))
    ids = tokenizer.encode("Capitu").ids
    generate_text(model, tokenizer, [ids, "Capitu"], Sampling())
    assert seen == [ids, [BOS_ID, *ids]]


def test_prompts_file_in_batches_equals_one_batch(model, tokenizer, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Capitu\nO amor é\nNaquele tempo\nEra uma vez\nDom Casmurro\n", encoding="utf-8")
    settings = Sampling(max_new_tokens=6, temperature=0)
    batches = []
    assert generate_file(model, tokenizer, prompts, tmp_path / "a.jsonl", settings, 2, on_batch=batches.append) == 5
    generate_file(model, tokenizer, prompts, tmp_path / "b.jsonl", settings, batch_size=8)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert batches == [2, 2, 1] and [r["prompt"] for r in rows][:2] == ["Capitu", "O amor é"]
    assert (tmp_path / "a.jsonl").read_text(encoding="utf-8") == (tmp_path / "b.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "content, message",
    [(b"um\n\ndois\n", "line 2: empty prompt"), (b"ol\xe1\n", "not UTF-8"), (b"  \n", "line 1: empty prompt")],
)
def test_malformed_prompts_file_is_a_clear_error_and_writes_nothing(model, tokenizer, tmp_path, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    with pytest.raises(DataError, match=message):
        generate_file(model, tokenizer, prompts, tmp_path / "out.jsonl", Sampling())
    assert list(tmp_path.iterdir()) == [prompts]


def test_empty_prompt_is_a_clear_error(model, tokenizer):
    with pytest.raises(DataError, match="the prompt is empty"):
        generate_text(model, tokenizer, ["Capitu", " \n"], Sampling())
