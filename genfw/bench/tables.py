"""``genfw bench``'s output as rich tables: per prior level, the summary, and the matmul peaks.

Reads only the JSON record :func:`genfw.bench.run.bench` returns (the CLI writes that record
with ``--json``); nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _spread_cell(s: dict[str, Any] | None, fmt: Callable[[float], str]) -> str:
    """``median (min-max)`` of a timing's spread."""
    if s is None:
        return "-"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def _si_spread(s: dict[str, Any] | None, unit: str) -> str:
    """``median (min-max) unit`` with one SI prefix, the median's."""
    if s is None:
        return "-"
    factor, prefix = next(((f, p) for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
                           if abs(s["median"]) >= f), (1.0, ""))

    def num(v: float) -> str:  # about 3 significant digits, never in e-notation
        v /= factor
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"

    if s["n"] == 1:
        return f"{num(s['median'])} {prefix}{unit}"
    return f"{num(s['median'])} ({num(s['min'])}-{num(s['max'])}) {prefix}{unit}"


def print_table(result: dict[str, Any], console: Console) -> None:
    """The benchmark as rich tables: per prior level, the summary, and the matmul peaks."""
    peak = result["matmul_peak"]
    title = (f"genfw bench {result['source']} — {result['device_name']}, {result['precision']}, "
             f"batch {result['batch_size']}{', compiled' if result['compile'] else ''}, "
             f"{result['weights']} weights, median (min-max) of {result['repeats']} repeats")
    table = Table(title=title)
    table.add_column("measure")
    for lv in result["priors"]:
        table.add_column(f"level {lv['level']}: {lv['prior']} / {lv['backbone']}", justify="right")

    def timed(key: str, fmt: Callable[[float], str]) -> Callable[[dict[str, Any]], str]:
        return lambda lv: _spread_cell(lv["spread"].get(key), fmt)

    def ms(v: float) -> str:
        return f"{v:.1f}"

    rows = [
        ("parameters", lambda lv: f"{lv['parameters'] / 1e6:.1f} M"),
        ("grid / codes", lambda lv: f"{lv['grid'][0]}x{lv['grid'][1]} of {lv['codebook_size']}"),
        ("prior forward ms (batch)", timed("forward_ms", ms)),
        ("FLOPs per forward", lambda lv: _si(lv["forward_flops"], "FLOP")),
        ("achieved FLOP/s", lambda lv: _si_spread(lv["spread"].get("achieved_flops_per_second"), "FLOP/s")),
        (f"fraction of matmul peak ({peak['dtype']})", timed("fraction_of_matmul_peak", lambda v: f"{v:.1%}")),
        ("sampler steps run", lambda lv: "-" if lv.get("steps") is None else f"{lv['steps']:g}"),
        ("sampling ms per step", timed("sample_ms_per_step", ms)),
        ("  network (backbone) ms per step", timed("network_ms_per_step", ms)),
        ("  sampler overhead ms per step", timed("sampler_overhead_ms_per_step", ms)),
        ("sampler overhead share of sampling", timed("sampler_overhead_fraction", lambda v: f"{v:.1%}")),
        ("step / forward (same repeat)", timed("step_over_forward", lambda v: f"{v:.3f}")),
        ("sampling ms per image", timed("sample_ms_per_image", ms)),
    ]
    for name, cell in rows:
        table.add_row(name, *[cell(lv) for lv in result["priors"]])
    console.print(table)

    sp = result["spread"]
    summary = Table(show_header=False)
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    summary.add_row("sampling ms per image (all levels)", _spread_cell(sp["sample_ms_per_image"], ms))
    summary.add_row("decode ms per image", _spread_cell(sp["decode_ms_per_image"], ms))
    summary.add_row("seconds per image (end to end)", _spread_cell(sp["seconds_per_image"], lambda v: f"{v:.3f}"))
    summary.add_row("images per second", _spread_cell(sp["images_per_second"], lambda v: f"{v:.3f}"))
    summary.add_row("peak memory", _si(result["peak_memory_bytes"], "B"))
    load = result.get("load_average") or {}
    if load.get("before") and load.get("after"):
        summary.add_row("load average before / after (1, 5, 15 min)",
                        f"{', '.join(map(str, load['before']))} / {', '.join(map(str, load['after']))}")
    console.print(summary)

    peaks = Table(title=f"matmul peak: best warm torch.mm(out=) per size; the fraction uses the larger "
                        f"({_si(peak['flops_per_second'], 'FLOP/s')}, {peak['dtype']}, {peak['size']}^2, "
                        f"{peak['measured']})")
    peaks.add_column("dtype")
    peaks.add_column("size", justify="right")
    peaks.add_column("before the model", justify="right")
    peaks.add_column("after the model", justify="right")
    for precision, table_before in peak["before"].items():
        after = {r["size"]: r for r in peak["after"][precision]["sizes"]}
        for rec in table_before["sizes"]:
            cells = []
            for r in (rec, after.get(rec["size"])):
                if r is None or "flops_per_second" not in r:
                    cells.append((r or {}).get("skipped", "-"))
                else:
                    cells.append(f"{_si(r['flops_per_second'], 'FLOP/s')} (best of {r['runs']})")
            peaks.add_row(rec["dtype"], str(rec["size"]), *cells)
    console.print(peaks)
    console.print(f"[dim]memory: {result['peak_memory_kind']}[/dim]", highlight=False)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
