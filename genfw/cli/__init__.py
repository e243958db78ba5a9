"""The ``genfw`` command line (Typer + rich): ``main()``, the app, and one module per command group.

Errors are one red line and a non-zero exit; ``--debug`` (on any command, before or after its
name) or ``GENFW_DEBUG=1`` shows the traceback. Recipe overrides follow one grammar everywhere:
positional ``key.path=value`` / ``~key.path`` items, or the same after ``--set`` (docs/recipes.md).
Every command that writes names its output ``-o/--output``.

The groups: ``cli/run.py`` (validate, run, run --dry-run), ``cli/sample.py`` (sample, inpaint),
``cli/evaluate.py`` (eval, ablate, bench), ``cli/models.py`` (inspect, export, convert, assemble),
``cli/catalog.py`` (plugins, schema, recipes); ``cli/base.py`` holds the app, the consoles and the
error handling they share. Command modules only parse, call and print: the work is in genfw.api
and the modules it uses, imported inside each command so that ``genfw --help`` never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from genfw.cli import catalog, evaluate, models, run, sample  # noqa: F401 - each registers its commands
from genfw.cli.base import _state, app, command, err, out

# `genfw --help` lists the commands in this order (registration order would follow the modules);
# a command not named here comes after these (`recipes`, a group, always comes last).
_ORDER = ("plugins", "schema", "validate", "run", "eval", "ablate", "inspect", "sample", "inpaint", "export",
          "convert", "assemble", "bench")


def _position(info) -> int:  # noqa: ANN001 - typer's CommandInfo
    name = info.name or info.callback.__name__
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)


app.registered_commands.sort(key=_position)


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    import signal

    # What schedulers send before preempting a job is handled like Ctrl-C: training saves its
    # state (genfw.train), sampling keeps the images written so far.
    for sig in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), _interrupt)
    try:
        app()
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)


__all__ = ["app", "main", "command", "out", "err", "_state", "Path"]
