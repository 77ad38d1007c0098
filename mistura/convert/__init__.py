"""Checkpoint conversion between mistura and other formats.

- `hf`: Hugging Face folders both ways (`from_hf`, `to_hf`), streaming; see README.md here.
- `families`: per Hugging Face model type, a name table, a config reader and a writer, one module per family.
- `mapping`: a name table expanded for one model, read in both directions.
- `fp8`, `parallel`: FP8 block quantisation, model-parallel checkpoints.

The converters read and write weights through `mistura.shards` and build on
`mistura.checkpoint`; `mistura.load` (mistura.loading) sits above them all. Importing this
package imports no converter: `from mistura.convert import from_hf` loads `hf` on first use.
"""

from mistura._lazy import lazy_exports

_EXPORTS = {
    "mistura.convert.hf": ["config_from_hf", "from_hf", "hf_config", "load_hf_folder", "state_dict_from_hf", "to_hf"]
}
__all__ = _EXPORTS["mistura.convert.hf"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
