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


def worker_message(e: BaseException) -> str:
    """The original one-line message of an error that a DataLoader worker re-raised.

    PyTorch re-raises a worker's exception as ``type(e)(text)``, where the text holds the whole
    worker traceback; the last line of it is the message the worker raised.
    """
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    name = type(e).__name__
    for prefix in (f"{type(e).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last
