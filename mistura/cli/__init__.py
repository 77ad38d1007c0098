"""The `mistura` command line. Each module of this package registers one group of subcommands,
which parse their flags and call the library; a command imports what it needs (torch, the
trainer, transformers) only when it runs, so `mistura --help` stays fast.
"""

from __future__ import annotations

import argparse

from mistura._entry import run_command
from mistura.cli import align, convert, data, evaluate, generate, lora, serve, study, train, tune

GROUPS = (data, train, tune, align, generate, serve, evaluate, study, convert, lora)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, in the order `mistura --help` lists them."""
    parser = argparse.ArgumentParser(prog="mistura", description="Train, compare and use Transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the process's arguments), run the command and return its exit status."""
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)
