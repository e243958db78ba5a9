"""User-facing errors: each says in one line what is wrong and what to do.

The CLI prints ``GenfwError`` messages as one red line and exits non-zero; anything else is a
bug and shows a traceback with ``--debug``.
"""


class GenfwError(Exception):
    """Base of every error genfw reports to a user without a traceback."""

    exit_code = 1


class ConfigError(GenfwError):
    """A recipe, an override or a parameter is invalid."""

    exit_code = 2


class PluginError(GenfwError):
    """A component is unknown, missing, clashing or failed to import."""


class CheckpointError(GenfwError):
    """A checkpoint or bundle cannot be read or does not describe what it holds."""


class DataError(GenfwError):
    """A dataset is missing, empty or unreadable."""


class TrainingError(GenfwError):
    """Training cannot continue (e.g. a NaN loss); the last good checkpoint is kept."""
