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
    seeds: [0, 1, 2]                    # train every combination's prior once per seed (optional)
    primary: class_accuracy             # the metric whose differences are tested (optional)
    sweep: {steps: [10, 25, 50]}        # also sample every prior with these step counts (optional)

Every combination runs in ``output_dir/<combination>/`` (``.../seed-<s>/`` with seeds); stages
with the same fingerprint — tokenizer, latents and priors — are shared through
``output_dir/_shared/`` (one tokenizer and one latent dataset for all priors; one prior for all
sampler settings).

**Seeds.** Seed ``s`` sets ``train.prior.seed=s`` and ``sample.seed=s``: each seed trains its
own prior (initial weights, batch order, noise) and draws its own samples. Shared across seeds:
the data split, the tokenizer, the latent dataset and the evaluation's feature extractor and
reference images (all from the recipe's ``seed``), so the interval measures the prior and the
sampler, not the tokenizer.

**Output.** ``comparison.md`` (mean ± 95% t-interval over seeds with N; which differences on the
primary metric are significant by Welch's t-test, Holm-corrected), ``comparison.csv`` (mean,
interval half-width and N per metric), ``comparison_seeds.csv`` (every seed's value),
``comparison.png``; with a sweep, ``sweep.csv`` and ``sweep.png`` (quality against backbone
evaluations per image and against seconds per image, one curve per combination, 95% bands).

**Cost.** Per combination: the prior's training FLOPs (one step counted with torch's
``FlopCounterMode``, times the steps) and wall time; sampling backbone evaluations and seconds
per image. Held-out likelihoods are split by kind (exact, bound, estimate; SUNDAE's denoising
loss in its own column), never mixed in one column.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from genfw import io
from genfw.config import apply_overrides, load_yaml, validate_recipe
from genfw.errors import ConfigError
from genfw.metrics import NLL_KIND_LABELS
from genfw.progress import console
from genfw.stats import Summary, holm, summarize, welch

MAX_SEEDS = 20
MAX_SWEEP_POINTS = 20
ALPHA = 0.05


@dataclass(frozen=True)
class Column:
    key: str  # a key of the (kind-expanded) metrics
    label: str
    better: str  # "lower", "higher" or "" (not ranked)


BASE_COLUMNS = [
    Column("fidelity/fid", "FID", "lower"),
    Column("fidelity/kid", "KID", "lower"),
    Column("fidelity/precision", "precision", "higher"),
    Column("fidelity/recall", "recall", "higher"),
    Column("fidelity/density", "density", "higher"),
    Column("fidelity/coverage", "coverage", "higher"),
    Column("class_accuracy", "class acc.", "higher"),
]
COST_COLUMNS = [
    Column("train/flops", "prior train FLOPs", "lower"),
    Column("train_seconds", "prior train s", "lower"),
    Column("sample/evaluations_per_image", "evals / image", "lower"),
    Column("sample/seconds_per_image", "s / image", "lower"),
]
#: The tokenizer's reconstruction and codebook use (evaluate.metrics ``reconstruction``), shown
#: when the combinations do not all share one tokenizer (a quantizer study).
TOKENIZER_COLUMNS = [
    Column("tokenizer/mse", "recon. MSE", "lower"),
    Column("tokenizer/psnr", "recon. PSNR", "higher"),
    Column("tokenizer/level0/perplexity", "code perplexity", "higher"),
    Column("tokenizer/level0/usage", "codebook usage", "higher"),
]
#: Metrics a primary metric may be, in the order the default is picked from.
PRIMARY_DEFAULTS = ["fidelity/fid", "class_accuracy"]


# --------------------------------------------------------------------------------------------
# the ablation file


def _slug(overrides: dict[str, Any]) -> str:
    parts = []
    for k, v in overrides.items():
        value = v if not isinstance(v, (dict, list)) else yaml.safe_dump(v, default_flow_style=True).strip()
        parts.append(f"{k.split('.')[-1]}={value}")
    text = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=-._" else "-" for c in text)[:80]


def _int_list(path: str, key: str, values: Any, low: int, most: int) -> list[int]:
    if (not isinstance(values, list) or not values or len(values) > most
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)):
        raise ConfigError(f"{path}: {key} must be a list of 1 to {most} integers >= {low}, got {values!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{path}: {key} has repeated values {values}")
    return list(values)


def load_ablation(path: str) -> dict[str, Any]:
    spec = load_yaml(path)
    allowed = {"base", "set", "variants", "grid", "output_dir", "name", "seeds", "primary", "sweep"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown ablation key(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if "base" not in spec:
        raise ConfigError(f"{path}: 'base' (the recipe to vary) is required")
    if not spec.get("variants") and not spec.get("grid"):
        raise ConfigError(f"{path}: give 'variants' and/or 'grid' to vary the base recipe")
    for key, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list")
    if spec.get("seeds") is not None:
        spec["seeds"] = _int_list(path, "seeds", spec["seeds"], 0, MAX_SEEDS)
    sweep = spec.get("sweep")
    if sweep is not None:
        if not isinstance(sweep, dict) or set(sweep) != {"steps"}:
            raise ConfigError(f"{path}: sweep must be {{steps: [n1, n2, ...]}} (sampling steps), got {sweep!r}")
        sweep["steps"] = _int_list(path, "sweep.steps", sweep["steps"], 1, MAX_SWEEP_POINTS)
    primary = spec.get("primary")
    known = [c.key for c in BASE_COLUMNS + COST_COLUMNS]
    if primary is not None and not (isinstance(primary, str) and (
            primary in known or re.fullmatch(r"prior\d+/(nll|denoising_ce)_bits_per_token", primary))):
        raise ConfigError(f"{path}: primary must be one of {', '.join(known)} or priorL/nll_bits_per_token, "
                          f"priorL/denoising_ce_bits_per_token; got {primary!r}")
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


# --------------------------------------------------------------------------------------------
# running


#: Metrics that depend on the trained models only, not on the sampler: a sweep point takes them from
#: its seed's main run instead of computing them again (an absorbing NLL over all timesteps costs
#: more than the sampling it would be computed next to).
SAMPLER_FREE_METRICS = ("reconstruction", "nll")


def _sampler_free(key: str) -> bool:
    return key.startswith("tokenizer/") or re.match(r"prior\d+/", key) is not None


def _sweep_metrics(res) -> list[str]:
    """The override that leaves the sampler-free metrics out of a sweep point's evaluation."""
    kept = [m for m in res.recipe.evaluate.metrics if m not in SAMPLER_FREE_METRICS]
    return [f"evaluate.metrics=[{', '.join(kept)}]"]


def _seed_overrides(seed: int | None) -> list[str]:
    return [] if seed is None else [f"train.prior.seed={seed}", f"sample.seed={seed}"]


def _prior_costs(run, flops_cache: dict[str, int]) -> dict[str, Any]:
    """Training FLOPs (one counted step x steps) and wall seconds of the run's priors."""
    import torch

    from genfw import checkpoint
    from genfw.data import LatentDataset
    from genfw.metrics import training_step_flops

    seconds, flops = 0.0, 0
    spec = run.recipe.train.prior
    for level in range(len(run.resolved.prior_specs)):
        stage = run.path(f"prior{level}")
        seconds += float(io.read_json(os.path.join(stage, "stage.json")).get("seconds", 0.0))
        key = os.path.realpath(stage)
        if run.resolved.prior_specs[level].checkpoint or spec.steps == 0:
            continue  # a prior loaded as it is was not trained here
        if key not in flops_cache:
            prior = checkpoint.load(os.path.join(stage, "model.safetensors"), device=run.device)
            latents = LatentDataset(run.path("latents", "train"))
            n = min(spec.batch_size, len(latents))
            codes, labels = next(iter(torch.utils.data.DataLoader(latents, batch_size=n)))
            batch = {"codes": codes[level].to(run.device),
                     "labels": labels.to(run.device) if run.num_classes > 0 else None,
                     "context": [c.to(run.device) for c in codes[:level]] or None}
            with torch.random.fork_rng(devices=[]):
                flops_cache[key] = training_step_flops(prior, batch) * spec.steps
        flops += flops_cache[key]
    return {"train_seconds": seconds, "train/flops": float(flops)}


def _prior_has_steps(resolved) -> bool:
    from genfw.registry import get_registry

    registry = get_registry()
    return all("steps" in registry.load("prior", s.name).SamplerParams.model_fields for s in resolved.prior_specs)


def run_ablation(path: str, extra_overrides: list[str] | None = None, device: str | None = None,
                 seeds: int | None = None, sweep_steps: list[int] | None = None,
                 shared_dir: str | None = None, output_dir: str | None = None) -> dict[str, Any]:
    """Run every combination (per seed, and per sweep point) and write the comparison.

    ``seeds`` (the CLI's ``--seeds N``) replaces the file's ``seeds:`` with 0..N-1;
    ``sweep_steps`` its ``sweep.steps``; ``output_dir`` its ``output_dir``; ``shared_dir``
    (default ``output_dir/_shared``) lets several ablations share one tokenizer, latent set and
    identical priors. Returns ``{name: {"overrides", "seeds": {seed: metrics},
    "metrics": means over seeds, "sweep": {steps: {seed: metrics}}}}``.
    """
    from genfw.pipeline import Run

    spec = load_ablation(path)
    if seeds is not None:
        if not 1 <= seeds <= MAX_SEEDS:
            raise ConfigError(f"--seeds must be between 1 and {MAX_SEEDS}, got {seeds}")
        spec["seeds"] = list(range(seeds))
    if sweep_steps is not None:
        spec["sweep"] = {"steps": _int_list("--sweep-steps", "steps", list(sweep_steps), 1, MAX_SWEEP_POINTS)}
    seed_list: list[int | None] = list(spec.get("seeds") or [None])
    sweep = (spec.get("sweep") or {}).get("steps") or []
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), spec["base"])
    base = load_yaml(base_path)
    common = list(spec.get("set") or [])
    last = list(extra_overrides or [])  # the command line's --set wins over the file and its variants
    name = spec.get("name") or os.path.splitext(os.path.basename(path))[0]
    out_dir = output_dir or spec.get("output_dir") or os.path.join("runs", f"ablation-{name}")
    combos = combinations(spec)

    def resolve(cname: str, overrides: dict[str, Any], extra: list[str]):
        raw = apply_overrides(base, common + _as_set(overrides) + last + extra)  # seeds, sweep steps last
        raw["name"] = f"{raw.get('name', 'recipe')}-{cname}"
        try:
            return validate_recipe(raw)
        except ConfigError as e:
            raise type(e)(f"ablation combination '{cname}': {e}") from None

    # Validate every run before starting any of them.
    jobs = []  # (combination, seed, sweep steps or None, folder, resolved)
    for cname, overrides in combos:
        for seed in seed_list:
            folder = os.path.join(out_dir, cname, *([f"seed-{seed}"] if seed is not None else []))
            res = resolve(cname, overrides, _seed_overrides(seed))
            jobs.append((cname, seed, None, folder, res))
            if sweep and _prior_has_steps(res):
                for steps in sweep:
                    if res.sampler_params[0].model_dump().get("steps") == steps and len(res.sampler_params) == 1:
                        jobs.append((cname, seed, steps, None, None))  # the main run is this point
                        continue
                    jobs.append((cname, seed, steps, os.path.join(folder, f"steps-{steps}"),
                                 resolve(cname, overrides, _seed_overrides(seed) + [f"sample.params.steps={steps}"]
                                         + _sweep_metrics(res))))
    # ... and check this machine can run each of them before the first stage of the first.
    from genfw.preflight import preflight

    checked = set()
    for cname, _, _, _, res in jobs:
        if res is None:
            continue
        r = res.recipe  # what the checks look at; runs that agree on it are checked once
        key = json.dumps([r.data.model_dump(), r.tokenizer.model_dump(), r.train.model_dump(),
                          r.evaluate.model_dump(), r.device], sort_keys=True, default=str)
        if key in checked:
            continue
        checked.add(key)
        report = preflight(res, device)
        if report.failed:
            report.checks = [type(c)(f"{cname}: {c.name}", c.ok, c.message) for c in report.checks]
            report.raise_if_failed()
    results: dict[str, Any] = {c: {"overrides": o, "seeds": {}, "sweep": {}} for c, o in combos}
    shared = shared_dir or os.path.join(out_dir, "_shared")
    flops_cache: dict[str, int] = {}
    for i, (cname, seed, steps, folder, res) in enumerate(jobs, 1):
        key = seed if seed is not None else 0
        if folder is None:
            results[cname]["sweep"].setdefault(steps, {})[key] = results[cname]["seeds"][key]
            continue
        label = cname + (f" seed {seed}" if seed is not None else "") + (f" steps {steps}" if steps else "")
        console.rule(f"[bold]{i}/{len(jobs)}: {label}")
        run = Run(res, output_dir=folder, device=device)
        _link_shared(run, shared)
        metrics = dict(run.run())
        metrics |= _prior_costs(run, flops_cache)
        if steps is not None:  # what the sampler does not change comes from the seed's main run
            main = results[cname]["seeds"].get(key, {})
            metrics = {k: v for k, v in main.items() if _sampler_free(k)} | metrics
        if steps is None:
            results[cname]["seeds"][key] = metrics
        else:
            results[cname]["sweep"].setdefault(steps, {})[key] = metrics
    for r in results.values():
        r["metrics"] = mean_metrics(r["seeds"])
    write_comparison(out_dir, results, primary=spec.get("primary"))
    if sweep:
        write_sweep(out_dir, results, primary=spec.get("primary"))
    console.print(f"[green]✓[/green] comparison -> {os.path.join(out_dir, 'comparison.md')}")
    return results


# --------------------------------------------------------------------------------------------
# tables


def expand_kinds(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics with each prior's NLL under a key of its kind: ``priorL/nll_bits_per_token[exact]``.

    Values of different kinds thus never share a column; SUNDAE's denoising loss keeps its own
    key (``priorL/denoising_ce_bits_per_token``).
    """
    out = dict(metrics)
    for key in list(metrics):
        if key.endswith("/nll_bits_per_token"):
            level = key.rsplit("/", 1)[0]
            kind = metrics.get(f"{level}/nll_kind", "?")
            out[f"{key}[{kind}]"] = out.pop(key)
    return out


def table_columns(results: dict[str, Any]) -> list[Column]:
    """Columns present in any result: fidelity, the tokenizer's where it differs, then likelihoods
    by kind, then cost."""
    keys = {k for r in results.values() for m in r["seeds"].values() for k in expand_kinds(m)}
    cols = [c for c in BASE_COLUMNS if c.key in keys]
    seen = [expand_kinds(m) for r in results.values() for m in r["seeds"].values()]
    cols += [c for c in TOKENIZER_COLUMNS if len({repr(m.get(c.key)) for m in seen}) > 1]
    levels = sorted({k.split("/", 1)[0] for k in keys if k.startswith("prior") and "/" in k})
    for level in levels:
        short = "" if level == "prior0" else f" ({level})"
        for kind in ("exact", "bound", "estimate"):
            key = f"{level}/nll_bits_per_token[{kind}]"
            if key in keys:
                cols.append(Column(key, f"NLL {kind} bits/token{short}", "lower"))
        if f"{level}/nll_error_bits_per_token" in keys:
            cols.append(Column(f"{level}/nll_error_bits_per_token", f"NLL estimate error{short}", ""))
        if f"{level}/denoising_ce_bits_per_token" in keys:
            cols.append(Column(f"{level}/denoising_ce_bits_per_token",
                               f"denoising CE bits/token, not a likelihood{short}", ""))
    return cols + [c for c in COST_COLUMNS if c.key in keys]


def _values(seed_metrics: dict[Any, dict[str, Any]], key: str) -> list[float]:
    vals = [expand_kinds(m).get(key) for m in seed_metrics.values()]
    return [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def mean_metrics(seed_metrics: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """Numeric metrics averaged over seeds; others (kinds, devices) from the first seed."""
    first = next(iter(seed_metrics.values()), {})
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [float(m[key]) for m in seed_metrics.values() if isinstance(m.get(key), (int, float))]
            out[key] = sum(vals) / len(vals)
        else:
            out[key] = value
    return out


def pick_primary(results: dict[str, Any], requested: str | None, columns: list[Column]) -> Column | None:
    """The column whose differences are tested: the requested metric or FID / class accuracy."""
    by_key = {c.key: c for c in columns}
    if requested:
        matches = [c for c in columns if c.key == requested or c.key.startswith(requested + "[")]
        return matches[0] if matches else None  # e.g. fidelity not evaluated: no test, said in the table
    for key in PRIMARY_DEFAULTS:
        if key in by_key:
            return by_key[key]
    return None


def significance(results: dict[str, Any], column: Column) -> list[dict[str, Any]]:
    """Welch's t-test for every pair of combinations with >= 2 seeds of the primary metric.

    Pairs are only formed within one column, so likelihoods of different kinds are never ranked
    against each other. Holm's correction over all pairs decides significance at ALPHA.
    """
    names = [n for n in results if len(_values(results[n]["seeds"], column.key)) >= 2]
    rows = []
    for a, b in itertools.combinations(names, 2):
        test = welch(_values(results[a]["seeds"], column.key), _values(results[b]["seeds"], column.key))
        rows.append({"a": a, "b": b, "difference": test.difference, "t": test.t, "df": test.df, "p": test.p})
    for row, rejected in zip(rows, holm([r["p"] for r in rows], ALPHA)):
        row["significant"] = rejected
    return rows


def write_comparison(out_dir: str, results: dict[str, Any], primary: str | None = None) -> None:
    """comparison.md (table), comparison.csv, comparison_seeds.csv and comparison.png."""
    columns = table_columns(results)
    summaries: dict[str, dict[str, Summary | None]] = {}
    for name, r in results.items():
        summaries[name] = {}
        for c in columns:
            vals = _values(r["seeds"], c.key)
            summaries[name][c.key] = summarize(vals) if vals else None
    ns = sorted({s.n for per in summaries.values() for s in per.values() if s is not None})
    arrow = {"lower": " ↓", "higher": " ↑", "": ""}
    header = ["combination", "N"] + [f"{c.label}{arrow[c.better]}" for c in columns]
    md = []
    multi = any(n > 1 for n in ns)
    if multi:
        md += [f"Mean ± half-width of the 95% t-interval over N seeds (N = {', '.join(map(str, ns))}); "
               "every seed's value is in comparison_seeds.csv. Shared across seeds: the data split, "
               "tokenizer, latent set, evaluation classifier and reference images; per seed: the "
               "prior's initial weights, batch order and noise, and its samples.", ""]
    else:
        md += ["One seed per combination: no interval; differences may be noise "
               "(run with --seeds N or a seeds: list for intervals and tests).", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in results:
        n = max((s.n for s in summaries[name].values() if s is not None), default=0)
        cells = [s.text() if s is not None else "" for s in (summaries[name][c.key] for c in columns)]
        md.append("| " + " | ".join([name, str(n)] + cells) + " |")
    kinds = sorted({m.get(k) for r in results.values() for m in r["seeds"].values()
                    for k in m if k.endswith("/nll_kind")} - {None})
    if kinds:
        md += ["", "Held-out likelihood columns by kind (never compared across kinds):", ""]
        md += [f"- `{k}`: {NLL_KIND_LABELS.get(k, k)}" for k in kinds]
    md += ["", "Cost: prior train FLOPs = one training step counted by torch's FlopCounterMode "
           "(matmuls, convolutions) x steps; train s = wall time of the prior stage (shared priors "
           "counted in every combination that uses them); evals / image = backbone rows per image "
           "(a cached autoregressive step is one token, a parallel step the whole grid)."]
    first = pick_primary(results, primary, columns)
    # a likelihood as primary metric: one test table per kind, never a pair across kinds
    primaries = [c for c in columns if primary and c.key.startswith(primary + "[")] or ([first] if first else [])
    if primary and not primaries:
        md += ["", f"No significance test: the primary metric '{primary}' is not among the results."]
    for primary_col in primaries:
        tests = significance(results, primary_col)
        md += ["", f"## Differences in {primary_col.label}", ""]
        if not tests:
            md.append("No test: it needs two combinations with at least two seeds each.")
        else:
            md += [f"Welch's t-test per pair (two-sided), Holm-corrected over {len(tests)} pairs at "
                   f"{ALPHA}; difference = first - second.", "",
                   "| pair | difference | t | df | p | verdict |", "|---|---|---|---|---|---|"]
            for t in tests:
                verdict = "significant" if t["significant"] else "not significant"
                md.append(f"| {t['a']} vs {t['b']} | {t['difference']:.4g} | {t['t']:.3g} | {t['df']:.3g} | "
                          f"{t['p']:.3g} | {verdict} |")
    md += ["", "Overrides per combination:", ""]
    md += [f"- `{name}`: " + ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) for name, r in results.items()]
    io.write_text(os.path.join(out_dir, "comparison.md"), "\n".join(md) + "\n")

    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["combination"] + [f"{c.key}{suffix}" for c in columns for suffix in ("", ":ci95", ":n")])
    for name in results:
        row = [name]
        for c in columns:
            s = summaries[name][c.key]
            row += ["", "", 0] if s is None else [s.mean, s.half_width if s.n > 1 else "", s.n]
        writer.writerow(row)
    io.write_text(os.path.join(out_dir, "comparison.csv"), buf.getvalue())

    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["combination", "seed"] + [c.key for c in columns])
    for name, r in results.items():
        for seed, m in r["seeds"].items():
            em = expand_kinds(m)
            writer.writerow([name, seed] + [em.get(c.key, "") for c in columns])
    io.write_text(os.path.join(out_dir, "comparison_seeds.csv"), buf.getvalue())
    _bar_chart(out_dir, results, columns, summaries)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target: str) -> None:
    plt = _pyplot()
    png = _io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    io.write_bytes(target, png.getvalue())


def _bar_chart(out_dir: str, results: dict[str, Any], columns: list[Column],
               summaries: dict[str, dict[str, Summary | None]]) -> None:
    numeric = [c for c in columns if all(summaries[n][c.key] is not None for n in results)]
    if not numeric:
        return
    plt = _pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(numeric), figsize=(3.2 * len(numeric), 3.4), squeeze=False)
    for ax, c in zip(axes[0], numeric):
        stats = [summaries[n][c.key] for n in names]
        ax.bar(range(len(names)), [s.mean for s in stats], yerr=[s.half_width for s in stats],
               capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(c.label, fontsize=8)
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "comparison.png"))


# --------------------------------------------------------------------------------------------
# sampling-steps sweep


def write_sweep(out_dir: str, results: dict[str, Any], primary: str | None = None) -> None:
    """sweep.csv and sweep.png: quality against evaluations and seconds per image, per combination.

    A combination whose prior has no ``steps`` (autoregressive) is one point, from its main runs.
    """
    columns = table_columns({n: {"seeds": {**r["seeds"], **{f"{s}/{k}": m for s, per in r["sweep"].items()
                                                             for k, m in per.items()}}}
                             for n, r in results.items()})
    quality = pick_primary(results, primary, columns)
    md_path = os.path.join(out_dir, "comparison.md")
    if quality is None:  # nothing to plot: say so rather than fail after the runs
        io.write_text(md_path, io.read_bytes(md_path).decode() + "\nNo sweep plot: no quality metric "
                      "(fidelity or class_accuracy, or `primary:`) among the results.\n")
        return
    rows = []
    for name, r in results.items():
        points = sorted(r["sweep"].items()) or [(None, r["seeds"])]
        for steps, per_seed in points:
            q = summarize(_values(per_seed, quality.key)) if _values(per_seed, quality.key) else None
            ev = _values(per_seed, "sample/evaluations_per_image")
            sec = _values(per_seed, "sample/seconds_per_image")
            if q is None or not ev or not sec:
                continue
            rows.append({"combination": name, "steps": steps if steps is not None else "",
                         "evaluations_per_image": sum(ev) / len(ev), "seconds_per_image": sum(sec) / len(sec),
                         quality.key: q.mean, f"{quality.key}:ci95": q.half_width, "n": q.n})
    buf = _io.StringIO()
    fields = ["combination", "steps", "evaluations_per_image", "seconds_per_image", quality.key,
              f"{quality.key}:ci95", "n"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(os.path.join(out_dir, "sweep.csv"), buf.getvalue())
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x_key, x_label in ((axes[0], "evaluations_per_image", "backbone evaluations per image"),
                               (axes[1], "seconds_per_image", "seconds per image")):
        for name in results:
            pts = sorted((r for r in rows if r["combination"] == name), key=lambda r: r[x_key])
            if not pts:
                continue
            x = [p[x_key] for p in pts]
            y = [p[quality.key] for p in pts]
            hw = [p[f"{quality.key}:ci95"] for p in pts]
            if len(pts) == 1:  # a prior without a steps setting: one point with its interval
                ax.errorbar(x, y, yerr=hw, marker="s", capsize=3, label=name)
                continue
            line = ax.plot(x, y, marker="o", label=name)[0]
            if any(hw):
                ax.fill_between(x, [a - b for a, b in zip(y, hw)], [a + b for a, b in zip(y, hw)],
                                color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        # plain numbers at 1-2-5 steps (the default minor-tick labels overlap on a short log axis)
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{quality.label}{' (lower is better)' if quality.better == 'lower' else ''}")
        ax.legend(fontsize=7)
    ns = sorted({r["n"] for r in rows})
    fig.suptitle(f"{quality.label} vs sampling cost (mean, 95% band over N = {', '.join(map(str, ns))} seeds)",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "sweep.png"))
    lines = ["", "## Quality vs sampling cost", "",
             f"![sweep](sweep.png)  (data: sweep.csv; {quality.label}, mean ± 95% t-interval over seeds)", "",
             "| combination | steps | evals / image | s / image | " + quality.label + " |", "|---|---|---|---|---|"]
    for r in rows:
        q = Summary(r[quality.key], r[f"{quality.key}:ci95"], r["n"], 0.0)
        lines.append(f"| {r['combination']} | {r['steps']} | {r['evaluations_per_image']:.4g} | "
                     f"{r['seconds_per_image']:.4g} | {q.text()} |")
    io.write_text(md_path, io.read_bytes(md_path).decode() + "\n".join(lines) + "\n")


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the terminal: a few columns of the comparison, mean ± interval."""
    columns = [c for c in table_columns(results)
               if c.key in ("fidelity/fid", "class_accuracy", "train/flops", "sample/seconds_per_image")
               or "bits_per_token" in c.key]
    header = ["combination", "N"] + [c.label for c in columns]
    rows = []
    for name, r in results.items():
        cells, n = [], 0
        for c in columns:
            vals = _values(r["seeds"], c.key)
            s = summarize(vals) if vals else None
            n = max(n, s.n if s else 0)
            cells.append(s.text() if s else "")
        rows.append([name, str(n)] + cells)
    return header, rows


class _CallableModule(type(sys.modules[__name__])):
    """``genfw.ablate`` is this module and the Python API's function at once: calling the module
    runs :func:`genfw.api.ablate` (a submodule import would otherwise replace the function)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from genfw.api import ablate

        return ablate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
