"""The `mistura` command line. Each subcommand parses its flags and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from mistura.errors import MisturaError


def cmd_prepare(args: argparse.Namespace) -> None:
    from mistura.data.prepare import prepare

    prepare(args.source, Path(args.out), vocab_size=args.vocab_size, val_fraction=args.val_fraction, seed=args.seed)


def cmd_gutenberg(args: argparse.Namespace) -> None:
    from mistura.data.gutenberg import download_gutenberg_pt

    paths = download_gutenberg_pt(args.books, Path(args.out))
    print(f"{len(paths)} books in {args.out}; prepare them with: mistura prepare --source {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    import mistura
    from mistura.errors import ConfigError
    from mistura.fields import parse_overrides
    from mistura.infer.generate import generate_text
    from mistura.train.config import RunConfig
    from mistura.train.trainer import Trainer

    if args.teacher_continuations and args.teacher is None:
        raise ConfigError("--teacher-continuations needs --teacher (the model that writes them)")
    run = RunConfig.from_yaml(args.config, parse_overrides(args.set))
    if args.teacher is not None:
        from mistura.train.distill import DistillationTrainer

        trainer = DistillationTrainer(run, mistura.load(args.teacher), continuations=args.teacher_continuations)
    else:
        trainer = Trainer(run)
    summary = trainer.fit(resume=args.resume, progress=not args.no_progress)
    unigram = summary["unigram_loss"]
    print(
        f"\ndone: {summary['steps']} steps in {summary['wall_s']:.0f}s | validation loss {summary['val_loss']:.3f} "
        f"(perplexity {summary['val_ppl']:.1f}; unigram baseline {unigram:.3f}) | checkpoint {summary['checkpoint']}"
    )
    model = mistura.load(summary["checkpoint"])
    tokenizer = mistura.load_tokenizer(summary["checkpoint"])
    print("\nsamples:")
    for prompt, text in zip(run.sample.prompts, generate_text(model, tokenizer, run.sample.prompts, run.sample)):
        print(f"  {prompt}{text}\n")


def cmd_generate(args: argparse.Namespace) -> None:
    import mistura
    from mistura.errors import ConfigError
    from mistura.infer.generate import generate_file, generate_text

    if (args.prompt is None) == (args.input_file is None):
        raise ConfigError("give either --prompt or --input-file")
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


def cmd_params(args: argparse.Namespace) -> None:
    import torch

    from mistura.config import PRESETS, ModelConfig
    from mistura.errors import ConfigError
    from mistura.fields import parse_overrides
    from mistura.model import Transformer
    from mistura.train.config import RunConfig

    overrides = parse_overrides([f"model.{s}" for s in args.set])
    if args.config in PRESETS:
        config = ModelConfig.from_name(args.config, **overrides.get("model", {}))
    elif Path(args.config).is_file():
        config = RunConfig.from_yaml(args.config, overrides).model
    else:
        raise ConfigError(f"'{args.config}' is neither a preset ({', '.join(sorted(PRESETS))}) nor a config file")
    with torch.device("meta"):
        counts = Transformer(config).parameter_counts()
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
    if args.json:
        print(json.dumps({**counts, "kv_cache_bytes_per_token_bf16": config.kv_cache_bytes_per_token(2)}))
        return
    for label, value in rows:
        print(f"{label:<30} {value}")


def cmd_plan(args: argparse.Namespace) -> None:
    from mistura.plan import describe, plan

    print(describe(plan(args.flops, args.tokens, args.params, args.tokens_per_param)))


def cmd_compare(args: argparse.Namespace) -> None:
    import shlex

    from mistura.compare.runner import compare
    from mistura.compare.suite import load_suite
    from mistura.fields import parse_overrides

    suite = load_suite(args.configs, parse_overrides(args.set))
    flags = [*(f"--set={s}" for s in args.set), *(["--match", args.match] if args.match else [])]
    command = shlex.join(["mistura", "compare", *args.configs, "--out", args.out, *flags])
    compare(suite, args.out, match=args.match, progress=not args.no_progress, command=command)


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


def cmd_convert_from_hf(args: argparse.Namespace) -> None:
    from mistura.convert.hf import from_hf

    out = from_hf(
        args.hf_dir,
        args.out_dir,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
        model_parallel=args.model_parallel,
    )
    print(f"mistura checkpoint written to {out}")


def cmd_convert_to_hf(args: argparse.Namespace) -> None:
    from mistura.convert.hf import to_hf

    out = to_hf(
        args.checkpoint,
        args.out_dir,
        model_type=args.model_type,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
    )
    print(f"Hugging Face folder written to {out}; load it with AutoModelForCausalLM.from_pretrained")


def cmd_convert_fp8(args: argparse.Namespace) -> None:
    from mistura.convert.fp8 import bf16_to_fp8, fp8_to_bf16

    if args.to_fp8:
        out = bf16_to_fp8(args.src, args.dst, block=tuple(args.block), progress=not args.no_progress)
    else:
        out = fp8_to_bf16(args.src, args.dst, progress=not args.no_progress)
    print(f"written to {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from mistura.quant import QuantConfig, quantize_checkpoint, weights_bytes

    quant = QuantConfig(args.format, args.group_size)
    out = quantize_checkpoint(args.checkpoint, args.out, quant)
    before, after = weights_bytes(args.checkpoint), weights_bytes(out)
    print(f"{quant.format} checkpoint written to {out}: weights {after:,} bytes, {before / after:.2f}x smaller")


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    """`mistura convert KIND ...`: one subcommand per conversion."""
    p = sub.add_parser("convert", help="convert checkpoints between mistura and Hugging Face formats")
    kinds = p.add_subparsers(dest="conversion", required=True)

    c = kinds.add_parser("from-hf", help="a Hugging Face folder (config.json + safetensors) to a mistura checkpoint")
    c.add_argument("hf_dir", help="Hugging Face model folder")
    c.add_argument("out_dir", help="new checkpoint directory")
    c.add_argument("--dtype", help="cast the weights: bf16, fp16 or fp32 (default: keep the stored dtypes)")
    c.add_argument(
        "--model-parallel",
        type=int,
        metavar="N",
        help="write N rank files splitting attention heads, MLPs, experts and vocabulary (model{r}-mpN.safetensors)",
    )
    _add_conversion_options(c)
    c.set_defaults(func=cmd_convert_from_hf)

    c = kinds.add_parser("to-hf", help="a mistura checkpoint or run to a Hugging Face folder for transformers")
    c.add_argument("checkpoint", help="checkpoint or run directory")
    c.add_argument("out_dir", help="new Hugging Face folder")
    c.add_argument(
        "--model-type", help="Hugging Face model_type to write, e.g. mistral (default: the architecture's own)"
    )
    _add_conversion_options(c)
    c.set_defaults(func=cmd_convert_to_hf)

    c = kinds.add_parser("fp8-to-bf16", help="dequantise a DeepSeek-format FP8 Hugging Face folder to bf16")
    c.add_argument("src", help="FP8 folder (float8_e4m3fn weights with weight_scale_inv per 128x128 block)")
    c.add_argument("dst", help="new bf16 folder")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_convert_fp8, to_fp8=False)

    c = kinds.add_parser("bf16-to-fp8", help="quantise a Hugging Face folder's linear weights to DeepSeek's FP8 blocks")
    c.add_argument("src", help="bf16 or fp32 Hugging Face folder")
    c.add_argument("dst", help="new FP8 folder")
    c.add_argument("--block", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"), help="block shape")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_convert_fp8, to_fp8=True)


def _add_conversion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-shard-size", default="5GB", help="largest weights file, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistura", description="Train, compare and use Transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    data_sub = p.add_subparsers(dest="dataset", required=True)
    g = data_sub.add_parser("gutenberg-pt", help="Portuguese books from Project Gutenberg (needs internet)")
    g.add_argument("--books", type=int, default=100)
    g.add_argument("--out", default="data/gutenberg-pt")
    g.set_defaults(func=cmd_gutenberg)

    p = sub.add_parser("train", help="train a model from a YAML run config")
    p.add_argument("config", help="run config, e.g. configs/quickstart.yaml")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.max_steps=100"
    )
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

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

    p = sub.add_parser("params", help="parameter counts and KV-cache size of a preset or run config")
    p.add_argument("config", help="a preset name (e.g. gpt2-small) or a run config YAML")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a model field, e.g. n_layer=6"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("plan", help="compute-optimal model size and token budget (Chinchilla, C = 6 N D)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training compute budget C in FLOPs, e.g. 1e18")
    budget.add_argument("--tokens", type=float, help="training tokens D available")
    budget.add_argument("--params", type=float, help="active parameters N of the model")
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="compute-optimal D / N (Chinchilla: ~20)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="train several models on the same data and budget: metrics, plots, report")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="one suite YAML (with runs:) or several run configs")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument(
        "--match",
        choices=["active", "flops"],
        help="scale each run's MLP widths so its active parameters or FLOPs per token match the first run's",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a suite field: train.max_steps=50"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)
    add_convert_parser(sub)

    p = sub.add_parser("quantize", help="quantise a checkpoint's weights to fp8, int8 or int4 (mistura.load reads it)")
    p.add_argument("checkpoint", help="checkpoint, run or Hugging Face folder")
    p.add_argument("out", help="new checkpoint directory")
    p.add_argument(
        "--format",
        required=True,
        metavar="{fp8,int8,int4}",
        help="fp8: DeepSeek-V3's 128x128 blocks; int8: weight-only, per row; int4: weight-only, per group",
    )
    p.add_argument(
        "--group-size",
        type=int,
        metavar="N",
        help="input channels per scale (int4 default: 128; int8 default: the whole row); must divide every layer's",
    )
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def run_command(func: Callable[..., object], *args: object) -> int:
    """Run a command; exit status 0, or 2 with `error: ...` (no traceback) for bad input, 130 on Ctrl-C."""
    try:
        func(*args)
    except MisturaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
