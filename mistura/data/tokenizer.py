"""A byte-level BPE tokenizer trained on the corpus, with three special tokens at fixed ids.

Byte-level means text is first turned into UTF-8 bytes, each byte shown as one of 256
printable characters, and BPE merges are learnt over those. Every one of the 256
bytes is in the initial alphabet, so any string can be encoded (no unknown token),
and decoding the ids gives back the exact text, after NFC normalisation: "ç" typed
as "c" + combining cedilla comes back as the single character "ç".

The special tokens come first, so their ids never depend on the corpus:

    0  <|pad|>   padding in batched generation; never in the token bins
    1  <|bos|>   starts every document in the bins
    2  <|eos|>   ends every document in the bins
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mistura.errors import ConfigError, DataError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = (PAD, BOS, EOS)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Learn BPE merges from `texts` until the vocabulary holds `vocab_size` tokens.

    A corpus too small to supply that many merges yields a smaller vocabulary:
    `get_vocab_size()` tells the real size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
            f"got {vocab_size}"
        )
    tokenizer = byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def byte_level(model: models.Model) -> Tokenizer:
    """A tokenizer of `model` as mistura's are: text normalised to NFC, then GPT-2's byte-level pre-tokenizer
    (its regex, no prefix space) and decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer saved by `Tokenizer.save`, checked to carry the special tokens at their ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for any unreadable file
        raise DataError(f"{path} is not a tokenizer file: {error}") from error
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID)):
        if tokenizer.token_to_id(token) != expected:
            raise DataError(f"{path}: special token {token} should have id {expected}, not a mistura tokenizer?")
    return tokenizer


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text).ids`, computed line by line on all cores.

    Encoding one long string runs on a single core and slows down with its length;
    its lines, encoded as a batch, spread over the cores. The byte-level
    pre-tokenizer never joins a single newline to the next line, so for text without
    blank lines (what `clean_text` produces) the ids are the same.
    """
    encodings = tokenizer.encode_batch(text.splitlines(keepends=True))
    return [token for encoding in encodings for token in encoding.ids]


def fertility(tokenizer: Tokenizer, text: str) -> float:
    """Tokens per whitespace-separated word: 1.0 would mean one token per word.

    A tokenizer trained on Portuguese scores about 1.5 on Portuguese prose with an
    8k vocabulary; one trained on another language, or too small, scores far more.
    """
    words = len(text.split())
    if words == 0:
        raise DataError("cannot measure fertility on a text with no words")
    return len(encode_text(tokenizer, text)) / words
