"""Sizing and comparing models: `mistura params` counts a config's parameters and KV cache,
`mistura plan` finds a compute-optimal size and token budget (or, with --memory, the per-GPU
memory and communication of a parallel layout), and `mistura compare` trains several models on
the same data and budget and reports on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mistura.cli.options import add_no_progress_option, add_set_option


def register(sub: argparse._SubParsersAction) -> None:
    """Add `params`, `plan` and `compare` to the subcommands."""
    p = sub.add_parser("params", help="parameter counts and KV-cache size of a preset or run config")
    p.add_argument("config", help="a preset name (e.g. gpt2-small) or a run config YAML")
    add_set_option(p, "override a model field, e.g. n_layer=6")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--lora-rank", type=int, metavar="R", help="also count the parameters LoRA of rank R trains")
    p.add_argument(
        "--lora-targets", nargs="+", default=["all-linear"], metavar="T", help="layer patterns or groups LoRA adapts"
    )
    p.set_defaults(func=cmd_params)

    p = sub.add_parser(
        "plan",
        help="compute-optimal model size and token budget (Chinchilla, C = 6 N D), or per-GPU memory of a layout",
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training compute budget C in FLOPs, e.g. 1e18")
    budget.add_argument("--tokens", type=float, help="training tokens D available")
    budget.add_argument("--params", type=float, help="active parameters N of the model")
    budget.add_argument(
        "--memory",
        metavar="PRESET_OR_CONFIG",
        help="instead: per-GPU memory and communication of training this preset or run config in a parallel layout",
    )
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="compute-optimal D / N (Chinchilla: ~20)")
    layout = p.add_argument_group("parallel layout (only with --memory)")
    layout.add_argument("--gpus", type=int, metavar="G", help="GPUs in all, G = dp x tp (required)")
    layout.add_argument("--tp", type=int, metavar="T", help="tensor-parallel ranks (default: 1)")
    layout.add_argument(
        "--ep", type=int, metavar="E", help="expert-parallel ranks, dividing dp and n_experts (default: 1)"
    )
    layout.add_argument(
        "--data-parallel", choices=["fsdp", "ddp"], help="shard (fsdp) or replicate (ddp) over dp (default: fsdp)"
    )
    layout.add_argument("--dtype", choices=["bf16", "fp32"], help="parameter and gradient type (default: bf16)")
    layout.add_argument("--micro-batch", type=int, metavar="B", help="sequences per micro-batch (default: 1)")
    layout.add_argument("--seq-len", type=int, metavar="S", help="tokens per sequence (default: max_seq_len)")
    layout.add_argument(
        "--activation-checkpointing", action="store_true", default=None, help="recompute each layer in backward"
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="train several models on the same data and budget: metrics, plots, report")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="one suite YAML (with runs:) or several run configs")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument(
        "--match",
        choices=["active", "flops"],
        help="scale each run's MLP widths so its active parameters or FLOPs per token match the first run's",
    )
    add_set_option(p, "override a suite field: train.max_steps=50")
    add_no_progress_option(p)
    p.set_defaults(func=cmd_compare)


def cmd_params(args: argparse.Namespace) -> None:
    import torch

    from mistura.model import Transformer

    config = model_config(args.config, args.set)
    with torch.device("meta"):
        model = Transformer(config)
        counts = model.parameter_counts()
        lora = lora_counts(model, args.lora_rank, args.lora_targets) if args.lora_rank else {}
    if args.json:
        print(json.dumps({**counts, "kv_cache_bytes_per_token_bf16": config.kv_cache_bytes_per_token(2), **lora}))
        return
    yarn = config.yarn
    rows = [
        ("model", config.name),
        ("layers", describe_layers(config)),
        ("context", f"{config.max_seq_len:,} tokens" + (f" (YaRN x{yarn.factor:g})" if yarn else "")),
        ("total parameters", f"{counts['total']:,}"),
        ("active parameters per token", f"{counts['active']:,}"),
        ("  of which embeddings", f"{counts['embedding']:,}"),
        ("active without input embedding", f"{counts['active_non_embedding']:,}"),
        ("KV cache per token (bf16)", f"{config.kv_cache_bytes_per_token(2):,} bytes"),
        ("KV cache per token (fp32)", f"{config.kv_cache_bytes_per_token(4):,} bytes"),
    ]
    if lora:
        trained = f"{lora['lora_trainable']:,} ({lora['lora_share']:.2%})"
        rows.append((f"trainable with LoRA r={args.lora_rank}", trained))
    for label, value in rows:
        print(f"{label:<30} {value}")


def lora_counts(model, rank: int, targets: list[str]) -> dict[str, int | float]:
    """The parameters LoRA of `rank` on `targets` trains, and their share of the adapted model's."""
    from mistura.lora import LoRAConfig, apply_lora, trainable_share

    share = trainable_share(apply_lora(model, LoRAConfig(rank=rank, targets=tuple(targets))))
    return {"lora_trainable": share.trainable, "lora_share": share.fraction}


def model_config(name: str, settings: list[str]):
    """The ModelConfig of a preset name or a run config file, with `--set` model fields applied."""
    from mistura.config import PRESETS, ModelConfig
    from mistura.errors import ConfigError
    from mistura.fields import parse_overrides
    from mistura.train.config import RunConfig

    overrides = parse_overrides([f"model.{s}" for s in settings])
    if name in PRESETS:
        return ModelConfig.from_name(name, **overrides.get("model", {}))
    if Path(name).is_file():
        return RunConfig.from_yaml(name, overrides).model
    raise ConfigError(f"'{name}' is neither a preset ({', '.join(sorted(PRESETS))}) nor a config file")


def describe_layers(config) -> str:
    """E.g. "6: 1 dense, 5 moe (16 experts of width 192, top-3, shared 192)", then MLA's shape if any."""
    kinds = {kind: config.layer_mlp.count(kind) for kind in dict.fromkeys(config.layer_mlp)}
    text = f"{config.n_layer}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    if config.moe is not None:
        moe = config.moe
        shared = f", shared {moe.d_shared}" if moe.d_shared else ""
        text += f" ({moe.n_experts} experts of width {moe.d_expert}, top-{moe.top_k}{shared})"
    if config.mla is not None:
        mla = config.mla
        query = f", query rank {mla.q_lora_rank}" if mla.q_lora_rank else ""
        text += f"; MLA, {config.n_head} heads, latent {mla.kv_lora_rank} + rope {mla.qk_rope_head_dim}{query}"
    return text


LAYOUT_OPTIONS = ("gpus", "tp", "ep", "data_parallel", "dtype", "micro_batch", "seq_len", "activation_checkpointing")


def cmd_plan(args: argparse.Namespace) -> None:
    from mistura.errors import ConfigError
    from mistura.plan import describe, plan

    if args.memory is not None:
        plan_memory(args)
        return
    given = [name for name in LAYOUT_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')}: only applies with --memory")
    print(describe(plan(args.flops, args.tokens, args.params, args.tokens_per_param)))


def plan_memory(args: argparse.Namespace) -> None:
    """`mistura plan --memory`: the layout's per-GPU memory and communication table."""
    from mistura.errors import ConfigError
    from mistura.parallel.memory import Layout, describe, memory_plan

    if args.gpus is None:
        raise ConfigError("--memory: give the number of GPUs with --gpus")
    config = model_config(args.memory, [])
    options = {name: getattr(args, name) for name in LAYOUT_OPTIONS if getattr(args, name) is not None}
    layout = Layout(**{"seq_len": config.max_seq_len, **options})
    print(describe(config, layout, memory_plan(config, layout)))


def cmd_compare(args: argparse.Namespace) -> None:
    import shlex

    from mistura.compare.runner import compare
    from mistura.compare.suite import load_suite
    from mistura.fields import parse_overrides

    suite = load_suite(args.configs, parse_overrides(args.set))
    flags = [*(f"--set={s}" for s in args.set), *(["--match", args.match] if args.match else [])]
    command = shlex.join(["mistura", "compare", *args.configs, "--out", args.out, *flags])
    compare(suite, args.out, match=args.match, progress=not args.no_progress, command=command)
