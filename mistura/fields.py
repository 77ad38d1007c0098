"""Building validated dataclasses from plain dicts (YAML, JSON, `--set key=value`).

`from_dict` rejects unknown keys (suggesting the closest field), checks each value
against the field's annotation and converts the few things YAML and JSON cannot
express (ints for floats, lists for tuples). Errors name the field, for example
`model.n_head: expected int, got 'four'`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mistura.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `data`; `where` prefixes error messages (e.g. "model")."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    values = {key: convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    return cls(**values)


def convert(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a type annotation, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # an Optional: the inner type's message is the precise one
            return convert(value, options[0], where)
        for arg in options:
            try:
                return convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(annotation)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else from_dict(annotation, value, where)
    if annotation is Any:
        return value
    if annotation is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        return _to_float(value, where)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {_describe(annotation)}, got {value!r}")
    return value


def _to_float(value: int | str, where: str) -> float:
    """Floats from ints, and from strings such as "3e-4" that YAML 1.1 leaves unparsed."""
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected float, got {value!r}") from None


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `["model.n_layer=2", "train.lr=1e-3"]` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: {raw!r} is not a YAML value ({_first_line(err)})") from err
    return nested


def _first_line(err: yaml.YAMLError) -> str:
    """A YAML error's own words, without the excerpt of the text it points into."""
    return getattr(err, "problem", None) or str(err).splitlines()[0]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base`."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path, expected: str = "a mapping of sections") -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file or bad YAML is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected} at the top level")
    return data
