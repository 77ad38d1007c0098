"""Running a command for a user: the exit status of the `mistura` CLI and of the compare worker.

A `MisturaError` is the user's to fix, so it prints `error: <message>` without a traceback and
exits 2; Ctrl-C exits 130 quietly; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from mistura.errors import MisturaError


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
