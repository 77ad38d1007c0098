"""Perplexity of a checkpoint on any UTF-8 text, with a sliding window (Hugging Face's strided perplexity).

    result = evaluate_text(model, tokenizer, read_texts("corpus/"), ctx=128, stride=64)
    result.perplexity, result.bits_per_byte, result.tokens_per_word

Each document is encoded as the model was trained on it, BOS then its tokens, and every token after
BOS is scored once. A window of `ctx` tokens moves `stride` tokens at a time; it scores only the
tokens the previous window did not, so each of them, past the first window, sees at least
ctx - stride tokens before it (stride ctx - 1: nearly disjoint windows, cheapest; stride 1: the
most context, the cost of one forward per token).

Perplexity depends on the tokenizer: a model that cuts text into more, easier tokens scores lower.
Bits per byte (the total negative log-likelihood over the text's UTF-8 bytes, in bits) does not,
so models with different tokenizers compare fairly on it; tokens per word tells how finely each
tokenizer cuts the text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from mistura.data.tokenizer import BOS_ID, encode_text
from mistura.errors import ConfigError, DataError
from mistura.model import Transformer

LOGITS_BYTES = 2**28  # fp32 logits of a batch of windows: 256 MiB


@dataclass
class TextScore:
    tokens: int  # tokens scored (every token after each document's BOS)
    nll: float  # their total negative log-likelihood, nats
    bytes: int  # the texts' UTF-8 bytes
    words: int  # whitespace-separated words
    documents: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token, nats."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words

    def summary(self) -> dict:
        """Every count and figure, for the JSON result."""
        figures = ("loss", "perplexity", "bits_per_byte", "tokens_per_word")
        return asdict(self) | {name: getattr(self, name) for name in figures}


def read_texts(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) of a text file, or of every .txt file under a folder in name order; DataError for a missing
    path, a folder without .txt files, text that is not UTF-8, or nothing but whitespace."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .txt files in this folder")
    texts = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{file}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        if text.strip():
            texts.append((str(file), text))
    if not texts:
        raise DataError(f"{path}: the text is empty")
    return texts


def windows(length: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) of each window over `length` tokens: it reads [begin, end), at most ctx tokens, and
    scores the tokens [first, end), those the windows before did not: the first window all of them but token
    0 (BOS), every later one the next `stride` tokens, after the ctx - stride before them."""
    spans, first, end = [], 1, min(ctx, length)
    while first < length:
        spans.append((max(0, end - ctx), end, first))
        first, end = end, min(end + stride, length)
    return spans


def check_window(ctx: int, stride: int, max_seq_len: int) -> None:
    if not 2 <= ctx <= max_seq_len:
        raise ConfigError(f"--ctx must be between 2 and the model's context of {max_seq_len} tokens, got {ctx}")
    if not 1 <= stride < ctx:
        raise ConfigError(
            f"--stride must be between 1 and --ctx - 1 ({ctx - 1}): a window scores its new tokens "
            f"after at least one it read before, got {stride}"
        )


@torch.no_grad()
def evaluate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: list[tuple[str, str]],
    ctx: int,
    stride: int,
    progress: bool = False,
) -> TextScore:
    """Score `texts` with windows of ctx tokens moving by stride, with a progress bar over the windows."""
    check_window(ctx, stride, model.config.max_seq_len)
    documents = [[BOS_ID, *encode_text(tokenizer, text)] for _, text in texts]
    spans = [(ids, *span) for ids in documents for span in windows(len(ids), ctx, stride)]
    with tqdm(total=len(spans), unit="window", disable=not progress) as bar:
        nll = spans_nll(model, spans, ctx, bar.update)
    tokens = sum(len(ids) - 1 for ids in documents)
    text_bytes = sum(len(text.encode("utf-8")) for _, text in texts)
    words = sum(len(text.split()) for _, text in texts)
    return TextScore(tokens, nll, text_bytes, words, len(texts))


def score_checkpoint(
    checkpoint: str | Path,
    path: str | Path,
    ctx: int | None = None,
    stride: int | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """`mistura eval CKPT --text PATH` as a dict: the window (ctx: the model's context, stride: half of it) and
    every figure of TextScore.summary."""
    from mistura.loading import load, load_tokenizer

    texts = read_texts(path)
    model = load(checkpoint, device, dtype)
    ctx = ctx or model.config.max_seq_len
    stride = stride or max(1, ctx // 2)
    score = evaluate_text(model, load_tokenizer(checkpoint), texts, ctx, stride, progress)
    return {"checkpoint": str(checkpoint), "text": str(path), "ctx": ctx, "stride": stride} | score.summary()


def spans_nll(
    model: Transformer,
    spans: list[tuple[list[int], int, int, int]],
    ctx: int,
    done: Callable[[int], object] = lambda n: None,
) -> float:
    """The summed negative log-likelihood of the scored tokens of windows (ids, begin, end, first), those of a
    length batched together (their logits within about LOGITS_BYTES); done(n) is told of every n finished."""
    spans = sorted(spans, key=lambda span: span[2] - span[1])  # by length: full windows together
    per_batch = max(1, LOGITS_BYTES // (4 * ctx * model.config.vocab_size))
    nll = 0.0
    for _, group in groupby(spans, key=lambda span: span[2] - span[1]):
        group = list(group)
        for start in range(0, len(group), per_batch):
            nll += _batch_nll(model, group[start : start + per_batch])
            done(len(group[start : start + per_batch]))
    return nll


def _batch_nll(model: Transformer, spans: list[tuple[list[int], int, int, int]]) -> float:
    """The summed negative log-likelihood of the scored tokens of windows of one length."""
    device = model.tok_emb.weight.device
    x = torch.tensor([ids[begin:end] for ids, begin, end, _ in spans], device=device)  # (B, T)
    logits = model(x)[:, :-1].float()  # (B, T - 1, V): token t + 1 predicted at t
    losses = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, T - 1)
    first = torch.tensor([first - begin - 1 for _, begin, _, first in spans], device=device)  # (B,)
    scored = torch.arange(x.shape[1] - 1, device=device)[None, :] >= first[:, None]  # (B, T - 1)
    return losses[scored].sum().item()
