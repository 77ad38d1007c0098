import importlib
import json
import math

import numpy as np
import pytest

from mistura.data import (
    BOS_ID,
    EOS_ID,
    load_corpus,
    load_meta,
    load_tokenizer,
    open_tokens,
    prepare,
    train_tokenizer,
    unigram_loss,
)
from mistura.errors import DataError

prepare_module = importlib.import_module("mistura.data.prepare")  # `mistura.data.prepare` is the function

VOCAB = 600


@pytest.fixture(scope="module")
def prepared(small_corpus, tmp_path_factory):
    """A folder prepared from the small corpus, with the report lines it logged."""
    out_dir = tmp_path_factory.mktemp("prepared") / "small"
    lines = []
    meta = prepare(
        str(small_corpus), out_dir, vocab_size=VOCAB, val_fraction=0.2, seed=3, progress=False, log=lines.append
    )
    return out_dir, meta, lines


def _documents_in(tokens):
    """Split a bin back into its documents, checking each sits between BOS and EOS."""
    ends = np.flatnonzero(tokens == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert ends[-1] == len(tokens) - 1
    assert (tokens[starts] == BOS_ID).all()
    return [tokens[start + 1 : end].tolist() for start, end in zip(starts, ends)]


def test_prepared_folder_holds_what_meta_says(prepared):
    out_dir, meta, lines = prepared
    assert sorted(p.name for p in out_dir.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["small"]  # no staging folder left behind
    assert load_meta(out_dir) == meta == json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    assert set(meta) == set(prepare_module.META_KEYS)
    assert (meta["vocab_size"], meta["dtype"], meta["seed"], meta["val_fraction"]) == (VOCAB, "uint16", 3, 0.2)
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2)
    assert len(open_tokens(out_dir / "train.bin", meta["dtype"])) == meta["train_tokens"]
    assert len(open_tokens(out_dir / "val.bin", meta["dtype"])) == meta["val_tokens"]
    assert 1.0 < meta["fertility"] < 4.0
    assert len(lines) == 2 and "fertility" in lines[1]


def test_bins_hold_whole_documents_split_by_work(prepared, small_corpus):
    out_dir, meta, _ = prepared
    documents = {doc.name: doc.text for doc in load_corpus(str(small_corpus))}
    assert sorted(meta["train_documents"] + meta["val_documents"]) == sorted(documents)
    assert not set(meta["train_documents"]) & set(meta["val_documents"])
    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    for split in ("train", "val"):
        decoded = [tokenizer.decode(ids) for ids in _documents_in(open_tokens(out_dir / f"{split}.bin", "uint16"))]
        assert decoded == [documents[name] for name in meta[f"{split}_documents"]]


def test_tokenizer_sees_only_training_works(prepared, small_corpus):
    out_dir, meta, _ = prepared
    documents = {doc.name: doc.text for doc in load_corpus(str(small_corpus))}
    expected = train_tokenizer([documents[name] for name in meta["train_documents"]], VOCAB)
    assert load_tokenizer(out_dir / "tokenizer.json").get_vocab() == expected.get_vocab()


def test_unigram_loss_by_hand(prepared):
    # counts + 1 over a vocabulary of 3: [3, 2, 1] out of 6
    assert unigram_loss(np.array([0, 0, 1]), np.array([0, 1]), 3) == pytest.approx(
        -(math.log(3 / 6) + math.log(2 / 6)) / 2
    )
    out_dir, meta, _ = prepared
    train, val = (open_tokens(out_dir / f"{split}.bin", "uint16") for split in ("train", "val"))
    assert meta["unigram_loss"] == pytest.approx(unigram_loss(train, val, VOCAB))
    assert 3.0 < meta["unigram_loss"] < math.log(VOCAB)


def test_same_seed_same_bytes(prepared, small_corpus, tmp_path):
    out_dir, _, _ = prepared
    prepare(
        str(small_corpus), tmp_path / "again", vocab_size=VOCAB, val_fraction=0.2, seed=3, progress=False, log=print
    )
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out_dir / name).read_bytes()


def test_prepare_replaces_its_own_output_only(small_corpus, tmp_path):
    out_dir = tmp_path / "data"
    prepare(str(small_corpus), out_dir, vocab_size=300, progress=False, log=print)
    meta = prepare(str(small_corpus), out_dir, vocab_size=400, progress=False, log=print)
    assert load_meta(out_dir)["vocab_size"] == meta["vocab_size"] == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    with pytest.raises(DataError, match="is not a prepared data folder; choose another"):
        prepare(str(small_corpus), small_corpus, vocab_size=300, progress=False, log=print)


def test_a_failed_prepare_keeps_the_previous_data(small_corpus, tmp_path, monkeypatch):
    out_dir = tmp_path / "data"
    before = prepare(str(small_corpus), out_dir, vocab_size=300, progress=False, log=print)

    def disk_full(ids, path, vocab_size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module, "write_tokens", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare(str(small_corpus), out_dir, vocab_size=400, progress=False, log=print)
    assert load_meta(out_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_load_meta_explains_an_unprepared_folder(prepared, tmp_path):
    with pytest.raises(DataError, match="missing meta.json, tokenizer.json, train.bin, val.bin.*mistura prepare"):
        load_meta(tmp_path / "nowhere")
    out_dir, meta, _ = prepared
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        (broken / name).write_bytes((out_dir / name).read_bytes())
    with pytest.raises(DataError, match=r"\(missing meta.json\)"):
        load_meta(broken)
    (broken / "meta.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        load_meta(broken)
    (broken / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "dtype"}), encoding="utf-8")
    with pytest.raises(DataError, match="lacks dtype"):
        load_meta(broken)
    (broken / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (broken / "val.bin").write_bytes((out_dir / "val.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="val.bin has .* bytes but meta.json counts"):
        load_meta(broken)
