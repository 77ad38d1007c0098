"""Options shared by several subcommands: the sampling flags with their Portuguese aliases,
the repeatable `--set KEY=VALUE` override, `--no-progress`, and `--device` / `--dtype`.
"""

from __future__ import annotations

import argparse


def add_sampling_options(parser: argparse.ArgumentParser, temperature: float = 0.8, max_new_tokens: int = 100) -> None:
    """The flags of mistura.infer.sampling.Sampling, with Portuguese aliases."""
    parser.add_argument(
        "--max-new-tokens",
        "--max-novos-tokens",
        type=int,
        default=max_new_tokens,
        dest="max_new_tokens",
        help=f"most tokens to generate (default: {max_new_tokens})",
    )
    parser.add_argument("--temperature", "--temperatura", type=float, default=temperature, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, help="keep the most likely tokens up to this probability mass")
    parser.add_argument("--min-p", type=float, help="keep tokens at least this fraction as likely as the top one")
    parser.add_argument(
        "--repetition-penalty", "--penalidade-repeticao", type=float, default=1.0, help=">1 discourages repeats"
    )
    parser.add_argument(
        "--stop",
        "--parar",
        action="append",
        default=[],
        metavar="TEXT",
        help="end a row at this text; \\n is a newline (repeatable)",
    )
    parser.add_argument("--seed", "--semente", type=int, default=0)


def sampling_from_args(args: argparse.Namespace):
    """The mistura.infer.sampling.Sampling that the flags of `add_sampling_options` describe."""
    from mistura.infer.sampling import Sampling

    return Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop),
        seed=args.seed,
    )


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE`, repeatable, collected in `args.set` for mistura.fields.parse_overrides."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_no_progress_option(parser: argparse.ArgumentParser, help: str = "no progress bars") -> None:
    """`--no-progress`: `args.no_progress` is true when the command should draw no progress bars."""
    parser.add_argument("--no-progress", action="store_true", help=help)


def add_tuning_options(parser: argparse.ArgumentParser, data: str, example_config: str) -> None:
    """The flags of a post-training run (finetune, reward-model, dpo, rl): base, data, method, config, resume."""
    parser.add_argument("checkpoint", nargs="?", help="base checkpoint or run directory (default: base: of --config)")
    parser.add_argument("--data", "--dados", metavar="FILE.jsonl", help=data)
    parser.add_argument("--val", metavar="FILE.jsonl", help="held-out lines (default: data.val_fraction of --data)")
    parser.add_argument("--method", "--metodo", help="full (default) or lora")
    parser.add_argument("--config", metavar="RUN.yaml", help=f"the run's config, e.g. {example_config}")
    parser.add_argument("--out", "--saida", help="the run's directory (train.out_dir)")
    add_set_option(parser, "override a field, e.g. train.max_steps=100 or lora.rank=4")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    add_no_progress_option(parser, "no progress bar")


def tuning_overrides(args: argparse.Namespace) -> dict:
    """The config fields that the flags of add_tuning_options give, `--set` last (it wins)."""
    from mistura.fields import merge, parse_overrides

    flags = {
        "base": args.checkpoint,
        "method": args.method,
        "data": {"train": args.data, "val": args.val},
        "train": {"out_dir": args.out},
    }
    return merge(given(flags), parse_overrides(args.set))


def fit_tuning(args: argparse.Namespace, config: type, trainer: type, section: dict | None = None) -> dict:
    """Train a post-training run: its config from --config, the command's own `section` flags and the shared ones
    (tuning_overrides), then `trainer(config).fit`; returns the run's summary."""
    from mistura.fields import merge

    run = config.from_yaml(args.config, merge(given(section or {}), tuning_overrides(args)))
    return trainer(run).fit(resume=args.resume, progress=not args.no_progress)


def given(flags: dict) -> dict:
    """The flags that were given (not None), sections that end up empty left out."""
    kept = {key: given(value) if isinstance(value, dict) else value for key, value in flags.items()}
    return {key: value for key, value in kept.items() if value not in (None, {})}


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps... (default: auto, the best there is)")
    parser.add_argument("--dtype", help="cast the weights: bf16, fp16 or fp32 (default: as stored)")


def device_and_dtype(args: argparse.Namespace):
    """The torch device --device names ("auto": CUDA, then MPS, then the CPU) and the dtype --dtype names; an
    unknown or absent device is a ConfigError."""
    import torch

    from mistura.errors import ConfigError
    from mistura.shards import parse_dtype
    from mistura.train.device import resolve_device

    try:
        chosen = resolve_device(args.device)
    except RuntimeError as err:
        raise ConfigError(f"--device: {err}") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: this machine has no CUDA device")
    return chosen, parse_dtype(args.dtype)
