"""The run report: a short markdown file with the recipe, sizes, curves, samples, metrics and timings."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import yaml

from genfw import io

if TYPE_CHECKING:
    from genfw.context import RunContext as Run


def read_log(path: str) -> list[dict[str, Any]]:
    """Records of a trainer's ``log.jsonl`` (missing file -> empty)."""
    if not os.path.exists(path):
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            # a resumed run logs the steps after its last checkpoint again: keep the latest
            by_step[record.get("step")] = record
    return list(by_step.values())


def plot_curves(logs: dict[str, list[dict[str, Any]]], target: str) -> bool:
    """Loss curves of every trained stage in one PNG; False when there is nothing to plot."""
    series = {}
    for stage, records in logs.items():
        for key in sorted({k for r in records for k in r if k.startswith("loss/")}):
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                series[f"{stage} {key[5:]}"] = pts
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], logs):
        for name, pts in series.items():
            if name.startswith(stage + " "):
                ax.plot(*zip(*pts), label=name[len(stage) + 1 :])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log" if all(v > 0 for n, p in series.items() if n.startswith(stage) for _, v in p) else "linear")
        ax.legend(fontsize=8)
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    io.write_bytes(target, buf.getvalue())
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(run: Run, tokenizer, priors) -> None:
    """Write ``report.md`` (and ``curves.png``) into the run directory."""
    from genfw.context import count_parameters

    lines = [f"# {run.recipe.name}", ""]
    lines += ["## Models", "", "| component | name | parameters |", "|---|---|---|"]
    lines.append(f"| tokenizer | {run.recipe.tokenizer.name} | {count_parameters(tokenizer):,} |")
    for i, prior in enumerate(priors or []):
        spec = run.resolved.prior_specs[i]
        lines.append(f"| prior level {i} | {spec.name} on {spec.backbone.name} | {count_parameters(prior):,} |")
    lines.append("")
    logs = {}
    for stage in ["tokenizer"] + [f"prior{i}" for i in range(len(priors or []))]:
        records = read_log(run.path(stage, "log.jsonl"))
        if records:
            logs[stage] = records
    if plot_curves(logs, run.path("curves.png")):
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    if os.path.exists(run.path("samples", "grid.png")):
        lines += ["## Samples", "", "![samples](samples/grid.png)", ""]
    if os.path.exists(run.path("metrics.json")):
        metrics = io.read_json(run.path("metrics.json"))
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(metrics).items()]
        lines.append("")
        from genfw.metrics import NLL_KIND_LABELS

        kinds = sorted({v for k, v in metrics.items() if k.endswith("/nll_kind") and isinstance(v, str)})
        lines += [f"`nll_kind` {k}: {NLL_KIND_LABELS.get(k, k)} (docs/evaluation.md)." for k in kinds]
        lines += [""] if kinds else []
    timings = {}
    for stage in ["tokenizer", "latents"] + [f"prior{i}" for i in range(len(priors or []))] + ["samples", "evaluate"]:
        try:
            timings[stage] = io.read_json(run.path(stage, "stage.json")).get("seconds", 0.0)
        except FileNotFoundError:
            pass
    if timings:
        lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        lines += ["", f"Device: {run.device}", ""]
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(run.resolved.raw, sort_keys=False).rstrip(), "```", ""]
    io.write_text(run.path("report.md"), "\n".join(lines))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out
