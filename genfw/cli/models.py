"""``genfw inspect``, ``genfw export``, ``genfw assemble`` and ``genfw convert``: model files.

Reading a file's header, writing bundles and converting foreign checkpoints are done by
genfw.checkpoint, genfw.bundle and genfw.convert; this module parses the options and prints.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
import typer.core
from rich.table import Table

from genfw.cli.base import command, out
from genfw.errors import ConfigError


@command
def inspect(path: Annotated[str, typer.Argument(help="A genfw .safetensors file (path or URL)")],
            as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print a checkpoint's metadata, parameter counts per component and a tensor summary."""
    from genfw.api import inspect_file  # late: start-up time

    info = inspect_file(path)  # the header only: no tensor is read
    meta, comps = info["metadata"], info["metadata"]["components"]
    if as_json:
        out.print_json(json.dumps(meta, default=str))
        return
    out.print(f"[bold]{path}[/bold]: {meta.get('type')} (format {meta.get('format_version')}, "
              f"genfw {meta.get('genfw_version')})")
    table = Table()
    for col in ("role", "kind", "name", "plugin", "parameters", "tensors"):
        table.add_column(col)
    for c in comps:
        table.add_row(c.get("role", ""), c.get("kind", ""), c.get("name", ""), f"{c.get('dist')} {c.get('version')}",
                      f"{c['parameters']:,}", str(c["tensors"]))
        for n in c.get("nested") or []:  # e.g. a prior's backbone, which may come from another plugin
            if isinstance(n, dict):
                table.add_row(f"  {c.get('role')}/{n.get('path')}", str(n.get("kind", "")), str(n.get("name", "")),
                              f"{n.get('dist')} {n.get('version')}", "", "")
    out.print(table)
    for c in comps:
        out.print(f"[dim]{c.get('role')} params:[/dim] {json.dumps(c.get('params'))}")
        out.print(f"[dim]{c.get('role')} construct:[/dim] {json.dumps(c.get('construct'))}")
        for n in c.get("nested") or []:
            if isinstance(n, dict):
                out.print(f"[dim]{c.get('role')}/{n.get('path')} params:[/dim] {json.dumps(n.get('params'))}")
    out.print(f"{info['tensors']} tensors: " + ", ".join(f"{n:,} {d}" for d, n in info["elements"].items()))


@command
def export(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory")],
    output: Annotated[str, typer.Option("-o", "--output", help="Bundle file to write")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file at --output")] = False,
) -> None:
    """Write one self-describing bundle (tokenizer, priors, sampler defaults, label names)."""
    from genfw.api import export as export_bundle  # late: start-up time

    export_bundle(run_dir, output, overwrite=overwrite)
    out.print(f"[green]✓[/green] bundle -> {output} ({os.path.getsize(output) / 1e6:.1f} MB)"
              if os.path.exists(output) else f"[green]✓[/green] bundle -> {output}")


class _ConvertCommand(typer.core.TyperCommand):
    """``genfw convert --help`` lists the converters registered now (built-in and third-party)."""

    def format_help(self, ctx, formatter):  # noqa: ANN001 - click's signature
        from genfw.registry import get_registry  # late: start-up time

        try:
            names = ", ".join(get_registry().names("converter")) or "none installed"
        except Exception:  # noqa: BLE001 - help must always print
            names = "see genfw plugins"
        # the templates are kept: the registry may differ at the next --help in this process (tests)
        templates = self.__dict__.setdefault("_templates", {"": self.help or ""})
        self.help = f"{templates['']} Converters registered: {names}."
        for param in self.params:
            if param.name == "source_format" and param.help:
                param.help = templates.setdefault(param.name, param.help).replace("{converters}", names)
        return super().format_help(ctx, formatter)


@command(cls=_ConvertCommand)
def convert(
    source_format: Annotated[str, typer.Argument(metavar="FORMAT",
                                                 help="Converter name: {converters} (genfw plugins; "
                                                      "its --set keys: genfw plugins --params converter:NAME)")],
    source: Annotated[str, typer.Argument(help="Checkpoint to convert (your own file)")],
    output: Annotated[str, typer.Option("-o", "--output", help="genfw .safetensors to write")],
    config: Annotated[str | None, typer.Option(help="Hyper-parameters the file lacks (JSON/TOML/YAML: the authors' "
                                                    "hparams or config file)")] = None,
    preset: Annotated[str | None, typer.Option(help="Named hyper-parameters of a released model (see docs/converting.md)")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training image size, where the checkpoint does not record it")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="One hyper-parameter: key=value (YAML value)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists")] = False,
) -> None:
    """Convert a foreign checkpoint (another project's model file) into a genfw model file."""
    from genfw import convert as converters  # late: start-up time
    from genfw.config import parse_value  # late: start-up time
    from genfw.registry import get_registry  # late: start-up time
    from genfw.rundir import check_write_target  # late: start-up time

    registry = get_registry()
    registry.get("converter", source_format)  # an unknown name is the first thing to say
    values: dict[str, Any] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        values[key.strip()] = parse_value(value)  # invalid YAML stays text, for the converter to judge
    check_write_target(output, overwrite, "model file")
    converters.run(source_format, source, output, config=config, preset=preset, resolution=resolution,
                   set_values=values or None, registry=registry)
    out.print(f"[green]✓[/green] {source} -> {output}")


@command
def assemble(
    output: Annotated[str, typer.Option("-o", "--output", help="Bundle file to write")],
    tokenizer: Annotated[str, typer.Option(help="Tokenizer model file (e.g. from genfw convert)")],
    prior: Annotated[list[str], typer.Option(help="Prior model file, coarsest level first (repeat per level)")],
    sampler: Annotated[list[str] | None, typer.Option(help="Sampler default key=value (e.g. steps=100), stored in the bundle")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists")] = False,
) -> None:
    """Assemble a bundle (for sample, inpaint, bench) from a tokenizer file and prior files."""
    from genfw.bundle import assemble as assemble_bundle  # late: start-up time
    from genfw.rundir import check_write_target  # late: start-up time

    check_write_target(output, overwrite, "bundle")
    assemble_bundle(output, tokenizer, prior, sampler or [])
    out.print(f"[green]✓[/green] bundle -> {output}")
