"""`mistura prepare`: turn a corpus into the folder that training reads.

    data_dir/
      tokenizer.json   byte-level BPE, trained on the training works only
      train.bin        <|bos|> work <|eos|> <|bos|> work <|eos|> ... as token ids
      val.bin          the same for the validation works
      meta.json        how it was made and what it measured

Validation holds whole works that neither the tokenizer nor the model saw, so its loss
measures generalisation to unseen text, not memory of neighbouring paragraphs.

meta.json:
    source, seed, val_fraction        enough to make it again
    vocab_size, dtype                 the tokenizer's real vocabulary, the bins' dtype
    requested_vocab_size              the size asked for (a small corpus may give fewer)
    pad_id, bos_id, eos_id            the special tokens (fixed: 0, 1, 2)
    train_tokens, val_tokens          the bins' lengths
    train_documents, val_documents    which works went where
    fertility                         tokens per word on the validation text
    unigram_loss                      validation cross-entropy (nats per token) of
                                      token frequencies counted on train.bin, with
                                      add-one smoothing: the loss of a model that
                                      ignores context, which a trained model must beat

The folder is built under a hidden temporary name beside `data_dir` and renamed into
place at the end, so an interrupted run leaves the previous data as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mistura.atomic import atomic_directory
from mistura.data.bins import token_dtype, write_tokens
from mistura.data.corpus import Document, load_corpus, split_documents
from mistura.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_text, fertility, train_tokenizer
from mistura.errors import DataError

PREPARED_FILES = ("meta.json", "tokenizer.json", "train.bin", "val.bin")
META_KEYS = (
    "source", "vocab_size", "requested_vocab_size", "dtype", "train_tokens", "val_tokens",
    "train_documents", "val_documents",
    "fertility", "bos_id", "eos_id", "pad_id", "seed", "val_fraction", "unigram_loss",
)  # fmt: skip


def prepare(
    source: str = "machado",
    out_dir: str | Path = "data/machado",
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
    seed: int = 1337,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Load, split, train the tokenizer, encode and write `out_dir`; return its meta.json."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    train_docs, val_docs = split_documents(load_corpus(source), val_fraction, seed)
    tokenizer = train_tokenizer((doc.text for doc in train_docs), vocab_size, show_progress=progress)
    train_ids = _encode_documents(tokenizer, train_docs)
    val_ids = _encode_documents(tokenizer, val_docs)
    vocab = tokenizer.get_vocab_size()
    meta = {
        "source": source,
        "vocab_size": vocab,
        "requested_vocab_size": vocab_size,
        "dtype": token_dtype(vocab).name,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "train_documents": [doc.name for doc in train_docs],
        "val_documents": [doc.name for doc in val_docs],
        "fertility": fertility(tokenizer, "\n".join(doc.text for doc in val_docs)),
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "seed": seed,
        "val_fraction": val_fraction,
        "unigram_loss": unigram_loss(train_ids, val_ids, vocab),
    }
    with atomic_directory(out_dir) as staging:
        write_tokens(train_ids, staging / "train.bin", vocab)
        write_tokens(val_ids, staging / "val.bin", vocab)
        tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(
        f"prepared {source} in {out_dir}: {len(train_docs)} train / {len(val_docs)} validation works, "
        f"{len(train_ids):,} / {len(val_ids):,} tokens, vocabulary {vocab:,} ({meta['dtype']})"
    )
    log(
        f"fertility {meta['fertility']:.2f} tokens/word, unigram loss {meta['unigram_loss']:.3f} nats/token, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return meta


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Mean -log p(token) over `val_ids`, p being add-one-smoothed frequencies in `train_ids`."""
    counts = np.bincount(train_ids, minlength=vocab_size) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    return float(-log_probs[val_ids].mean())


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared folder, after checking the folder is complete and consistent."""
    data_dir = Path(data_dir)
    missing = [name for name in PREPARED_FILES if not (data_dir / name).is_file()]
    if missing:
        raise DataError(
            f"{data_dir} is not a prepared data folder (missing {', '.join(missing)}); "
            f"run `mistura prepare` to create it"
        )
    try:
        meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"{data_dir / 'meta.json'} is not valid JSON ({error}); run `mistura prepare` again") from error
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise DataError(f"{data_dir / 'meta.json'} lacks {', '.join(missing)}; run `mistura prepare` again")
    for split in ("train", "val"):
        size = (data_dir / f"{split}.bin").stat().st_size
        if size != meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize:
            raise DataError(
                f"{data_dir / f'{split}.bin'} has {size} bytes but meta.json counts {meta[f'{split}_tokens']} "
                f"{meta['dtype']} tokens; run `mistura prepare` again"
            )
    return meta


def _encode_documents(tokenizer: Tokenizer, documents: list[Document]) -> np.ndarray:
    return np.concatenate(
        [np.array([BOS_ID, *encode_text(tokenizer, doc.text), EOS_ID], dtype=np.uint32) for doc in documents]
    )


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but an earlier `prepare`'s output."""
    if out_dir.exists() and not (out_dir / "meta.json").is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not a prepared data folder; choose another output folder")
