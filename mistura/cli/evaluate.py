"""Scoring a checkpoint: `mistura eval CKPT --text FILE_OR_FOLDER` (perplexity, bits per byte, tokens per word)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mistura.cli.options import add_device_options, add_no_progress_option, device_and_dtype


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval` to the subcommands."""
    p = sub.add_parser(
        "eval", help="perplexity, bits per byte and tokens per word of a checkpoint on a UTF-8 text or folder of .txt"
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--text", required=True, help="a UTF-8 text file, or a folder of .txt files")
    p.add_argument("--ctx", type=int, help="tokens each window reads (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens each window moves (default: half of --ctx)")
    p.add_argument("--output", help="the JSON result (default: eval-CHECKPOINT-TEXT.json here)")
    add_device_options(p)
    add_no_progress_option(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    import time

    import mistura
    from mistura.atomic import atomic_write
    from mistura.eval.perplexity import evaluate_text, read_texts
    from mistura.loading import load_tokenizer

    texts = read_texts(args.text)
    model = mistura.load(args.checkpoint, *device_and_dtype(args))
    ctx = args.ctx or model.config.max_seq_len
    stride = args.stride or max(1, ctx // 2)
    begin = time.perf_counter()
    score = evaluate_text(model, load_tokenizer(args.checkpoint), texts, ctx, stride, progress=not args.no_progress)
    result = {
        "checkpoint": str(args.checkpoint),
        "text": str(args.text),
        "ctx": ctx,
        "stride": stride,
        **score.summary(),
        "seconds": round(time.perf_counter() - begin, 3),
    }
    print(
        f"{score.documents} document(s), {score.tokens:,} tokens, {score.bytes:,} bytes: perplexity "
        f"{score.perplexity:.3f}, {score.bits_per_byte:.4f} bits/byte, {score.tokens_per_word:.3f} tokens/word"
    )
    output = Path(args.output or f"eval-{Path(args.checkpoint).resolve().name}-{Path(args.text).stem}.json")
    with atomic_write(output) as file:
        file.write(json.dumps(result, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    print(f"wrote {output}")
