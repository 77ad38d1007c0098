"""Checkpoint formats: `mistura convert KIND` moves weights between mistura and Hugging Face
folders or llama.cpp's GGUF files (and between bf16 and DeepSeek's FP8 blocks, and from a
distributed checkpoint's shards to one folder), and `mistura quantize` writes a
checkpoint with fp8, int8 or int4 weights that mistura.load reads.
"""

from __future__ import annotations

import argparse

from mistura.cli.options import add_no_progress_option


def register(sub: argparse._SubParsersAction) -> None:
    """Add `convert` and `quantize` to the subcommands."""
    p = sub.add_parser("convert", help="convert checkpoints between mistura and Hugging Face formats")
    kinds = p.add_subparsers(dest="conversion", required=True)
    add_hf_conversions(kinds)
    add_fp8_conversions(kinds)
    add_gguf_conversions(kinds)
    c = kinds.add_parser(
        "from-distributed", help="a distributed checkpoint (an fsdp run's per-process shards) to one checkpoint folder"
    )
    add_folders(c, checkpoint="distributed checkpoint, or the run that wrote it", out_dir="new checkpoint directory")
    c.set_defaults(func=cmd_convert_from_distributed)

    p = sub.add_parser("quantize", help="quantise a checkpoint's weights to fp8, int8 or int4 (mistura.load reads it)")
    add_folders(p, checkpoint="checkpoint, run or Hugging Face folder", out="new checkpoint directory")
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


def add_folders(parser: argparse.ArgumentParser, **folders: str) -> None:
    """Positional arguments in the order given: each keyword names a folder the command reads or writes."""
    for name, text in folders.items():
        parser.add_argument(name, help=text)


def add_hf_conversions(kinds: argparse._SubParsersAction) -> None:
    """`convert from-hf` and `convert to-hf`."""
    c = kinds.add_parser("from-hf", help="a Hugging Face folder (config.json + safetensors) to a mistura checkpoint")
    add_folders(c, hf_dir="Hugging Face model folder", out_dir="new checkpoint directory")
    c.add_argument("--dtype", help="cast the weights: bf16, fp16 or fp32 (default: keep the stored dtypes)")
    c.add_argument(
        "--model-parallel",
        type=int,
        metavar="N",
        help="write N rank files splitting attention heads, MLPs, experts and vocabulary (model{r}-mpN.safetensors)",
    )
    add_shard_options(c)
    c.set_defaults(func=cmd_convert_from_hf)

    c = kinds.add_parser("to-hf", help="a mistura checkpoint or run to a Hugging Face folder for transformers")
    add_folders(c, checkpoint="checkpoint or run directory", out_dir="new Hugging Face folder")
    c.add_argument(
        "--model-type", help="Hugging Face model_type to write, e.g. mistral (default: the architecture's own)"
    )
    add_shard_options(c)
    c.set_defaults(func=cmd_convert_to_hf)


def add_shard_options(parser: argparse.ArgumentParser) -> None:
    """The options both Hugging Face conversions share; shard_kwargs reads them."""
    parser.add_argument("--max-shard-size", default="5GB", help="largest weights file, e.g. 5GB, 500MB (default: 5GB)")
    add_no_progress_option(parser)


def add_fp8_conversions(kinds: argparse._SubParsersAction) -> None:
    """`convert fp8-to-bf16` and `convert bf16-to-fp8`, both run by cmd_convert_fp8."""
    c = kinds.add_parser("fp8-to-bf16", help="dequantise a DeepSeek-format FP8 Hugging Face folder to bf16")
    add_folders(
        c, src="FP8 folder (float8_e4m3fn weights with weight_scale_inv per 128x128 block)", dst="new bf16 folder"
    )
    add_no_progress_option(c)
    c.set_defaults(func=cmd_convert_fp8, to_fp8=False)

    c = kinds.add_parser("bf16-to-fp8", help="quantise a Hugging Face folder's linear weights to DeepSeek's FP8 blocks")
    add_folders(c, src="bf16 or fp32 Hugging Face folder", dst="new FP8 folder")
    c.add_argument("--block", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"), help="block shape")
    add_no_progress_option(c)
    c.set_defaults(func=cmd_convert_fp8, to_fp8=True)


def add_gguf_conversions(kinds: argparse._SubParsersAction) -> None:
    """`convert to-gguf` and `convert from-gguf`."""
    c = kinds.add_parser(
        "to-gguf", help="a mistura checkpoint or run to one GGUF file for llama.cpp, Ollama, LM Studio"
    )
    add_folders(c, checkpoint="checkpoint or run directory", out="new GGUF file, e.g. model.gguf")
    c.add_argument(
        "--type",
        default="f16",
        choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
        help="weight type (default: f16); norms, biases and routers stay f32",
    )
    add_no_progress_option(c)
    c.set_defaults(func=cmd_convert_to_gguf)

    c = kinds.add_parser(
        "from-gguf", help="a GGUF file (llama, qwen2, qwen2moe, qwen3moe, gpt2, deepseek2) to a mistura checkpoint"
    )
    add_folders(c, gguf_file="GGUF file", out_dir="new checkpoint directory")
    c.set_defaults(func=cmd_convert_from_gguf)


def cmd_convert_from_hf(args: argparse.Namespace) -> None:
    from mistura.convert.hf import from_hf

    out = from_hf(args.hf_dir, args.out_dir, dtype=args.dtype, model_parallel=args.model_parallel, **shard_kwargs(args))
    print(f"mistura checkpoint written to {out}")


def cmd_convert_to_hf(args: argparse.Namespace) -> None:
    from mistura.convert.hf import to_hf

    out = to_hf(args.checkpoint, args.out_dir, model_type=args.model_type, **shard_kwargs(args))
    print(f"Hugging Face folder written to {out}; load it with AutoModelForCausalLM.from_pretrained")


def cmd_convert_to_gguf(args: argparse.Namespace) -> None:
    from mistura.convert.gguf import to_gguf

    out = to_gguf(args.checkpoint, args.out, type=args.type, progress=not args.no_progress)
    print(f"GGUF file written to {out}; run it with `llama-cli -m {out}`")


def cmd_convert_from_gguf(args: argparse.Namespace) -> None:
    from mistura.convert.gguf import from_gguf

    out = from_gguf(args.gguf_file, args.out_dir)
    print(f"mistura checkpoint written to {out}")


def shard_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of mistura.convert.hf's from_hf and to_hf that add_shard_options sets."""
    return {"max_shard_size": args.max_shard_size, "progress": not args.no_progress}


def cmd_convert_from_distributed(args: argparse.Namespace) -> None:
    from mistura.checkpoint import is_distributed, load_checkpoint, resolve, save_model
    from mistura.errors import CheckpointError

    source = resolve(args.checkpoint)
    if not is_distributed(source):
        raise CheckpointError(f"{source} is not a distributed checkpoint (no shards/ folder): it is whole already")
    out = save_model(args.out_dir, load_checkpoint(source), source / "tokenizer.json")
    print(f"mistura checkpoint written to {out}")


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
