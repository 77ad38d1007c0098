"""`mistura train`: train a model from a YAML run config (optionally distilling a teacher),
then print the validation loss and a sample per configured prompt.

Data-parallel, with parallel.data_parallel: ddp or fsdp in the config:
    torchrun --nproc-per-node N -m mistura.cli train CONFIG.yaml
"""

from __future__ import annotations

import argparse

from mistura.cli.options import add_no_progress_option, add_set_option


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` to the subcommands."""
    p = sub.add_parser("train", help="train a model from a YAML run config")
    p.add_argument("config", help="run config, e.g. configs/quickstart.yaml")
    add_set_option(p, "override a field, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument(
        "--teacher",
        metavar="CKPT",
        help="distil: train on the KL divergence from this model's predictions (same tokenizer; repeat it to resume)",
    )
    p.add_argument(
        "--teacher-continuations",
        type=int,
        default=0,
        metavar="N",
        help="with --teacher: half of each batch from N greedy continuations the teacher writes first "
        "(sequence-level distillation; repeat it to resume)",
    )
    add_no_progress_option(p, "no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    from mistura.errors import ConfigError
    from mistura.fields import parse_overrides
    from mistura.parallel import distributed
    from mistura.train.config import RunConfig
    from mistura.train.device import resolve_device

    if args.teacher_continuations and args.teacher is None:
        raise ConfigError("--teacher-continuations needs --teacher (the model that writes them)")
    run = RunConfig.from_yaml(args.config, parse_overrides(args.set))
    parallel, device = run.parallel, resolve_device(run.train.device)
    layout = (parallel.data_parallel, parallel.timeout_s, run.train.batch_size, device)
    with distributed.process_group(*layout, parallel.expert_parallel, parallel.tensor_parallel):
        summary = make_trainer(run, args).fit(resume=args.resume, progress=not args.no_progress)
        main = distributed.is_main()
    if not main:  # under torchrun, rank 0 reports for all
        return
    unigram = summary["unigram_loss"]
    print(
        f"\ndone: {summary['steps']} steps in {summary['wall_s']:.0f}s | validation loss {summary['val_loss']:.3f} "
        f"(perplexity {summary['val_ppl']:.1f}; unigram baseline {unigram:.3f}) | checkpoint {summary['checkpoint']}"
    )
    print_samples(summary["checkpoint"], run.sample)


def make_trainer(run, args: argparse.Namespace):
    """A Trainer for the run, or a DistillationTrainer when --teacher names a model."""
    if args.teacher is None:
        from mistura.train.trainer import Trainer

        return Trainer(run)
    import mistura
    from mistura.train.distill import DistillationTrainer

    return DistillationTrainer(run, mistura.load(args.teacher), continuations=args.teacher_continuations)


def print_samples(checkpoint: str, sample) -> None:
    """Continue each of the run's sample prompts with the checkpoint the run ended on."""
    import mistura
    from mistura.infer.generate import generate_text

    model = mistura.load(checkpoint)
    tokenizer = mistura.load_tokenizer(checkpoint)
    print("\nsamples:")
    for prompt, text in zip(sample.prompts, generate_text(model, tokenizer, sample.prompts, sample)):
        print(f"  {prompt}{text}\n")
