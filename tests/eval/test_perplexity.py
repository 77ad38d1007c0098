"""`mistura eval --text`: strided perplexity scores every token once, with the context the stride promises,
and bits per byte and tokens per word follow from the same sums."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mistura.cli import main
from mistura.data.tokenizer import BOS_ID, encode_text
from mistura.errors import ConfigError
from mistura.eval.perplexity import evaluate_text, windows
from mistura.loading import load_tokenizer
from tests.eval.conftest import TEXT


@pytest.mark.parametrize(
    ("length", "ctx", "stride"), [(2, 4, 3), (10, 4, 3), (11, 4, 1), (50, 16, 5), (16, 16, 8), (17, 16, 15)]
)
def test_windows_score_every_token_once_with_the_promised_context(length, ctx, stride):
    scored = []
    for begin, end, first in windows(length, ctx, stride):
        assert end - begin <= ctx and begin < first <= end
        assert begin == 0 or first - begin >= ctx - stride  # each scored token sees ctx - stride before it
        scored += range(first, end)
    assert scored == list(range(1, length))


@torch.no_grad()
def test_stride_one_equals_each_token_scored_on_its_full_window(checkpoint):
    import mistura

    model, tokenizer = mistura.load(checkpoint), load_tokenizer(checkpoint)
    ids = [BOS_ID, *encode_text(tokenizer, TEXT)]
    assert len(ids) > 16
    nll = 0.0
    for i in range(1, len(ids)):  # token i, after the ctx - 1 tokens before it
        context = torch.tensor([ids[max(0, i - 15) : i + 1]])
        nll += F.cross_entropy(model(context)[0, -2], context[0, -1]).item()
    score = evaluate_text(model, tokenizer, [("t", TEXT)], ctx=16, stride=1)
    assert score.tokens == len(ids) - 1 and score.nll == pytest.approx(nll, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode("utf-8")))
    assert score.tokens_per_word == pytest.approx((len(ids) - 1) / len(TEXT.split()))
    wider = evaluate_text(model, tokenizer, [("t", TEXT)], ctx=16, stride=15)
    assert wider.tokens == score.tokens and wider.nll != pytest.approx(score.nll)
    with pytest.raises(ConfigError, match="--ctx must be between 2 and the model's context of 16"):
        evaluate_text(model, tokenizer, [("t", TEXT)], ctx=17, stride=1)
    with pytest.raises(ConfigError, match="--stride must be between 1 and --ctx - 1"):
        evaluate_text(model, tokenizer, [("t", TEXT)], ctx=8, stride=0)


def test_the_cli_scores_a_folder_and_writes_json(checkpoint, tmp_path, capsys):
    folder = tmp_path / "textos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT, encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(TEXT.upper(), encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    output = tmp_path / "r.json"
    assert main(["eval", str(checkpoint), "--text", str(folder), "--stride", "4", "--output", str(output)]) == 0
    assert "2 document(s)" in capsys.readouterr().out
    result = json.loads(output.read_text())
    assert result["documents"] == 2 and result["ctx"] == 16 and result["stride"] == 4
    assert result["bytes"] == 2 * len(TEXT.encode("utf-8")) and result["words"] == 2 * len(TEXT.split())
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"] / result["tokens"]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nope.txt", "no such file or folder"),
        (lambda p: p, "no .txt files in this folder"),
        (lambda p: (p / "x.txt").write_bytes(b"Capitu \xff\xfe") and p / "x.txt", "not UTF-8 text (byte 7"),
        (lambda p: (p / "x.txt").write_text(" \n ") and p / "x.txt", "the text is empty"),
    ],
    ids=["missing", "empty-folder", "not-utf8", "blank"],
)
def test_bad_texts_are_clear_errors(checkpoint, tmp_path, capsys, make, message):
    assert main(["eval", str(checkpoint), "--text", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_window_or_checkpoint_is_a_clear_error(checkpoint, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    assert main(["eval", str(checkpoint), "--text", str(tmp_path / "a.txt"), "--ctx", "64"]) == 2
    assert "--ctx must be between 2 and the model's context of 16 tokens, got 64" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none"), "--text", str(tmp_path / "a.txt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
