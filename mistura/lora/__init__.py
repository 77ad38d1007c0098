"""LoRA adapters as a module swap on a built model: low-rank updates that train while the base stays frozen.

    >>> import mistura
    >>> from mistura.lora import LoRAConfig, apply_lora, save_adapter, trainable_share
    >>> model = mistura.load("runs/quickstart")                   # or a quantised base: QLoRA
    >>> apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=("attention", "mlp")))
    >>> print(trainable_share(model))                            # 149,504 of 4,149,504 (3.60%)
    >>> ...                                                      # train: only the adapters require grad
    >>> save_adapter(model, "runs/qs-lora", base="runs/quickstart")
    >>> model = mistura.load("runs/qs-lora")                     # the base it names, adapted

The API, for a trainer:
- `LoRAConfig(rank, alpha, dropout, rslora, targets)`: targets are fnmatch patterns over
  module names or groups (`GROUPS`: attention, mlp, shared, experts, all-linear, all).
- `apply_lora(model, config) -> model`: swaps the targeted layers in place and freezes the
  rest; build the optimizer after it, over `p for p in model.parameters() if p.requires_grad`.
- `trainable_share(model) -> Share` (trainable, total, fraction; prints as "N of M (x%)").
- `save_adapter(model, dir, base=path)` / `load_adapter(model, dir)`: the adapters alone
  (checkpoint.py); a base that differs from the adapter's is refused by name.
- `merge_lora(model)` / `unmerge_lora(model)`: fold the updates into full-precision base
  weights and take them out again; `merged_model(model)`: a plain model to save, quantised
  layers dequantised (merge.py).
- `export_peft(adapter_dir, out)` / `import_peft(peft_dir, out, base_model)`: PEFT's format,
  under the names `mistura convert to-hf` gives the base (peft.py).

config.py says what an adapter is, layers.py holds the LoRA layers (linear and routed
experts, full precision or quantised), model.py which layers adapt and the swap.
"""

from mistura._lazy import lazy_exports

# The public names, by the module that defines them, imported on first use: `mistura.load`
# reads adapter folders through `checkpoint`.
_EXPORTS = {
    "mistura.lora.config": ["GROUPS", "LoRAConfig"],
    "mistura.lora.model": ["Share", "adaptable", "adapter_state", "apply_lora", "lora_config", "trainable_share"],
    "mistura.lora.merge": ["merge_lora", "merged_model", "unmerge_lora"],
    "mistura.lora.checkpoint": ["adapter_base", "is_adapter", "load_adapter", "save_adapter"],
    "mistura.lora.peft": ["export_peft", "import_peft"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
