"""What every ``genfw`` command shares: the Typer app, the consoles, the option types, and the
``command`` decorator that turns a GenfwError into one red ``error:`` line and its exit code
(``--debug`` or ``GENFW_DEBUG=1`` shows the traceback instead).

Also the helpers several command groups call (merging ``--set`` and positional overrides,
loading a recipe with its notes, warning about broken plugins). No command lives here; each
group has its own module (genfw/cli/__init__.py lists them).
"""

from __future__ import annotations

import functools
import inspect as _inspect
import os
import typing
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from genfw import __version__
from genfw.errors import GenfwError

app = typer.Typer(
    name="genfw",
    help="Two-stage discrete generative image models: tokenizers, priors and backbones as plugins.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # genfw --install-completion [bash|zsh|fish|powershell]
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}

Sets = Annotated[list[str] | None, typer.Option("--set", "-s", help="An override, as the positional ones: "
                                                                  "a.b.c=VALUE (YAML value) or ~a.b.c (delete)")]
Overrides = Annotated[list[str] | None, typer.Argument(
    metavar="OVERRIDES", help="Recipe overrides: a.b.c=VALUE sets (YAML value), ~a.b.c deletes", show_default=False)]
SamplerOverrides = Annotated[list[str] | None, typer.Argument(
    metavar="OVERRIDES", help="Sampler overrides in the recipe grammar, relative to sample.params: "
                                   "steps=50, temperature=0.7, ~temperature_end", show_default=False)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")]
DebugFlag = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors (or GENFW_DEBUG=1)")]


def _debug() -> bool:
    return _state["debug"] or os.environ.get("GENFW_DEBUG", "") not in ("", "0")


def _overrides(set_: list[str] | None, positional: list[str] | None) -> list[str]:
    """``--set`` items first, then the positional ones, each left to right."""
    return [*(set_ or []), *(positional or [])]


def _version(value: bool) -> None:
    if value:
        out.print(f"genfw {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: DebugFlag = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version")] = False,
) -> None:
    _state["debug"] = debug


def command(fn=None, *, group: typer.Typer = app, name: str | None = None, cls: Any = None):
    """Register a command whose GenfwErrors become red ``error:`` lines and a non-zero exit.

    Every command also accepts ``--debug`` (added here to its signature).
    """
    if fn is None:
        return lambda f: command(f, group=group, name=name, cls=cls)

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        if debug:
            _state["debug"] = True
        try:
            return fn(*args, **kwargs)
        except GenfwError as e:
            if _debug():
                raise
            # escaped: messages hold brackets (`pip install 'genfw[tensorboard]'`, lists); one line each
            for line in str(e).splitlines() or [""]:
                err.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except RecursionError:
            if _debug():
                raise
            err.print("[bold red]error:[/bold red] an input (recipe, override or file) is nested too deeply",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if _debug():
                raise
            what = "disk full" if getattr(e, "errno", None) == 28 else type(e).__name__
            err.print(f"[bold red]error:[/bold red] {escape(f'{what}: {e}')} (files already written were kept)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    sig = _inspect.signature(fn, eval_str=True)
    debug_param = _inspect.Parameter("debug", _inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugFlag)
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), debug_param])
    wrapper.__annotations__ = {**typing.get_type_hints(fn, include_extras=True), "debug": DebugFlag}
    return group.command(name, **({"cls": cls} if cls is not None else {}))(wrapper)


def _warn_plugin_problems() -> None:
    """Once per discovery: say that some plugins failed to load or clash (their components are unusable)."""
    from genfw.registry import get_registry  # late: start-up time

    registry = get_registry()
    if getattr(registry, "_warned", False) or not (registry.broken or registry.conflicts):
        return
    registry._warned = True
    what = [f"plugin '{b.plugin}' ({b.dist} {b.version}) failed to load: {b.error}" for b in registry.broken]
    what += [f"{k} '{n}' is registered by {' and '.join(e.dist for e in es)}" for (k, n), es in registry.conflicts.items()]
    err.print(f"[yellow]warning:[/yellow] {'; '.join(what)} (see `genfw plugins --check`)", highlight=False, soft_wrap=True)


def _load_recipe(recipe: str, overrides: list[str] | None):
    """Load and validate a recipe, then print the notes of its overrides (e.g. dropped params)."""
    from genfw.config import load_recipe  # late: start-up time

    _warn_plugin_problems()
    notes: list[str] = []
    resolved = load_recipe(recipe, overrides, notes=notes)  # an error stays one line: notes only on success
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    return resolved
