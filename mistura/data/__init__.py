"""Corpora, tokenizer and token bins: everything between raw text and a training batch.

    load_corpus ──▶ split_documents ──▶ train_tokenizer ──▶ write_tokens ──▶ BatchLoader
                     (whole works)        (train works)     (train.bin, val.bin)

`prepare` runs that chain into a folder; `load_meta` reads the folder back.
"""

from mistura.data.bins import BatchLoader, open_tokens, token_dtype, write_tokens
from mistura.data.corpus import (
    Document,
    clean_text,
    load_corpus,
    load_machado,
    load_text_dir,
    split_documents,
)
from mistura.data.gutenberg import download_gutenberg_pt, strip_gutenberg_boilerplate
from mistura.data.prepare import load_meta, prepare, unigram_loss
from mistura.data.tokenizer import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    encode_text,
    fertility,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS",
    "BOS_ID",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "BatchLoader",
    "Document",
    "clean_text",
    "download_gutenberg_pt",
    "encode_text",
    "fertility",
    "load_corpus",
    "load_machado",
    "load_meta",
    "load_text_dir",
    "load_tokenizer",
    "open_tokens",
    "prepare",
    "split_documents",
    "strip_gutenberg_boilerplate",
    "token_dtype",
    "train_tokenizer",
    "unigram_loss",
    "write_tokens",
]
