"""Text from a checkpoint: `mistura generate` continues a prompt (streamed, or drafted by a
smaller model) or every line of a prompts file, and `mistura chat` keeps a conversation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mistura.cli.options import add_sampling_options, sampling_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add `generate` and `chat` to the subcommands."""
    p = sub.add_parser("generate", help="continue a prompt, or every line of a prompts file (batched, JSONL)")
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--prompt")
    p.add_argument("--input-file", "--arquivo", help="one prompt per line; writes JSONL")
    p.add_argument("--output", "--saida", help="JSONL output (default: the input file with .jsonl)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    p.add_argument("--draft", metavar="CKPT", help="speculative decoding: a small model sharing the tokenizer drafts")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens the target checks per pass (default: 4)")
    add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="talk with a checkpoint: a REPL keeping the conversation (/sair or /exit ends, /limpar or /clear resets)",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--system", "--sistema", metavar="TEXT", help="system prompt, kept when old turns are dropped")
    add_sampling_options(p, temperature=0.7, max_new_tokens=64)
    p.set_defaults(func=cmd_chat)


def cmd_generate(args: argparse.Namespace) -> None:
    import mistura
    from mistura.errors import ConfigError
    from mistura.infer.generate import check_prompt, generate_file, generate_text

    if (args.prompt is None) == (args.input_file is None):
        raise ConfigError("give either --prompt or --input-file")
    if args.prompt is not None:
        check_prompt(args.prompt)
    if args.draft is not None and args.input_file is not None:
        raise ConfigError("--draft decodes one prompt at a time: use it with --prompt, not --input-file")
    sampling = sampling_from_args(args)
    model = mistura.load(args.checkpoint)
    tokenizer = mistura.load_tokenizer(args.checkpoint)
    if args.input_file is not None:
        output = args.output or str(Path(args.input_file).with_suffix(".jsonl"))
        count = generate_file(model, tokenizer, args.input_file, output, sampling, args.batch_size)
        print(f"{count} completions written to {output}")
        return
    print(args.prompt, end="", flush=True)
    if args.draft is not None:
        generate_speculatively(model, tokenizer, args, sampling)
        return
    generate_text(model, tokenizer, [args.prompt], sampling, on_text=lambda _, text: print(text, end="", flush=True))
    print()


def generate_speculatively(model, tokenizer, args: argparse.Namespace, sampling) -> None:
    """Stream the continuation of --prompt drafted by --draft, then the acceptance rate on stderr."""
    import mistura
    from mistura.infer.speculative import check_tokenizers, speculative_generate_text

    draft = mistura.load(args.draft)
    check_tokenizers(tokenizer, mistura.load_tokenizer(args.draft))
    _, stats = speculative_generate_text(
        model, draft, tokenizer, args.prompt, sampling, args.gamma, on_text=lambda text: print(text, end="", flush=True)
    )
    print()
    print(
        f"[{stats.accepted}/{stats.proposed} draft tokens accepted ({stats.acceptance_rate:.0%}), "
        f"{stats.tokens_per_target_pass:.2f} tokens per target pass]",
        file=sys.stderr,
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from mistura.infer.chat import open_chat, repl

    repl(open_chat(args.checkpoint, sampling_from_args(args), system=args.system))
