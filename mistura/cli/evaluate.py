"""Scoring a checkpoint: `mistura eval CKPT --text FILE_OR_FOLDER` (perplexity, bits per byte, tokens per word)
or `mistura eval CKPT --tasks NAMES` (lm-evaluation-harness tasks, through mistura.eval.harness)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mistura.atomic import write_json
from mistura.cli.options import add_device_options, add_no_progress_option, device_and_dtype


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval` to the subcommands."""
    p = sub.add_parser(
        "eval",
        help="score a checkpoint: perplexity, bits per byte and tokens per word on a text (--text), or "
        "lm-evaluation-harness tasks (--tasks)",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a UTF-8 text file, or a folder of .txt files")
    what.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs the eval extra)")
    p.add_argument("--ctx", type=int, help="--text: tokens each window reads (default: the model's context)")
    p.add_argument("--stride", type=int, help="--text: tokens each window moves (default: half of --ctx)")
    p.add_argument("--limit", type=float, help="--tasks: at most this many examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, help="--tasks: examples shown before each question")
    p.add_argument("--batch-size", type=int, default=8, help="--tasks: requests scored together (default: 8)")
    p.add_argument(
        "--include-path", help="--tasks: a folder of task YAML files of your own (mistura's own are always found)"
    )
    p.add_argument("--output", help="the JSON result (default: eval-CHECKPOINT-TEXT_OR_TASKS.json here)")
    add_device_options(p)
    add_no_progress_option(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    import time

    begin = time.perf_counter()
    result = evaluate_tasks(args) if args.tasks else evaluate_text(args)
    result["seconds"] = round(time.perf_counter() - begin, 3)
    name = Path(args.text).stem if args.text else args.tasks.replace(",", "+")
    path = Path(args.output or f"eval-{Path(args.checkpoint).resolve().name}-{name}.json")
    write_json(path, result, indent=2)
    print(f"wrote {path}")


def evaluate_text(args: argparse.Namespace) -> dict:
    from mistura.eval.perplexity import score_checkpoint

    result = score_checkpoint(
        args.checkpoint, args.text, args.ctx, args.stride, *device_and_dtype(args), progress=not args.no_progress
    )
    print(
        f"{result['documents']} document(s), {result['tokens']:,} tokens, {result['bytes']:,} bytes: perplexity "
        f"{result['perplexity']:.3f}, {result['bits_per_byte']:.4f} bits/byte, "
        f"{result['tokens_per_word']:.3f} tokens/word"
    )
    return result


def evaluate_tasks(args: argparse.Namespace) -> dict:
    """lm-evaluation-harness's simple_evaluate on the `mistura` model (mistura.eval.harness)."""
    from mistura.eval import require_harness

    require_harness("mistura eval --tasks")
    from lm_eval.utils import make_table

    from mistura.eval.harness import evaluate_tasks

    device, _ = device_and_dtype(args)  # the harness's model reads --dtype itself
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    results = evaluate_tasks(
        args.checkpoint, tasks, args.limit, args.num_fewshot, args.batch_size, args.include_path, device, args.dtype
    )
    print(make_table(results))
    return results
