"""LoRA adapters: `mistura lora merge` folds an adapter into its base and saves a full-precision checkpoint,
`mistura lora export-peft` and `import-peft` move adapters to and from PEFT's format.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `lora merge`, `lora export-peft` and `lora import-peft` to the subcommands."""
    p = sub.add_parser("lora", help="LoRA adapters: merge into the base, export to and import from PEFT")
    kinds = p.add_subparsers(dest="lora_command", required=True)

    c = kinds.add_parser("merge", help="fold an adapter into its base: a full-precision checkpoint (QLoRA too)")
    c.add_argument("adapter", help="adapter folder (adapter_config.json + adapter.safetensors)")
    c.add_argument("out", help="new checkpoint directory")
    c.add_argument("--base", metavar="CKPT", help="the base checkpoint (default: the one the adapter names)")
    c.set_defaults(func=cmd_merge)

    c = kinds.add_parser("export-peft", help="an adapter in PEFT's format, for the base `convert to-hf` writes")
    c.add_argument("adapter", help="adapter folder")
    c.add_argument("out", help="new PEFT folder (adapter_config.json + adapter_model.safetensors)")
    c.add_argument("--base-name", help="base_model_name_or_path to write, e.g. the exported Hugging Face folder")
    c.set_defaults(func=cmd_export_peft)

    c = kinds.add_parser("import-peft", help="a PEFT LoRA folder as a mistura adapter for a base checkpoint")
    c.add_argument("peft_dir", help="PEFT folder (adapter_config.json + adapter_model.safetensors)")
    c.add_argument("out", help="new adapter folder")
    c.add_argument("--base", metavar="CKPT", required=True, help="the base checkpoint (or its Hugging Face folder)")
    c.set_defaults(func=cmd_import_peft)


def cmd_merge(args: argparse.Namespace) -> None:
    import mistura
    from mistura.checkpoint import resolve, save_model
    from mistura.lora import adapter_base, load_adapter, merged_model

    base = resolve(args.base) if args.base else adapter_base(args.adapter)
    _check_output(args.out, base, args.adapter)
    model = merged_model(load_adapter(mistura.load(base), args.adapter))
    tokenizer = base / "tokenizer.json"
    save_model(args.out, model, tokenizer if tokenizer.is_file() else None)
    print(f"merged checkpoint (full precision) written to {args.out}")


def cmd_export_peft(args: argparse.Namespace) -> None:
    from mistura.lora import export_peft

    _check_output(args.out, args.adapter)
    out = export_peft(args.adapter, args.out, base_name=args.base_name)
    print(f"PEFT adapter written to {out}; load it with peft.PeftModel.from_pretrained on the `convert to-hf` model")


def cmd_import_peft(args: argparse.Namespace) -> None:
    import mistura
    from mistura.lora import import_peft, lora_config

    _check_output(args.out, args.base, args.peft_dir)
    model = mistura.load(args.base)
    out = import_peft(args.peft_dir, args.out, model, base_path=args.base)
    print(f"mistura adapter written to {out} (rank {lora_config(model).rank})")


def _check_output(out: str, *inputs: str | Path) -> None:
    """The output folder must be none of the command's inputs, which writing it would replace."""
    from mistura.errors import ConfigError

    if any(Path(out).resolve() == Path(path).resolve() for path in inputs):
        raise ConfigError(f"{out}: the output folder must be another folder than the command's inputs")
