"""``genfw validate`` and ``genfw run`` (with ``--dry-run``): check a recipe, then run its stages.

The recipe checks live in genfw.config and genfw.preflight, the stages in genfw.pipeline; the
tables printed here (the plan, the metrics) are shared with ``genfw eval`` (genfw/cli/evaluate.py).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from genfw.cli.base import Device, Overrides, Sets, _load_recipe, _overrides, command, out


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
    from genfw.api import check_recipe, plan  # late: start-up time
    from genfw.catalog import resolve  # late: start-up time

    resolved = _load_recipe(resolve(recipe), _overrides(set_, overrides))
    report = check_recipe(resolved)
    out.print(f"[green]✓[/green] {recipe}: recipe '{resolved.recipe.name}' is valid "
              f"({len(resolved.prior_specs)} prior level(s))")
    for check in report.checks:
        mark = "[green]✓[/green]" if check.ok else "[yellow]✗[/yellow]"
        out.print(f"  {mark} {check.name}: {escape(check.message)}", highlight=False, soft_wrap=True)
    if report.failed:
        out.print(f"[yellow]not ready on this machine[/yellow]: {len(report.failed)} check(s) failed "
                  "(genfw run would stop before its first stage)")
        if strict:
            report.raise_if_failed()
    if summary:
        _print_plan(plan(resolved))


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
    from genfw.catalog import resolve  # late: start-up time
    from genfw.rundir import fail_fast_if_locked  # late: start-up time

    recipe = resolve(recipe)
    if not dry_run and int(os.environ.get("RANK", "0")) == 0:
        fail_fast_if_locked(recipe, _overrides(set_, overrides), output or output_dir)  # before torch is imported
    from genfw import dist  # late: start-up time
    from genfw.api import dry_run as plan_dry_run  # late: start-up time
    from genfw.api import prepare_run  # late: start-up time
    from genfw.progress import announce  # late: start-up time

    dist.init_from_env()
    resolved = _load_recipe(recipe, _overrides(set_, overrides))
    wanted = stages.split(",") if stages else None
    pipeline = prepare_run(resolved, wanted, output_dir=output or output_dir, device=None if device == "auto" else device,
                           overwrite=overwrite, force=force)
    if dry_run:
        _print_plan(plan_dry_run(pipeline))
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
    from genfw.report import context_lines  # late: start-up time

    for line in context_lines(metrics):  # FID beside its floor, class accuracy beside the classifiers
        out.print(line.strip(), markup=False, highlight=False)
