"""Corpus commands: `mistura prepare` trains a BPE tokenizer and writes token files, and
`mistura data gutenberg-pt` downloads Portuguese books to prepare.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `prepare` and `data` to the subcommands."""
    p = sub.add_parser("prepare", help="train a BPE tokenizer on a corpus and write token files")
    p.add_argument(
        "--source", default="machado", help="'machado' (embedded corpus), a folder of .txt files or a .txt file"
    )
    p.add_argument("--out", default="data/machado", help="output folder")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of the text, in whole works, kept for validation"
    )
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help="download corpora")
    datasets = p.add_subparsers(dest="dataset", required=True)
    g = datasets.add_parser("gutenberg-pt", help="Portuguese books from Project Gutenberg (needs internet)")
    g.add_argument("--books", type=int, default=100)
    g.add_argument("--out", default="data/gutenberg-pt")
    g.set_defaults(func=cmd_gutenberg)


def cmd_prepare(args: argparse.Namespace) -> None:
    from mistura.data.prepare import prepare

    prepare(args.source, Path(args.out), vocab_size=args.vocab_size, val_fraction=args.val_fraction, seed=args.seed)


def cmd_gutenberg(args: argparse.Namespace) -> None:
    from mistura.data.gutenberg import download_gutenberg_pt

    paths = download_gutenberg_pt(args.books, Path(args.out))
    print(f"{len(paths)} books in {args.out}; prepare them with: mistura prepare --source {args.out}")
