"""The Hugging Face model types mistura converts, one module per family of them.

`registry` holds the registry (`HFModelType`, `MODEL_TYPES`, `find_model_type`,
`model_type_for`) and `common` what several families share. Every other module is a
family: its name tables, config readers and writers, and one `register` call. Importing
this package imports every module in it, so a family is registered by its file alone:
adding one is one new module here (see mistura/convert/README.md).
"""

import importlib
import pkgutil

from mistura.convert.families.registry import MODEL_TYPES, HFModelType, find_model_type, model_type_for

__all__ = ["MODEL_TYPES", "HFModelType", "find_model_type", "model_type_for"]


def _import_modules() -> None:
    """Import every module of this package, which registers each family."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_modules()
