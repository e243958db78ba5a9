"""``genfw ablate``: run a grid of recipe variants that share their common stages, then compare.

An ablation file::

    # genfw ablate recipes/ablations/priors.yaml
    base: ../quickstart.yaml            # a recipe, relative to this file
    set: [train.prior.steps=300]        # overrides applied to every variant
    output_dir: runs/ablation-priors
    variants:                           # named override sets (optional) ...
      sundae: {prior.name: sundae, sample.params: {steps: 50}}
      absorbing: {prior.name: absorbing, sample.params: {steps: 64}}
    grid:                               # ... times the cartesian product of these (optional)
      prior.backbone.params.resampling: [2d, 1d]

Every combination runs in ``output_dir/<combination>/``; tokenizer and latent stages with the
same fingerprint — tokenizer, latents and priors — are shared through ``output_dir/_shared/`` (one
tokenizer and one latent dataset for all priors; one prior for all sampler settings). The comparison is written as ``comparison.md``, ``comparison.csv`` and
``comparison.png``.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import os
from typing import Any

import yaml

from genfw import io
from genfw.config import apply_overrides, load_yaml, validate_recipe
from genfw.errors import ConfigError
from genfw.progress import console

COLUMNS = [
    ("fidelity/fid", "FID", "lower"),
    ("fidelity/kid", "KID", "lower"),
    ("fidelity/precision", "precision", "higher"),
    ("fidelity/recall", "recall", "higher"),
    ("fidelity/density", "density", "higher"),
    ("fidelity/coverage", "coverage", "higher"),
    ("class_accuracy", "class acc.", "higher"),
    ("prior0/nll_bits_per_token", "NLL bits/token", "lower"),
    ("prior0/nll_kind", "NLL kind", ""),
    ("sample/seconds_per_image", "s / image", "lower"),
    ("train_seconds", "prior train s", "lower"),
]


def _format_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def _slug(overrides: dict[str, Any]) -> str:
    parts = []
    for k, v in overrides.items():
        value = v if not isinstance(v, (dict, list)) else yaml.safe_dump(v, default_flow_style=True).strip()
        parts.append(f"{k.split('.')[-1]}={value}")
    text = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=-._" else "-" for c in text)[:80]


def load_ablation(path: str) -> dict[str, Any]:
    spec = load_yaml(path)
    unknown = set(spec) - {"base", "set", "variants", "grid", "output_dir", "name"}
    if unknown:
        raise ConfigError(f"{path}: unknown ablation key(s) {sorted(unknown)}; allowed: base, set, variants, grid, output_dir")
    if "base" not in spec:
        raise ConfigError(f"{path}: 'base' (the recipe to vary) is required")
    if not spec.get("variants") and not spec.get("grid"):
        raise ConfigError(f"{path}: give 'variants' and/or 'grid' to vary the base recipe")
    for key, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list")
    return spec


def combinations(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) for every variant x grid point."""
    variants = list((spec.get("variants") or {"": {}}).items())
    grid = spec.get("grid") or {}
    keys = list(grid)
    out = []
    for vname, voverrides in variants:
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            point = dict(zip(keys, values))
            name = "_".join(p for p in (str(vname), _slug(point) if point else "") if p)
            out.append((name or "base", {**(voverrides or {}), **point}))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError("two ablation combinations have the same name: give variants distinct names")
    return out


def _as_set(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in overrides.items()]


def _link_shared(run, shared: str) -> None:
    """Point the run's training stages at shared folders keyed by their fingerprint.

    Combinations that agree on a stage's inputs (e.g. every sampler setting of one prior, or
    every prior on one tokenizer) then compute it once.
    """
    os.makedirs(run.dir, exist_ok=True)
    stages = [("tokenizer", run._fp_tokenizer()), ("latents", run._fp_latents())]
    stages += [(f"prior{i}", run._fp_prior(i)) for i in range(len(run.resolved.prior_specs))]
    for stage, fp in stages:
        target = os.path.abspath(os.path.join(shared, f"{stage}-{fp}"))
        os.makedirs(target, exist_ok=True)
        link = run.path(stage)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        if os.path.islink(link):
            os.unlink(link)
        elif os.path.isdir(link):
            continue  # a stage already computed in place is kept
        os.symlink(target, link)


def run_ablation(path: str, extra_overrides: list[str] | None = None, device: str | None = None) -> dict[str, Any]:
    """Run every combination and write the comparison; returns {name: metrics}."""
    from genfw.pipeline import Run

    spec = load_ablation(path)
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), spec["base"])
    base = load_yaml(base_path)
    common = list(spec.get("set") or []) + list(extra_overrides or [])
    name = spec.get("name") or os.path.splitext(os.path.basename(path))[0]
    out_dir = spec.get("output_dir") or os.path.join("runs", f"ablation-{name}")
    combos = combinations(spec)
    # Validate every combination before running any of them.
    resolved = []
    for cname, overrides in combos:
        raw = apply_overrides(base, common + _as_set(overrides))
        raw["name"] = f"{raw.get('name', 'recipe')}-{cname}"
        try:
            resolved.append((cname, overrides, validate_recipe(raw)))
        except ConfigError as e:
            raise type(e)(f"ablation combination '{cname}': {e}") from None
    results: dict[str, Any] = {}
    shared = os.path.join(out_dir, "_shared")
    for i, (cname, overrides, res) in enumerate(resolved, 1):
        console.rule(f"[bold]{i}/{len(resolved)}: {cname}")
        run = Run(res, output_dir=os.path.join(out_dir, cname), device=device)
        _link_shared(run, shared)
        metrics = dict(run.run())
        timings = [io.read_json(run.path(f"prior{j}", "stage.json")).get("seconds", 0.0)
                   for j in range(len(res.prior_specs))]
        metrics["train_seconds"] = sum(timings)
        results[cname] = {"overrides": overrides, "metrics": metrics}
    write_comparison(out_dir, results)
    console.print(f"[green]✓[/green] comparison -> {os.path.join(out_dir, 'comparison.md')}")
    return results


def write_comparison(out_dir: str, results: dict[str, Any]) -> None:
    """comparison.md (table), comparison.csv and comparison.png (bar chart per metric)."""
    present = [(k, label, better) for k, label, better in COLUMNS
               if any(k in r["metrics"] for r in results.values())]
    header = ["combination"] + [f"{label} ({'↓' if b == 'lower' else '↑'})" if b else label for _, label, b in present]
    rows = [[name] + [_format_value(r["metrics"].get(k)) for k, _, _ in present] for name, r in results.items()]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", "Overrides per combination:", ""]
    md += [f"- `{name}`: " + ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) for name, r in results.items()]
    io.write_text(os.path.join(out_dir, "comparison.md"), "\n".join(md) + "\n")
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["combination"] + [k for k, _, _ in present])
    for name, r in results.items():
        writer.writerow([name] + [r["metrics"].get(k, "") for k, _, _ in present])
    io.write_text(os.path.join(out_dir, "comparison.csv"), buf.getvalue())
    numeric = [(k, label) for k, label, b in present if b and
               all(isinstance(r["metrics"].get(k), (int, float)) for r in results.values())]
    if not numeric:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(numeric), figsize=(3.2 * len(numeric), 3.2), squeeze=False)
    for ax, (k, label) in zip(axes[0], numeric):
        ax.bar(range(len(names)), [results[n]["metrics"][k] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    png = _io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    io.write_bytes(os.path.join(out_dir, "comparison.png"), png.getvalue())
