"""Weight quantisation: fp8 (DeepSeek-V3's blocks), int8 and int4, as module swaps on a built model.

    format  weight codes            scales                                    activations     fast path
    fp8     float8_e4m3fn           one per 128 x 128 block (fp32)            e4m3, 1 x 128   Triton, CUDA
    int8    int8, symmetric         one per output row (default) or group     bf16            CPU kernel (rows)
    int4    4 bits, two per byte    scale + zero point per 128 inputs (bf16)  bf16            CPU kernel

    >>> from mistura.quant import QuantConfig, quantize_checkpoint
    >>> quantize_checkpoint("runs/quickstart", "runs/quickstart-int4", QuantConfig("int4"))
    >>> model = mistura.load("runs/quickstart-int4")     # a ready model, quantised

`quantize_model` swaps a model's layers in memory (model.py says which); checkpoint.py
writes and reads quantised checkpoints; quantize.py turns any model folder into one;
each format's module says what it stores and why.
Where no kernel fits (another device, an odd shape), a layer multiplies by its dequantised
weight: the reference semantics, which the kernels are tested against.
"""

from mistura._lazy import lazy_exports

# The public names, by the module that defines them, imported on first use: `mistura.load`
# reads quantised checkpoints through `checkpoint`, and `quantize` loads models with it.
_EXPORTS = {
    "mistura.quant.model": ["FORMATS", "QuantConfig", "quantize_model"],
    "mistura.quant.checkpoint": ["load_quantized", "save_quantized", "weights_bytes"],
    "mistura.quant.quantize": ["quantize_checkpoint"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
