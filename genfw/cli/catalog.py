"""``genfw plugins``, ``genfw schema`` and ``genfw recipes list|copy``: what is installed and shipped.

Listing only; the registry (genfw.registry), the schema (genfw.schema) and the shipped recipes
(genfw.catalog) do the work.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from genfw.cli.base import app, command, err, out


@command
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    check: Annotated[bool, typer.Option("--check", help="Import every component; exit 1 on broken or clashing plugins")] = False,
    params: Annotated[str | None, typer.Option("--params", metavar="NAME",
                                               help="Print a component's params (NAME or KIND:NAME)")] = None,
) -> None:
    """List registered components and plugins that failed to load."""
    from genfw.registry import get_registry  # late: start-up time

    registry = get_registry()
    if params is not None:
        _print_params(registry, params)
        return
    if check:
        _check_plugins(registry, as_json)
        return
    entries = [e.summary() for e in registry.entries()]
    conflicts = [{"kind": k, "name": n, "distributions": [e.dist for e in es]} for (k, n), es in registry.conflicts.items()]
    broken = [b.__dict__ for b in registry.broken]
    if as_json:
        out.print_json(json.dumps({"components": entries, "broken": broken, "conflicts": conflicts}))
        return
    table = Table(title="genfw components")
    for col in ("kind", "name", "distribution", "version", "description"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["kind"], e["name"], e["distribution"], e["version"], e["description"])
    out.print(table)
    for b in registry.broken:
        err.print(f"[red]{escape(b.describe())} failed to load:[/red] {escape(b.error)}", highlight=False,
                  soft_wrap=True)
    for c in conflicts:
        err.print(f"[red]{c['kind']} '{c['name']}' is registered by several distributions: "
                  f"{', '.join(c['distributions'])}[/red]")


def _print_params(registry, ref: str) -> None:
    from genfw.schema import describe_params, find_component  # late: start-up time

    kind, name = find_component(registry, ref)
    entry = registry.get(kind, name)
    cls = entry.load()
    if kind == "converter":
        _print_converter_params(entry, name, cls)
        return
    models = [("params", cls.Params)]
    if kind == "prior":
        models.append(("sample.params", cls.SamplerParams))
    for title, model in models:
        table = Table(title=f"{kind} '{name}' ({entry.dist} {entry.version}): {title}")
        for col in ("key", "type", "default", "description"):
            table.add_column(col)
        rows = describe_params(model)
        for r in rows:
            table.add_row(r["name"], r["type"], r["default"], r["description"])
        if rows:
            out.print(table)
        else:
            out.print(f"{kind} '{name}' takes no {title}")


def _print_converter_params(entry, name: str, fn) -> None:
    """A converter's ``--set`` keys (its ``Params``) and the ``genfw convert`` options it takes."""
    from genfw import convert as converters  # late: start-up time
    from genfw.schema import describe_params  # late: start-up time

    model = getattr(fn, "Params", None)
    title = f"converter '{name}' ({entry.dist} {entry.version}): --set keys"
    if model is None:
        out.print(f"{title}: not declared (the converter has no Params; --set key=value pairs reach it as given)")
    else:
        rows = describe_params(model)
        table = Table(title=title)
        for col in ("key", "type", "default", "description"):
            table.add_column(col)
        aliases = {k: f.alias or k for k, f in model.model_fields.items()}
        for r in rows:
            table.add_row(aliases.get(r["name"], r["name"]), r["type"], r["default"], r["description"])
        out.print(table) if rows else out.print(f"{title}: none")
    out.print(f"genfw convert {name}: {converters.describe(fn)}")


def _check_plugins(registry, as_json: bool) -> None:
    from genfw.plugincheck import check_entries  # late: start-up time

    problems = check_entries(registry)
    if as_json:
        out.print_json(json.dumps({"ok": not problems, "problems": problems}))
    else:
        for p in problems:
            err.print(f"[red]✗[/red] {p}", highlight=False, soft_wrap=True)
        n = len(registry.entries())
        if not problems:
            out.print(f"[green]✓[/green] {n} components from {len(registry.distributions())} distribution(s) import "
                      "and have the right base class")
    if problems:
        raise typer.Exit(1)


@command
def schema(
    output: Annotated[str | None, typer.Option("-o", "--output", help="Write here instead of printing")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file at --output")] = False,
) -> None:
    """Write the recipe JSON schema (every registered component's params) for editor completion."""
    from genfw import io  # late: start-up time
    from genfw.registry import get_registry  # late: start-up time
    from genfw.rundir import check_write_target  # late: start-up time
    from genfw.schema import recipe_schema  # late: start-up time

    if output is not None:
        check_write_target(output, overwrite, "schema")

    result, skipped = recipe_schema(get_registry())
    for s in skipped:
        err.print(f"[yellow]warning:[/yellow] left out {s}", highlight=False, soft_wrap=True)
    text = json.dumps(result, indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    io.write_bytes(output, text.encode())
    out.print(f"[green]✓[/green] recipe schema -> {output}")


recipes_app = typer.Typer(help="The recipes shipped with genfw: list them, copy one to edit.",
                          context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@command(group=recipes_app, name="list")
def recipes_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False) -> None:
    """List the shipped recipes (run one with `genfw run NAME`)."""
    from genfw.catalog import list_recipes, recipes_root  # late: start-up time

    infos = list_recipes()
    if as_json:
        out.print_json(json.dumps([{"name": i.name, "path": str(i.path), "description": i.description} for i in infos]))
        return
    table = Table(title=f"shipped recipes ({recipes_root()})")
    table.add_column("name")
    table.add_column("description")
    for i in infos:
        table.add_row(i.name, i.description)
    out.print(table)


@command(group=recipes_app, name="copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(help="A shipped recipe (genfw recipes list)")],
    target: Annotated[str | None, typer.Argument(help="Folder or .yaml path (default: the working folder)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", "--force", help="Replace an existing file")] = False,
) -> None:
    """Copy a shipped recipe (and an ablation's base recipe) to edit and run."""
    from genfw.catalog import copy_recipe  # late: start-up time

    path = copy_recipe(name, target, force=overwrite)
    out.print(f"[green]✓[/green] {name} -> {path}  (run it: genfw run {path})")
