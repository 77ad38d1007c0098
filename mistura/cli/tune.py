"""Post-training: `mistura finetune` teaches a checkpoint to answer as a JSONL file of conversations does
(every weight, or LoRA adapters), `mistura finetune-data` writes a small task set made from the embedded
corpus, and `mistura finetune-eval` scores a checkpoint's answers to held-out conversations.
"""

from __future__ import annotations

import argparse

from mistura.cli.options import add_tuning_options, fit_tuning


def register(sub: argparse._SubParsersAction) -> None:
    """Add `finetune`, `finetune-data` and `finetune-eval` to the subcommands."""
    p = sub.add_parser("finetune", help="supervised fine-tuning on JSONL conversations, in full or with LoRA")
    add_tuning_options(p, '{"messages": [...]} or {"prompt", "completion"}', "configs/finetune/machado-obras.yaml")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("finetune-data", help="write a fine-tuning or preference task set made from the embedded corpus")
    p.add_argument(
        "task",
        help="machado-obras: which of five works a passage comes from (conversations); machado-pares: a passage's "
        "true continuation preferred to its words shuffled ({prompt, chosen, rejected} pairs)",
    )
    p.add_argument("out", nargs="?", help="a new folder for train.jsonl and test.jsonl (default: data/TASK)")
    p.add_argument("--seed", type=int, default=1337, help="the shuffle and held-out split (default: 1337)")
    p.set_defaults(func=cmd_finetune_data)

    p = sub.add_parser("finetune-eval", help="score a checkpoint's answers: exact match and ranking of the answers")
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--data", "--dados", required=True, metavar="FILE.jsonl", help="conversations ending in the answer")
    p.add_argument("--batch-size", type=int, default=32, help="conversations scored together (default: 32)")
    p.set_defaults(func=cmd_finetune_eval)


def cmd_finetune(args: argparse.Namespace) -> None:
    from mistura.tune.config import FinetuneConfig
    from mistura.tune.sft import FineTuner

    summary = fit_tuning(args, FinetuneConfig, FineTuner)
    print(
        f"\ndone: {summary['steps']} steps in {summary['wall_s']:.0f}s | validation loss of the assistant's tokens "
        f"{summary['val_loss']:.3f} | checkpoint {summary['checkpoint']}"
    )


def cmd_finetune_data(args: argparse.Namespace) -> None:
    from mistura.tune.tasks import write_task

    out = args.out or f"data/{args.task}"
    counts = write_task(args.task, out, seed=args.seed)
    print(f"{counts['train']} training and {counts['test']} held-out examples written to {out}")
    if args.task == "machado-pares":
        print(f"train a reward model on them with: mistura reward-model CKPT --data {out}/train.jsonl")
        print(f"or tune a checkpoint on them directly: mistura dpo CKPT --data {out}/train.jsonl")
    else:
        print(f"fine-tune on them with: mistura finetune CKPT --data {out}/train.jsonl")


def cmd_finetune_eval(args: argparse.Namespace) -> None:
    import mistura
    from mistura.tune.data import read_conversations
    from mistura.tune.evaluate import score
    from mistura.tune.template import tuning_template

    conversations = read_conversations(args.data)
    model, tokenizer = mistura.load(args.checkpoint), mistura.load_tokenizer(args.checkpoint)
    print(score(model, tokenizer, tuning_template(args.checkpoint), conversations, args.batch_size))
