"""Import arrows point one way: the model below everything, checkpoint I/O below the formats,
the format dispatch (mistura.loading) above them, the CLI on top and imported by nobody."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import mistura

PACKAGE = Path(mistura.__file__).parent


def imported_after(statement: str) -> set[str]:
    """The mistura modules in sys.modules after `statement` runs in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {name for name in json.loads(out.stdout.splitlines()[-1]) if name.startswith("mistura")}


def under(modules: set[str], package: str) -> set[str]:
    return {name for name in modules if name == package or name.startswith(package + ".")}


def library_modules() -> list[str]:
    """Every module of the package but the command line."""
    names = [info.name for info in pkgutil.walk_packages([str(PACKAGE)], prefix="mistura.")]
    return [name for name in names if not under({name}, "mistura.cli")]


def test_checkpoint_io_imports_no_format_built_on_it():
    modules = imported_after("import mistura.checkpoint")
    assert under(modules, "mistura.convert") == set()
    assert under(modules, "mistura.quant") == set()
    assert "mistura.loading" not in modules


def test_model_imports_only_its_config():
    config = {"mistura.config", "mistura.presets", "mistura.errors", "mistura.fields"}
    package = {"mistura", "mistura._lazy", "mistura.cpu_isa"}
    modules = imported_after("import mistura.model")
    assert modules - under(modules, "mistura.model") <= config | package


def test_no_library_module_imports_the_cli():
    modules = library_modules()
    assert "mistura.loading" in modules and "mistura.compare.worker" in modules
    statement = "\n".join(f"import {name}" for name in modules)
    assert under(imported_after(statement), "mistura.cli") == set()


def test_loading_is_the_public_api():
    assert mistura.load.__module__ == "mistura.loading"
    assert mistura.load_tokenizer.__module__ == "mistura.loading"
