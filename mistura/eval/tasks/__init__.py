"""lm-evaluation-harness tasks that ship with mistura and run offline (`mistura eval --tasks` finds them)."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
