"""The ``genfw`` command line (Typer + rich).

Errors are one red line and a non-zero exit; ``--debug`` (on any command, before or after its
name) or ``GENFW_DEBUG=1`` shows the traceback. Recipe overrides follow one grammar everywhere:
positional ``key.path=value`` / ``~key.path`` items, or the same after ``--set`` (docs/recipes.md).
Every command that writes names its output ``-o/--output``.
"""

from __future__ import annotations

import functools
import inspect as _inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from genfw import __version__
from genfw.errors import ConfigError, GenfwError

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


# --------------------------------------------------------------------------------------------


@command
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    check: Annotated[bool, typer.Option("--check", help="Import every component; exit 1 on broken or clashing plugins")] = False,
    params: Annotated[str | None, typer.Option("--params", metavar="NAME",
                                               help="Print a component's params (NAME or KIND:NAME)")] = None,
) -> None:
    """List registered components and plugins that failed to load."""
    from genfw.registry import get_registry

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
    from genfw.schema import describe_params, find_component

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
    from genfw import convert as converters
    from genfw.schema import describe_params

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
    from genfw.plugincheck import check_entries

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
    from genfw import io
    from genfw.registry import get_registry
    from genfw.rundir import check_write_target
    from genfw.schema import recipe_schema

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


def _warn_plugin_problems() -> None:
    """Once per discovery: say that some plugins failed to load or clash (their components are unusable)."""
    from genfw.registry import get_registry

    registry = get_registry()
    if getattr(registry, "_warned", False) or not (registry.broken or registry.conflicts):
        return
    registry._warned = True
    what = [f"plugin '{b.plugin}' ({b.dist} {b.version}) failed to load: {b.error}" for b in registry.broken]
    what += [f"{k} '{n}' is registered by {' and '.join(e.dist for e in es)}" for (k, n), es in registry.conflicts.items()]
    err.print(f"[yellow]warning:[/yellow] {'; '.join(what)} (see `genfw plugins --check`)", highlight=False, soft_wrap=True)


def _load_recipe(recipe: str, overrides: list[str] | None):
    """Load and validate a recipe, then print the notes of its overrides (e.g. dropped params)."""
    from genfw.config import load_recipe

    _warn_plugin_problems()
    notes: list[str] = []
    resolved = load_recipe(recipe, overrides, notes=notes)  # an error stays one line: notes only on success
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    return resolved


@command
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML (path, fsspec URL or shipped name: genfw recipes list)")],
    overrides: Overrides = None,
    set_: Sets = None,
    summary: Annotated[bool, typer.Option("--summary", help="Also print parameter counts and FLOPs")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when this machine cannot run it yet "
                                                          "(missing data or weights, no such device)")] = False,
) -> None:
    """Check a recipe (schema, components, params, combination), then whether this machine can run it.

    The machine checks (data, weights, device) are reported but do not fail the command unless
    --strict: a recipe meant for another machine still validates here.
    """
    from genfw.catalog import resolve
    from genfw.preflight import preflight

    resolved = _load_recipe(resolve(recipe), _overrides(set_, overrides))
    specs = [resolved.recipe.tokenizer, *resolved.prior_specs]
    if any(spec.init_from or spec.checkpoint for spec in specs):
        from genfw.budget import check_model_sources
        from genfw.context import RunContext
        from genfw.preflight import check_device

        usable = check_device(resolved.recipe.device) is None
        check_model_sources(RunContext(resolved, device=None if usable else "cpu"), missing_ok=True)
    out.print(f"[green]✓[/green] {recipe}: recipe '{resolved.recipe.name}' is valid "
              f"({len(resolved.prior_specs)} prior level(s))")
    report = preflight(resolved)
    for check in report.checks:
        mark = "[green]✓[/green]" if check.ok else "[yellow]✗[/yellow]"
        out.print(f"  {mark} {check.name}: {escape(check.message)}", highlight=False, soft_wrap=True)
    if report.failed:
        out.print(f"[yellow]not ready on this machine[/yellow]: {len(report.failed)} check(s) failed "
                  "(genfw run would stop before its first stage)")
        if strict:
            report.raise_if_failed()
    if summary:
        from genfw.pipeline import Run
        from genfw.preflight import check_device

        usable = check_device(resolved.recipe.device) is None
        _print_plan(Run(resolved, device=None if usable else "cpu").plan())


def _print_plan(plan: dict[str, Any]) -> None:
    table = Table(title=f"plan -> {plan['output_dir']} on {plan['device']}")
    for col in ("component", "name", "parameters", "details"):
        table.add_column(col)
    tok = plan["tokenizer"]
    levels = ", ".join(f"{lv['codebook_size']} codes @ {lv['grid'][0]}x{lv['grid'][1]}" for lv in tok["levels"])
    table.add_row("tokenizer", tok["name"], f"{tok['parameters']:,}", levels)
    for p in plan["priors"]:
        flops = f"{p['forward_flops'] / 1e9:.2f} GFLOP per forward (batch 1)" if p.get("forward_flops") else ""
        table.add_row(f"prior level {p['level']}", f"{p['name']} / {p['backbone']}", f"{p['parameters']:,}", flops)
    out.print(table)
    out.print(f"stages: {' -> '.join(plan['stages'])}")


OutputDir = Annotated[str | None, typer.Option("-o", "--output", help="Run directory (default: the recipe's output_dir "
                                                                      "or runs/NAME)")]
_OldOutputDir = Annotated[str | None, typer.Option("--output-dir", hidden=True)]


@command
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML (path, fsspec URL or shipped name: genfw recipes list)")],
    overrides: Overrides = None,
    set_: Sets = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated subset: tokenizer,latents,prior,sample,evaluate,report")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check, print the plan (parameter counts, FLOPs) and stop")] = False,
    output: OutputDir = None,
    output_dir: _OldOutputDir = None,
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option(help="Reuse a run directory that belongs to another recipe")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete genfw's stage folders made from other inputs "
                                                        "(default: move them aside as <stage>.replaced-<time>; "
                                                        "folders genfw did not make are always moved aside)")] = False,
) -> None:
    """Validate a recipe and check this machine, then train, sample, evaluate and report into its run directory.

    Unchanged stages are reused, interrupted ones resume, raising train.*.steps continues
    training; one run per directory at a time.
    """
    from genfw.catalog import resolve
    from genfw.rundir import fail_fast_if_locked

    recipe = resolve(recipe)
    if not dry_run and int(os.environ.get("RANK", "0")) == 0:
        fail_fast_if_locked(recipe, _overrides(set_, overrides), output or output_dir)  # before torch is imported
    from genfw import dist
    from genfw.pipeline import STAGES, Run
    from genfw.preflight import check_device, preflight
    from genfw.progress import announce

    dist.init_from_env()
    resolved = _load_recipe(recipe, _overrides(set_, overrides))
    wanted = stages.split(",") if stages else None
    unknown = [s for s in wanted or [] if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
    requested = None if device == "auto" else device
    bad_device = check_device(requested or resolved.recipe.device)
    if bad_device:
        raise GenfwError(f"device: {bad_device}")
    pipeline = Run(resolved, output_dir=output or output_dir, device=requested, overwrite=overwrite, force=force)
    preflight(resolved, pipeline.device, wanted).raise_if_failed()
    if dry_run:
        from genfw.budget import check_model_sources, check_training_memory

        check_training_memory(pipeline)
        check_model_sources(pipeline)
        _print_plan(pipeline.plan())
        return
    announce(pipeline.device, resolved.recipe.train.prior.precision)
    metrics = pipeline.run(wanted)
    main = dist.is_main()
    dist.destroy()  # under torchrun
    if main:
        out.print(f"[green]✓[/green] run finished: {pipeline.dir}")
    if metrics and main:
        _print_metrics(metrics)


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(title="metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(table)
    from genfw.report import context_lines

    for line in context_lines(metrics):  # FID beside its floor, class accuracy beside the classifiers
        out.print(line.strip(), markup=False, highlight=False)


@command
def eval(  # noqa: A001 - the command is called eval
    run_dir: Annotated[str, typer.Argument(help="A run directory (made by genfw run)")],
    overrides: Overrides = None,
    set_: Sets = None,
    device: Device = "auto",
    force: Annotated[bool, typer.Option("--force", help="Recompute even when nothing changed "
                                                        "(earlier results stay in metrics_history.jsonl)")] = False,
) -> None:
    """(Re)compute a run's metrics: fidelity, class accuracy, reconstruction, NLL, speed.

    --set overrides apply to this evaluation only: the run's recipe.yaml is never rewritten;
    every evaluation is appended to metrics_history.jsonl with what it changed.
    """
    from genfw import dist
    from genfw.config import apply_overrides, load_yaml, validate_recipe
    from genfw.pipeline import Run
    from genfw.preflight import check_device, preflight
    from genfw.progress import announce

    dist.init_from_env()  # under torchrun: sampling and fidelity features split over the ranks
    recipe_file = os.path.join(run_dir, "recipe.yaml")
    if not os.path.exists(recipe_file):
        raise GenfwError(f"{run_dir} is not a genfw run directory (no recipe.yaml)")
    set_ = _overrides(set_, overrides)
    resolved = validate_recipe(apply_overrides(load_yaml(recipe_file), set_))
    requested = None if device == "auto" else device
    bad_device = check_device(requested or resolved.recipe.device)
    if bad_device:
        raise GenfwError(f"device: {bad_device}")
    from genfw.rundir import describe_holder, holder_if_running

    holder = holder_if_running(run_dir)
    if holder is not None:  # mid-run: the latest snapshots, evaluated beside the run
        from genfw.pipeline import SnapshotEvaluation, load_run_models
        from genfw.sampling import resolve_device

        dev = resolve_device(None if device == "auto" else device)
        tokenizer, priors, extra = load_run_models(run_dir, dev)
        steps = ", ".join(f"{stage} snapshot at step {step}" for stage, step in extra["snapshots"].items())
        err.print(f"[yellow]•[/yellow] the run is still going ({describe_holder(holder)}): evaluating "
                  f"{steps or 'its finished models'}", soft_wrap=True)
        pipeline = SnapshotEvaluation(resolved, run_dir, tokenizer, priors, extra["snapshots"], device=str(dev),
                                      changed_from_recipe=set_)
        metrics = pipeline.run(["sample", "evaluate"])
        if dist.is_main():
            _print_metrics(metrics)
            out.print(f"[green]✓[/green] metrics -> {pipeline.path('metrics.json')}")
        dist.destroy()
        return
    pipeline = Run(resolved, output_dir=run_dir, device=None if device == "auto" else device, force=force,
                   write_recipe=False, changed_from_recipe=set_)
    if force:
        pipeline.stage("evaluate").redo = True
    preflight(resolved, pipeline.device, ["sample", "evaluate", "report"]).raise_if_failed()
    announce(pipeline.device, resolved.recipe.train.prior.precision)
    metrics = pipeline.run(["sample", "evaluate", "report"])
    if dist.is_main():
        _print_metrics(metrics)
        out.print(f"[green]✓[/green] metrics -> {pipeline.path('metrics.json')}")
    dist.destroy()


@command
def ablate(
    grid: Annotated[str, typer.Argument(help="Ablation YAML (path or shipped name, e.g. ablations/priors): "
                                             "a base recipe plus variants and/or a grid of overrides")],
    overrides: Overrides = None,
    set_: Sets = None,
    output: Annotated[str | None, typer.Option("-o", "--output", help="Folder of the combinations and the "
                                                                      "comparison (default: the file's output_dir)")] = None,
    device: Device = "auto",
    seeds: Annotated[int | None, typer.Option(
        help="Train every combination's prior N times (seeds 0..N-1; tokenizer and latents shared): "
             "per-seed values (t-interval from 3 seeds), paired or Welch tests with Holm")] = None,
    sweep_steps: Annotated[str | None, typer.Option(
        help="Comma-separated sampling step counts, e.g. 10,25,50: a frontier of quality vs counted "
             "sampling FLOPs and vs seconds per image, one curve per combination (sweep.png)")] = None,
) -> None:
    """Run every combination of a grid (sharing common stages) and write a comparison table and plots."""
    from genfw.ablate import summary_rows, tuned_rows
    from genfw.api import ablate as run_ablation
    from genfw.preflight import check_device
    from genfw.progress import announce
    from genfw.sampling import resolve_device

    steps = None
    if sweep_steps is not None:
        try:
            steps = [int(v) for v in sweep_steps.split(",") if v.strip()]
        except ValueError:
            raise GenfwError(f"--sweep-steps expects integers like 10,25,50, got '{sweep_steps}'") from None
    bad_device = check_device(None if device == "auto" else device)
    if bad_device:
        raise GenfwError(f"device: {bad_device}")
    announce(resolve_device(device), None)
    results = run_ablation(grid, _overrides(set_, overrides), device=None if device == "auto" else device,
                           output_dir=output, seeds=seeds, sweep_steps=steps)
    header, rows = summary_rows(results)
    table = Table(title="ablation (mean [95% t-interval] from 3 seeds, else each seed's value; see comparison.md)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    header, rows = tuned_rows(results)
    if rows:  # plain lines: a table would cut the settings short in a narrow terminal
        out.print("tuned sampler settings (chosen on the validation reference, reported on test):")
        for name, settings, value, tried in rows:
            out.print(f"  {name}: {settings}  ({header[2]} {value}; {tried} settings tried)", soft_wrap=True)


@command
def inspect(path: Annotated[str, typer.Argument(help="A genfw .safetensors file (path or URL)")],
            as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print a checkpoint's metadata, parameter counts per component and a tensor summary."""
    from genfw import checkpoint

    header, meta = checkpoint.read_meta(path)  # the header only: no tensor is read
    floating = {"F64", "F32", "F16", "BF16"}
    numel = {k: _numel(v["shape"]) for k, v in header.items()}
    comps = []
    for c in meta.get("components", []):
        prefix = c.get("prefix", "")
        own = [k for k in header if k.startswith(prefix)]
        comps.append({**c, "parameters": sum(numel[k] for k in own if header[k]["dtype"] in floating),
                      "tensors": len(own)})
    if as_json:
        out.print_json(json.dumps({**{k: v for k, v in meta.items() if k != "components"}, "components": comps},
                                  default=str))
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
    by_dtype: dict[str, int] = {}
    for k, v in header.items():
        name = str(checkpoint._DTYPES[v["dtype"]])
        by_dtype[name] = by_dtype.get(name, 0) + numel[k]
    out.print(f"{len(header)} tensors: " + ", ".join(f"{n:,} {d}" for d, n in by_dtype.items()))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _parse_size(size: str | None) -> tuple[int, int] | None:
    if not size:
        return None
    try:
        h, w = (int(v) for v in size.lower().split("x"))
        return h, w
    except ValueError:
        raise GenfwError(f"--size expects HxW code-grid sizes like 16x48, got '{size}'") from None


_OldOut = Annotated[str | None, typer.Option("--out", hidden=True)]


@command
def sample(
    model: Annotated[str, typer.Argument(help="Exported bundle (.safetensors, path or URL) or a run directory")],
    overrides: SamplerOverrides = None,
    n: Annotated[int, typer.Option("-n", help="Number of images")] = 16,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (priors that have them); = steps=N")] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature; constant unless --temperature-end is given")] = None,
    temperature_end: Annotated[float | None, typer.Option(
        help="Temperature at the last step (annealed linearly from --temperature)")] = None,
    proportion: Annotated[float | None, typer.Option(
        help="SUNDAE: fraction of positions updated per step; constant unless --proportion-end is given")] = None,
    proportion_end: Annotated[float | None, typer.Option(help="SUNDAE: proportion at the last step")] = None,
    label: Annotated[list[int] | None, typer.Option(help="Class label(s), cycled over the samples "
                                                         "(default: every class in turn)")] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="bf16, fp16 or fp32 (autocast on CUDA; CPU samples in fp32)")] = "bf16",
    batch_size: Annotated[int, typer.Option(help="Images per chunk")] = 16,
    size: Annotated[str | None, typer.Option(help="Code grid HxW larger than training (if the prior supports it)")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="Folder for the PNGs")] = "samples",
    out_dir: _OldOut = None,
    grid: Annotated[str | None, typer.Option(help="Also write a grid PNG here")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="A sampler override, as the positional ones")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs of the same names")] = False,
) -> None:
    """Generate images from an exported model or a run directory (mid-run: its latest snapshots).

    Images are written as they are made; Ctrl-C (or SIGTERM) keeps those already written. The
    Python API's Model.generate does the sampling.
    """
    from genfw import dist, io
    from genfw.api import load_model
    from genfw.progress import announce
    from genfw.rundir import check_write_target
    from genfw.samples import image_name, write_grid, write_images
    from genfw.sampling import flag_overrides, resolve_device

    dist.init_from_env()  # under torchrun the chunks are split over the ranks, each image written once
    folder = out_dir or output
    dev = resolve_device(device)
    announce(dev, precision)
    _warn_plugin_problems()
    model_ = load_model(model, dev)
    for stage, step in (model_.extra.get("snapshots") or {}).items():
        err.print(f"[yellow]•[/yellow] {stage} is still training: using its snapshot at step {step}")
    flags = flag_overrides(steps, temperature, temperature_end, proportion, proportion_end)
    labels = model_.labels(n, label)
    class_names = model_.class_names
    # every file this command would write is checked before any work
    targets = [os.path.join(folder, image_name(i, int(labels[i]) if labels is not None else None, class_names))
               for i in range(n)] + ([grid] if grid else [])
    for target in targets:
        check_write_target(target, overwrite, "images")
    if os.path.isdir(folder) and dist.is_main():
        io.remove_temp_files(folder)  # left by an earlier interrupted write (before any rank writes)
    dist.barrier()
    written: list[str] = []

    def keep(start: int, images, _codes) -> None:
        chunk = labels[start : start + images.shape[0]] if labels is not None else None
        written.extend(write_images(folder, images, chunk, class_names, start=start))

    try:
        result = model_.generate(n, labels=label, seed=seed, batch_size=batch_size, precision=precision,
                                 size=_parse_size(size), overrides=_overrides(set_, overrides), flags=flags,
                                 on_chunk=keep)
    except KeyboardInterrupt:
        raise GenfwError(f"interrupted: {len(written)} of {n} images were written to {folder} and are kept"
                         + (f" (by rank {dist.rank()})" if dist.is_initialized() else "")) from None
    main = dist.is_main()
    dist.destroy()
    if not main:
        return
    if grid:
        write_grid(grid, result.images)
    processes = f", {dist_world} processes" if (dist_world := int(os.environ.get("WORLD_SIZE", "1"))) > 1 else ""
    out.print(f"[green]✓[/green] {n} images -> {folder} in {result.seconds:.2f}s "
              f"({result.images_per_second:.2f} images/s on {dev}{processes})")


@command
def inpaint(
    model: Annotated[str, typer.Argument(help="Exported bundle (.safetensors) or a run directory")],
    overrides: SamplerOverrides = None,
    image: Annotated[str, typer.Option(help="Input image")] = ...,
    mask: Annotated[str, typer.Option(help="Mask image: white (non-zero) pixels are regenerated")] = ...,
    n: Annotated[int, typer.Option("-n", help="Number of completions")] = 4,
    label: Annotated[int | None, typer.Option(help="Class label; required for class-conditional models")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    temperature: Annotated[float | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="Folder for the completions")] = "inpainted",
    out_dir: _OldOut = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="A sampler override, as the positional ones")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs of the same names")] = False,
) -> None:
    """Regenerate the masked region of an image (any mask shape), keeping the rest."""
    from genfw.api import load_model
    from genfw.inpaint import inpaint_file
    from genfw.progress import announce
    from genfw.rundir import check_write_target
    from genfw.sampling import resolve_device

    dev = resolve_device(device)
    announce(dev, "bf16")
    _warn_plugin_problems()
    folder = out_dir or output
    for target in [*(os.path.join(folder, f"{i:03d}.png") for i in range(n)), os.path.join(folder, "side_by_side.png")]:
        check_write_target(target, overwrite, "images")
    path = inpaint_file(load_model(model, dev), image, mask, n=n, label=label, seed=seed, temperature=temperature,
                        steps=steps, out_dir=folder, overrides=_overrides(set_, overrides))
    out.print(f"[green]✓[/green] {n} completions -> {path}")


@command
def export(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory")],
    output: Annotated[str, typer.Option("-o", "--output", help="Bundle file to write")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file at --output")] = False,
) -> None:
    """Write one self-describing bundle (tokenizer, priors, sampler defaults, label names)."""
    from genfw import checkpoint
    from genfw.pipeline import load_run_models
    from genfw.rundir import check_write_target

    check_write_target(output, overwrite, "bundle")
    tokenizer, priors, extra = load_run_models(run_dir)
    for stage, step in extra.get("snapshots", {}).items():
        err.print(f"[yellow]•[/yellow] {stage} is still training: exporting its snapshot at step {step}")
    modules = {"tokenizer": tokenizer, **{f"prior.{i}": p for i, p in enumerate(priors)}}
    keep = {k: extra[k] for k in ("sampler", "class_names", "recipe") if k in extra}
    checkpoint.save(output, modules, extra=keep)
    out.print(f"[green]✓[/green] bundle -> {output} ({os.path.getsize(output) / 1e6:.1f} MB)"
              if os.path.exists(output) else f"[green]✓[/green] bundle -> {output}")


class _ConvertCommand(typer.core.TyperCommand):
    """``genfw convert --help`` lists the converters registered now (built-in and third-party)."""

    def format_help(self, ctx, formatter):  # noqa: ANN001 - click's signature
        from genfw.registry import get_registry

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
    from genfw import convert as converters
    from genfw.config import parse_value
    from genfw.registry import get_registry
    from genfw.rundir import check_write_target

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
    from genfw.bundle import assemble as assemble_bundle
    from genfw.rundir import check_write_target

    check_write_target(output, overwrite, "bundle")
    assemble_bundle(output, tokenizer, prior, sampler or [])
    out.print(f"[green]✓[/green] bundle -> {output}")


@command
def bench(
    source: Annotated[str, typer.Argument(metavar="RECIPE_OR_MODEL",
                                          help="Recipe YAML (random weights), exported bundle or run directory")],
    batch_size: Annotated[int, typer.Option(help="Images per forward / sampling chunk (B)")] = 4,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: the recipe's or model's)")] = None,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")] = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the prior backbones")] = False,
    repeats: Annotated[int, typer.Option(help="Repeats of forward + sampling (median, min and max are "
                                              "reported)")] = 3,
    json_file: Annotated[str | None, typer.Option("--json", help="Write the JSON record here ('-' prints it)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file at --json")] = False,
    matmul_size: Annotated[list[int] | None, typer.Option(help="Side of a square matmul measuring the peak; "
                                                               "repeat for several (default 1024, 2048, 4096 "
                                                               "on CPU; 4096, 8192, 16384 on CUDA)")] = None,
    set_: Sets = None,
) -> None:
    """Measure sampling speed: forward ms, FLOP/s vs. this machine's matmul peak, images/s, memory."""
    from genfw import io
    from genfw.bench import bench as run_bench
    from genfw.bench import print_table
    from genfw.rundir import check_write_target

    if json_file not in (None, "-"):
        check_write_target(json_file, overwrite, "JSON record")
    result = run_bench(source, batch_size=batch_size, steps=steps, device=device, precision=precision,
                       compile=compile_, repeats=repeats, overrides=set_, matmul_size=matmul_size)
    if json_file == "-":
        typer.echo(json.dumps(result, indent=2))  # plain: rich would wrap long lines
        return
    print_table(result, out)
    if json_file:
        io.write_json(json_file, result)
        out.print(f"[green]✓[/green] JSON -> {json_file}")


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


recipes_app = typer.Typer(help="The recipes shipped with genfw: list them, copy one to edit.",
                          context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@command(group=recipes_app, name="list")
def recipes_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False) -> None:
    """List the shipped recipes (run one with `genfw run NAME`)."""
    from genfw.catalog import list_recipes, recipes_root

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
    from genfw.catalog import copy_recipe

    path = copy_recipe(name, target, force=overwrite)
    out.print(f"[green]✓[/green] {name} -> {path}  (run it: genfw run {path})")


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


__all__ = ["app", "main", "Path"]
