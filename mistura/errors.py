"""Errors a user can act on.

Every problem caused by input (a config, a file, a checkpoint, a prompt) raises a
subclass of `MisturaError` with a message that names the culprit; the CLI prints the
message alone, without a traceback.
"""


class MisturaError(Exception):
    """Base class for errors caused by the user's input."""


class ConfigError(MisturaError, ValueError):
    """An invalid configuration: unknown key, wrong type, inconsistent shape."""


class DataError(MisturaError):
    """A missing, empty or malformed data file or corpus."""


class CheckpointError(MisturaError):
    """A missing, truncated or mismatched checkpoint."""


class DistributedError(MisturaError):
    """A failed process group: another process crashed, hangs or quit, or the processes disagree."""
