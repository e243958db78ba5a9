"""``genfw eval``, ``genfw ablate`` and ``genfw bench``: measure a run, a grid of runs, a model's speed.

The metrics come from genfw.pipeline / genfw.evaluate, the grids from genfw.ablate (through
genfw.api.ablate), the timings from genfw.bench; this module parses and prints.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from genfw.cli.base import Device, Overrides, Sets, _overrides, command, out
from genfw.cli.run import _print_metrics
from genfw.errors import GenfwError


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
    from genfw import dist  # late: start-up time
    from genfw.api import evaluate  # late: start-up time
    from genfw.progress import announce  # late: start-up time

    dist.init_from_env()  # under torchrun: sampling and fidelity features split over the ranks
    metrics, path = evaluate(run_dir, _overrides(set_, overrides), device=None if device == "auto" else device,
                             force=force,
                             on_start=lambda run: announce(run.device, run.resolved.recipe.train.prior.precision))
    if dist.is_main():
        _print_metrics(metrics)
        out.print(f"[green]✓[/green] metrics -> {path}")
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
    """Run every combination of a grid (sharing common stages) and write a comparison table and plots;
    print the table, the tuned sampler settings and the measuring stick (real-vs-real floor, the
    tokenizer's reconstruction FID, both evaluation classifiers' held-out accuracy)."""
    from genfw.ablate import measuring_stick, summary_rows, tuned_rows  # late: start-up time
    from genfw.api import ablate as run_ablation  # late: start-up time
    from genfw.preflight import check_device  # late: start-up time
    from genfw.progress import announce  # late: start-up time
    from genfw.sampling import resolve_device  # late: start-up time

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
    stick = measuring_stick(results)
    if stick:  # what every FID and class accuracy above is read against
        out.print("measuring stick:")
        for line in stick:
            out.print(f"  {line}", soft_wrap=True, markup=False)


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
    from genfw import io  # late: start-up time
    from genfw.bench import bench as run_bench  # late: start-up time
    from genfw.bench import print_table  # late: start-up time
    from genfw.rundir import check_write_target  # late: start-up time

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
