"""Text from a checkpoint: `mistura generate` continues a prompt (streamed, or drafted by a
smaller model) or every line of a prompts file, and `mistura chat` keeps a conversation.

Under torchrun (`torchrun --nproc-per-node N -m mistura.cli generate|chat CKPT`) both split the
model over the N processes: each command runs in mistura.parallel.launch's `processes`, which
loads the model (`run.load`) and shares rank 0's input with the other ranks (`run.share`); run
alone, they are the single-process commands, unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mistura.cli.options import add_sampling_options, sampling_from_args

if TYPE_CHECKING:
    from mistura.parallel.launch import Run


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
    add_compile_option(p)
    add_sampling_options(p)
    add_timeout_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="talk with a checkpoint: a REPL keeping the conversation (/sair or /exit ends, /limpar or /clear resets)",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--system", "--sistema", metavar="TEXT", help="system prompt, kept when old turns are dropped")
    add_sampling_options(p, temperature=0.7, max_new_tokens=64)
    add_compile_option(p)
    add_timeout_option(p)
    p.set_defaults(func=cmd_chat)


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model: a minute or so of compiling at the first prompt, then faster decoding "
        "(1.2x to 2.7x at one prompt on a CPU; see BENCHMARKS.md); one process only",
    )


def loader(run: Run, args: argparse.Namespace):
    """run.load, with the model compiled for decoding if --compile asks."""
    if not args.compile:
        return run.load
    from mistura.errors import ConfigError
    from mistura.infer.engine import compile_for_decoding
    from mistura.parallel.distributed import world_size

    if world_size() > 1:
        raise ConfigError("--compile runs in one process: drop it under torchrun")
    return lambda path: compile_for_decoding(run.load(path))


def add_timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others' share of the work before failing "
        "(rank 0's next input is awaited without limit; default: 300)",
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from mistura.errors import ConfigError
    from mistura.parallel.launch import processes

    if (args.prompt is None) == (args.input_file is None):
        raise ConfigError("give either --prompt or --input-file")
    with processes(args.timeout) as run:
        if args.prompt is not None:
            generate_prompt(run, args)
        else:
            generate_prompts_file(run, args)


def generate_prompt(run: Run, args: argparse.Namespace) -> None:
    """Stream the continuation of --prompt (rank 0's, checked there), drafted by --draft if given."""
    import mistura
    from mistura.infer.generate import check_prompt, generate_text

    def read_prompt() -> str:
        check_prompt(args.prompt)
        return args.prompt

    prompt = run.share(read_prompt)
    sampling = sampling_from_args(args)
    model = loader(run, args)(args.checkpoint)
    tokenizer = mistura.load_tokenizer(args.checkpoint)
    print(prompt, end="", flush=True)
    if args.draft is not None:
        generate_speculatively(run, model, tokenizer, prompt, args, sampling)
        return
    generate_text(model, tokenizer, [prompt], sampling, on_text=lambda _, text: print(text, end="", flush=True))
    print()


def generate_prompts_file(run: Run, args: argparse.Namespace) -> None:
    """Continue every line of --input-file into a JSONL file, which rank 0 (or the only process) writes.

    Under torchrun the other ranks run generate_file's batches, --batch-size prompts at a time
    in order, on the prompts rank 0 read and shared.
    """
    import mistura
    from mistura.errors import ConfigError
    from mistura.infer.generate import generate_file, generate_text, read_prompts
    from mistura.parallel.distributed import is_main

    if args.draft is not None:
        raise ConfigError("--draft decodes one prompt at a time: use it with --prompt, not --input-file")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: the batch size must be >= 1, got {args.batch_size}")
    sampling = sampling_from_args(args)
    model = loader(run, args)(args.checkpoint)
    tokenizer = mistura.load_tokenizer(args.checkpoint)
    prompts = run.share(lambda: read_prompts(args.input_file))
    if not is_main():
        for start in range(0, len(prompts), args.batch_size):
            generate_text(model, tokenizer, prompts[start : start + args.batch_size], sampling)
        return
    output = args.output or str(Path(args.input_file).with_suffix(".jsonl"))
    count = generate_file(model, tokenizer, args.input_file, output, sampling, args.batch_size)
    print(f"{count} completions written to {output}")


def generate_speculatively(run: Run, model, tokenizer, prompt: str, args: argparse.Namespace, sampling) -> None:
    """Stream the continuation of the prompt drafted by --draft, then the acceptance rate on stderr."""
    import mistura
    from mistura.infer.speculative import check_tokenizers, speculative_generate_text

    draft = run.load(args.draft)
    check_tokenizers(tokenizer, mistura.load_tokenizer(args.draft))
    _, stats = speculative_generate_text(
        model, draft, tokenizer, prompt, sampling, args.gamma, on_text=lambda text: print(text, end="", flush=True)
    )
    print()
    print(
        f"[{stats.accepted}/{stats.proposed} draft tokens accepted ({stats.acceptance_rate:.0%}), "
        f"{stats.tokens_per_target_pass:.2f} tokens per target pass]",
        file=sys.stderr,
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from mistura.infer.chat import open_chat, repl, stdin_reader
    from mistura.parallel.launch import processes

    with processes(args.timeout) as run:
        chat = open_chat(args.checkpoint, sampling_from_args(args), system=args.system, loader=loader(run, args))
        repl(chat, run.shared(stdin_reader))
