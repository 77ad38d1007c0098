"""Writing files and folders so that a reader sees the old version or the new one, never half of each."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` once the block ends without an error.

    The bytes go to a hidden temporary file beside `path`, on the same filesystem, so
    the final `os.replace` is atomic; an exception deletes it and leaves `path` as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            yield file
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any, indent: int = 1) -> None:
    """`data` as UTF-8 JSON at `path` (non-ASCII text kept, other objects as their str), written atomically into
    its folder, which is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as file:
        file.write(json.dumps(data, indent=indent, ensure_ascii=False, default=str).encode("utf-8") + b"\n")


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty folder that takes `final`'s place once the block ends without an error.

    The folder is built under a hidden name beside `final` and renamed into place; an
    exception deletes it and leaves `final` as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    previous = final.with_name(f".{final.name}.{os.getpid()}.old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if final.exists():
            os.replace(final, previous)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
