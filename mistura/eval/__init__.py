"""Scoring checkpoints: perplexity, bits per byte and tokens per word on any text (perplexity.py)."""


def require_harness(what: str) -> None:
    """A ConfigError naming `what` unless lm-evaluation-harness is installed (checked without importing it)."""
    from importlib.util import find_spec

    from mistura.errors import ConfigError

    if find_spec("lm_eval") is None:
        raise ConfigError(f"{what} needs lm-evaluation-harness: pip install -e '.[eval]'")
