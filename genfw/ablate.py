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
    # how the samplers are matched: at most one of these two (neither: "not matched")
    tune: {temperature: [0.8, 0.9, 1.0], steps: [32, 64]}   # tuned on validation, reported on test
    sweep: {steps: [10, 25, 50]}        # or: a frontier, every prior at these step counts

Every combination runs in ``output_dir/<combination>/`` (``.../seed-<s>/`` with seeds); stages
with the same fingerprint — tokenizer, latents and priors — are shared through
``output_dir/_shared/`` (one tokenizer and one latent dataset for all priors; one prior for all
sampler settings).

**Seeds.** Seed ``s`` sets ``train.prior.seed=s`` and ``sample.seed=s``: each seed trains its
own prior (initial weights, batch order, noise) and draws its own samples. Shared across seeds:
the data split, the tokenizer, the latent dataset and the evaluation's feature extractor and
reference images (all from the recipe's ``seed``), so the spread measures the prior and the
sampler, not the tokenizer.

**Matched samplers.** ``tune:`` maps sampler settings (``sample.params`` keys) to values; each
combination tries every setting of the grid its prior has (a key its prior lacks, e.g.
``sample_proportion`` for absorbing, is left out for it) in ``.../tune/<setting>/``, with other
samples (``sample.seed`` + 1000) scored against the validation half of the reference images
(``evaluate.reference=validation``); the setting with the lowest FID (highest accuracy) on the
primary metric, mean over seeds, is then run and reported on fresh samples against the disjoint
test half. The trained priors are shared, not retrained. ``sweep:`` instead compares along a
frontier: quality against counted sampling FLOPs per image and against seconds per image.
comparison.md opens with which of the two it did ("Samplers: ...").

**Statistics** (rules in :mod:`genfw.stats`). Combinations that sample the same trained prior at
every seed (sampler settings, sweep points) are a paired design: paired t-test and exact
sign-flip test over the per-seed differences, the larger p decides; independently trained
priors get Welch's t-test. Holm's correction over every test of one table. With 3 or more seeds
a cell is the mean with its 95% t-interval cut to the metric's range; with fewer, every seed's
value with its 95% interval within the run (FID/KID: bootstrap over the samples from
``evaluate/features.safetensors``; class accuracy, precision, coverage: Wilson). Verdicts are
"significant after Holm" or "not significant", nothing else.

**Output.** ``comparison.md``, ``comparison.csv`` (per metric: mean, ``:low``/``:high`` of the
t-interval, empty under 3 seeds, and ``:n``), ``comparison_seeds.csv`` (every seed's value and
its within-run ``:low``/``:high``), ``comparison.png``; with a sweep, ``sweep.csv`` and
``sweep.png`` (bands only from 3 seeds, never outside the metric's range).

**Cost.** Per combination: the prior's training FLOPs (one step counted with torch's
``FlopCounterMode``, times the steps) and wall time; sampling FLOPs per image (one sampling call
of the priors, up to 8 images, counted by ``FlopCounterMode``: a cached autoregressive step
counts its one token's work), backbone evaluations and seconds per image. Held-out likelihoods
are split by kind (exact, bound, estimate; SUNDAE's denoising loss in its own column), never
mixed in one column.
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
from genfw.stats import MIN_SEEDS_FOR_T, Interval, holm_adjusted, paired, t_interval, welch

MAX_SEEDS = 20
MAX_SWEEP_POINTS = 20
MAX_TUNE_POINTS = 24
#: Sample seed offset of tuning runs: tuning draws other samples than the reported runs.
TUNE_SEED_OFFSET = 1000
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
    Column("sample/flops_per_image", "sampling FLOPs / image", "lower"),
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
    allowed = {"base", "set", "variants", "grid", "output_dir", "name", "seeds", "primary", "sweep", "tune"}
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
    tune = spec.get("tune")
    if tune is not None:
        if not isinstance(tune, dict) or not tune or not all(
                isinstance(k, str) and isinstance(v, list) and v for k, v in tune.items()):
            raise ConfigError(f"{path}: tune must map sampler settings to lists of values, e.g. "
                              f"{{temperature: [0.8, 1.0], steps: [32, 64]}}; got {tune!r}")
        points = math.prod(len(v) for v in tune.values())
        if points > MAX_TUNE_POINTS:
            raise ConfigError(f"{path}: tune has {points} settings per combination, at most {MAX_TUNE_POINTS}")
        if sweep is not None:
            raise ConfigError(f"{path}: give tune: (tuned on validation, reported on test) or sweep: "
                              "(a frontier), not both")
        if isinstance(spec.get("primary"), str) and not spec["primary"].startswith(("fidelity/", "class_accuracy")):
            raise ConfigError(f"{path}: tune: chooses sampler settings by sample quality; primary "
                              f"'{spec['primary']}' does not depend on the sampler (use fidelity/fid or class_accuracy)")
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
    "metrics": means over seeds, "sweep": {steps: {seed: metrics}}, "priors": {seed: [trained prior
    folder per level]} (what makes two combinations a paired design), "sweep_priors", and with
    ``tune:`` "tuned": {"settings", "metric", "grid"}}}``. Seed metrics hold the run's own 95%
    intervals as ``<metric>:low`` / ``<metric>:high`` (bootstrap FID/KID, Wilson class accuracy).
    """
    from genfw.pipeline import Run

    spec = load_ablation(path)
    if seeds is not None:
        if not 1 <= seeds <= MAX_SEEDS:
            raise ConfigError(f"--seeds must be between 1 and {MAX_SEEDS}, got {seeds}")
        spec["seeds"] = list(range(seeds))
    if sweep_steps is not None:
        if spec.get("tune"):
            raise ConfigError(f"{path}: tunes its samplers (tune:); --sweep-steps (a frontier) cannot be added to it")
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

    tune = spec.get("tune") or {}

    def tune_points(res) -> list[dict[str, Any]]:
        """The tune grid restricted to the settings this combination's prior(s) have."""
        from genfw.registry import get_registry

        fields = set.intersection(*(set(get_registry().load("prior", p.name).SamplerParams.model_fields)
                                    for p in res.prior_specs))
        keys = [k for k in tune if k in fields]
        return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))] if keys else []

    def sample_seed(res) -> int:
        r = res.recipe
        return r.sample.seed if r.sample.seed is not None else r.seed

    # Validate every run before starting any of them.
    jobs = []  # (combination, seed, sweep steps or None, folder, resolved)
    tuning = []  # (combination, seed, settings, folder, resolved): run first, on the validation reference
    if tune:
        unknown = set(tune)
    for cname, overrides in combos:
        for seed in seed_list:
            folder = os.path.join(out_dir, cname, *([f"seed-{seed}"] if seed is not None else []))
            res = resolve(cname, overrides, _seed_overrides(seed))
            jobs.append((cname, seed, None, folder, res))
            if tune:
                if "fidelity" not in res.recipe.evaluate.metrics:
                    raise ConfigError(f"{path}: tune: needs 'fidelity' in evaluate.metrics (combination '{cname}')")
                points = tune_points(res)
                unknown -= set(points[0]) if points else set()
                for point in points:
                    extra = _seed_overrides(seed) + _as_set({f"sample.params.{k}": v for k, v in point.items()})
                    extra += [f"sample.seed={sample_seed(res) + TUNE_SEED_OFFSET}", "evaluate.reference=validation"]
                    tuning.append((cname, seed, point, os.path.join(folder, "tune", _slug(point)),
                                   resolve(cname, overrides, extra + _sweep_metrics(res))))
            if sweep and _prior_has_steps(res):
                for steps in sweep:
                    if res.sampler_params[0].model_dump().get("steps") == steps and len(res.sampler_params) == 1:
                        jobs.append((cname, seed, steps, None, None))  # the main run is this point
                        continue
                    jobs.append((cname, seed, steps, os.path.join(folder, f"steps-{steps}"),
                                 resolve(cname, overrides, _seed_overrides(seed) + [f"sample.params.steps={steps}"]
                                         + _sweep_metrics(res))))
    if tune and unknown:
        raise ConfigError(f"{path}: tune: {sorted(unknown)} is a sampler setting of none of the combinations' priors")
    # ... and check this machine can run each of them before the first stage of the first.
    from genfw.preflight import preflight

    checked = set()
    for cname, _, _, _, res in tuning + jobs:
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
    results: dict[str, Any] = {c: {"overrides": o, "seeds": {}, "sweep": {}, "priors": {}, "sweep_priors": {}}
                               for c, o in combos}
    shared = shared_dir or os.path.join(out_dir, "_shared")
    flops_cache: dict[str, int] = {}
    total = len(tuning) + len(jobs)

    def execute(i: int, label: str, folder: str, res) -> tuple[dict[str, Any], list[str]]:
        console.rule(f"[bold]{i}/{total}: {label}")
        run = Run(res, output_dir=folder, device=device)
        _link_shared(run, shared)
        metrics = dict(run.run())
        metrics |= _prior_costs(run, flops_cache)
        metrics |= _sampling_flops(run, flops_cache)
        metrics |= within_run_intervals(folder, device=str(run.device))
        return metrics, [os.path.realpath(run.path(f"prior{i}")) for i in range(len(res.prior_specs))]

    # 1. tuning: every setting of the grid on the validation reference, one setting chosen per combination
    tuned: dict[str, dict[tuple, dict[Any, dict[str, Any]]]] = {}
    for i, (cname, seed, point, folder, res) in enumerate(tuning, 1):
        label = f"{cname}{f' seed {seed}' if seed is not None else ''} tune {_slug(point)} (validation)"
        metrics, _ = execute(i, label, folder, res)
        tuned.setdefault(cname, {}).setdefault(tuple(point.items()), {})[seed if seed is not None else 0] = metrics
    if tune:
        column = pick_primary({c: {"seeds": next(iter(per.values()))} for c, per in tuned.items()},
                              spec.get("primary"), table_columns({c: {"seeds": next(iter(per.values()))}
                                                                  for c, per in tuned.items()}))
        for cname, per_point in tuned.items():
            results[cname]["tuned"] = choose_tuned(per_point, column)
        for cname, _ in combos:  # a prior with none of the tune: settings samples as its recipe says
            results[cname].setdefault("tuned", {"settings": {}, "metric": column.key if column else "", "grid": []})
        jobs = [(c, s, st, f, r if c not in tuned else resolve(
                    c, results[c]["overrides"], _seed_overrides(s) + ["evaluate.reference=test"]
                    + _as_set({f"sample.params.{k}": v for k, v in results[c]["tuned"]["settings"].items()})))
                for c, s, st, f, r in jobs]
    # 2. the reported runs (on the test reference when tuned)
    for i, (cname, seed, steps, folder, res) in enumerate(jobs, len(tuning) + 1):
        key = seed if seed is not None else 0
        if folder is None:
            results[cname]["sweep"].setdefault(steps, {})[key] = results[cname]["seeds"][key]
            results[cname]["sweep_priors"].setdefault(steps, {})[key] = results[cname]["priors"][key]
            continue
        label = cname + (f" seed {seed}" if seed is not None else "") + (f" steps {steps}" if steps else "")
        metrics, priors = execute(i, label, folder, res)
        if steps is not None:  # what the sampler does not change comes from the seed's main run
            main = results[cname]["seeds"].get(key, {})
            metrics = {k: v for k, v in main.items() if _sampler_free(k)} | metrics
        if steps is None:
            results[cname]["seeds"][key] = metrics
            results[cname]["priors"][key] = priors
        else:
            results[cname]["sweep"].setdefault(steps, {})[key] = metrics
            results[cname]["sweep_priors"].setdefault(steps, {})[key] = priors
    for r in results.values():
        r["metrics"] = mean_metrics(r["seeds"])
    samplers = ("tuned on validation, reported on test" if tune else "frontier" if sweep else "as set per combination")
    write_comparison(out_dir, results, primary=spec.get("primary"), samplers=samplers)
    if sweep:
        write_sweep(out_dir, results, primary=spec.get("primary"))
    console.print(f"[green]✓[/green] comparison -> {os.path.join(out_dir, 'comparison.md')}")
    return results


def choose_tuned(per_point: dict[tuple, dict[Any, dict[str, Any]]], column: Column | None) -> dict[str, Any]:
    """The setting whose mean validation value of ``column`` over seeds ranks first (grid order breaks ties).

    Returns ``{"settings", "metric", "grid": [{"settings", "value", "n"}]}``.
    """
    grid = []
    for point, per_seed in per_point.items():
        vals = _values(per_seed, column.key) if column is not None else []
        grid.append({"settings": dict(point), "value": sum(vals) / len(vals) if vals else None, "n": len(vals)})
    if column is None or not any(g["value"] is not None for g in grid):
        raise ConfigError("tune: no quality metric to tune on (evaluate fidelity or class_accuracy, or set primary:)")
    sign = 1.0 if column.better == "lower" else -1.0
    best = min((g for g in grid if g["value"] is not None), key=lambda g: sign * g["value"])
    return {"settings": best["settings"], "metric": column.key, "grid": grid}


def tuned_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the terminal: each combination's tuned sampler settings and validation value."""
    rows = []
    metric = ""
    for name, r in results.items():
        t = r.get("tuned")
        if t is None:
            continue
        metric = t["metric"] or metric
        value = next((g["value"] for g in t["grid"] if g["settings"] == t["settings"]), None)
        rows.append([name, ", ".join(f"{k}={v}" for k, v in t["settings"].items())
                     or "(none of the tune: settings is a setting of this prior: sampled as its recipe says)",
                     f"{value:.4g}" if value is not None else "—", str(len(t["grid"]))])
    return ["combination", "tuned settings", f"{metric} (validation)", "settings tried"], rows


#: Most samples for KID's within-run interval: its bootstrap holds the N x N kernel matrix.
MAX_KID_BOOTSTRAP = 5000


def within_run_intervals(folder: str, n_boot: int = 1000, device: str = "cpu") -> dict[str, Any]:
    """Per-run 95% intervals from ``evaluate/features.safetensors``: bootstrap FID/KID; Wilson for class
    accuracy, precision and coverage.

    Keys ``<metric>:low`` and ``<metric>:high``; empty when the run evaluated no fidelity.
    """
    from genfw import checkpoint
    from genfw.evaluate import PER_SAMPLE_FILE
    from genfw.stats import bootstrap_fid, bootstrap_kid, wilson

    path = os.path.join(folder, "evaluate", PER_SAMPLE_FILE)
    if not os.path.exists(path):
        return {}
    tensors, meta = checkpoint.read(path)
    out: dict[str, Any] = {}
    fake = tensors["sample_features"].double().numpy()
    real = tensors["reference_features"].double().numpy()
    draws = n_boot if fake.shape[1] <= 512 else max(100, n_boot // 10)  # Inception: 2048-d eigenproblems
    iv = bootstrap_fid(fake, real, n_boot=draws, device=device)
    out |= {"fidelity/fid:low": iv.low, "fidelity/fid:high": iv.high}
    if fake.shape[0] <= MAX_KID_BOOTSTRAP and real.shape[0] <= MAX_KID_BOOTSTRAP:
        iv = bootstrap_kid(fake, real, n_boot=draws)
        out |= {"fidelity/kid:low": iv.low, "fidelity/kid:high": iv.high}
    # proportions with Wilson: class accuracy over the samples; precision (a sample inside some
    # reference image's k-NN ball, <= as torch-fidelity) over the samples and coverage (a reference
    # image whose ball, strict <, holds a sample) over the reference images, each given the other set
    proportions = {"class_accuracy": tensors["correct"].bool()} if "correct" in tensors else {}
    k = int(meta.get("prdc_k", 5))
    if real.shape[0] > k:
        import torch

        r, f = torch.from_numpy(real), torch.from_numpy(fake)
        radii = torch.cdist(r, r).kthvalue(k + 1, dim=1).values  # +1: the image itself
        d = torch.cdist(f, r)  # [N, M]
        proportions["fidelity/precision"] = (d <= radii[None]).any(1)
        proportions["fidelity/coverage"] = (d < radii[None]).any(0)
    for key, hits in proportions.items():
        iv = wilson(int(hits.sum()), int(hits.numel()))
        out |= {f"{key}:low": iv.low, f"{key}:high": iv.high}
    return out


def _sampling_flops(run, cache: dict[str, Any]) -> dict[str, Any]:
    """Sampling FLOPs per image: one sampling call of the run's priors counted by torch's FlopCounterMode.

    Counted, not estimated: an autoregressive prior's cached one-token steps count by what they
    compute, a parallel step by its whole grid. At most 8 images (``sample.batch_size`` or fewer).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from genfw import checkpoint
    from genfw.sampling import sample_labels

    paths = [os.path.realpath(os.path.join(run.path(f"prior{i}"), "model.safetensors"))
             for i in range(len(run.resolved.prior_specs))]
    samplers = [s.model_dump() if hasattr(s, "model_dump") else s for s in run.resolved.sampler_params]
    key = json.dumps([paths, samplers, run.recipe.sample.labels], sort_keys=True, default=str)
    if key not in cache:
        priors = [checkpoint.load(p, device=run.device).eval() for p in paths]
        n = max(1, min(8, run.recipe.sample.batch_size, run.recipe.sample.n))
        labels = sample_labels(n, run.num_classes, run.recipe.sample.labels)
        labels = labels.to(run.device) if labels is not None else None
        g = torch.Generator(device=run.device).manual_seed(run.sample_seed())
        with torch.random.fork_rng(devices=[]), torch.inference_mode(), FlopCounterMode(display=False) as counter:
            codes: list[Any] = []
            for level, (prior, sp) in enumerate(zip(priors, run.resolved.sampler_params)):
                codes.append(prior.sample(n, labels=labels,
                                          context=codes[:level] or None, generator=g,
                                          params=prior.sampler_params(sp)))
        cache[key] = counter.get_total_flops() / n
    return {"sample/flops_per_image": float(cache[key])}


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
        if key.endswith((":low", ":high")):
            continue  # a run's own interval: averaging its bounds over seeds would mean nothing
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


#: Metrics that are proportions: no interval leaves [0, 1]. Every other column is >= 0.
PROPORTIONS = ("fidelity/precision", "fidelity/recall", "fidelity/coverage", "class_accuracy")


def bounds(key: str) -> tuple[float, float]:
    """The range a metric's true value lies in: [0, 1] for proportions, [0, inf) for the rest."""
    return (0.0, 1.0) if key in PROPORTIONS else (0.0, math.inf)


def _seed_items(seed_metrics: dict[Any, dict[str, Any]], key: str) -> list[tuple[Any, float, Interval | None]]:
    """(seed, value, within-run interval or None) for every seed with a finite value of ``key``."""
    out = []
    for seed, m in seed_metrics.items():
        em = expand_kinds(m)
        v = em.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            lo, hi = em.get(f"{key}:low"), em.get(f"{key}:high")
            iv = Interval(float(v), lo, hi, "within run") if lo is not None and hi is not None else None
            out.append((seed, float(v), iv))
    return out


def cell(seed_metrics: dict[Any, dict[str, Any]], key: str) -> tuple[str, Interval | None, int]:
    """(text, interval over seeds or None, N) of one table cell.

    With at least 3 seeds: mean [t-interval, clipped to the metric's range]. With fewer: every
    seed's value, each with its within-run interval (bootstrap or Wilson) where there is one.
    """
    items = _seed_items(seed_metrics, key)
    if not items:
        return "", None, 0
    iv = t_interval([v for _, v, _ in items], bounds(key))
    if iv is not None:
        return iv.text(), iv, len(items)
    return "; ".join(w.text() if w is not None else f"{v:.4g}" for _, v, w in items), None, len(items)


def _design(a: tuple[dict, dict], b: tuple[dict, dict]) -> str:
    """'paired' when every seed both have uses the same trained prior(s), 'independent' when none does."""
    (sa, pa), (sb, pb) = a, b
    common = [s for s in sa if s in sb]
    shared = [pa.get(s) is not None and pa.get(s) == pb.get(s) for s in common]
    if common and all(shared):
        return "paired"
    return "mixed" if any(shared) else "independent"


def _tests(entries: dict[str, tuple[dict, dict]], column: Column, label: str = "") -> list[dict[str, Any]]:
    """One test per pair of entries ``{name: (seed metrics, prior identity per seed)}``, without correction."""
    rows = []
    for a, b in itertools.combinations(entries, 2):
        design = _design(entries[a], entries[b])
        va = {s: v for s, v, _ in _seed_items(entries[a][0], column.key)}
        vb = {s: v for s, v, _ in _seed_items(entries[b][0], column.key)}
        row = {"a": a, "b": b, "at": label, "design": design}
        if design == "paired":
            common = [s for s in va if s in vb]
            if len(common) < 2:
                continue
            t = paired([va[s] for s in common], [vb[s] for s in common])
            row |= {"difference": t.difference, "t": t.t, "df": float(t.df), "p_t": t.p_t,
                    "p_sign_flip": t.p_sign_flip, "p": t.p, "n": t.n}
        elif design == "independent":
            if len(va) < 2 or len(vb) < 2:
                continue
            w = welch(list(va.values()), list(vb.values()))
            row |= {"difference": w.difference, "t": w.t, "df": w.df, "p_t": w.p, "p_sign_flip": None,
                    "p": w.p, "n": min(len(va), len(vb))}
        else:
            continue  # some seeds share a prior and some do not: neither test fits
        rows.append(row)
    return rows


def _holm(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row, adjusted in zip(rows, holm_adjusted([r["p"] for r in rows])):
        row["p_holm"] = adjusted
        row["significant"] = adjusted <= ALPHA
    return rows


def significance(results: dict[str, Any], column: Column) -> list[dict[str, Any]]:
    """A test for every pair of combinations on ``column``, Holm-corrected over all of them.

    Combinations that sample the same trained prior(s) at every seed (other sampler settings)
    are paired: paired t-test and exact sign-flip test over the per-seed differences, the larger
    p decides. Independently trained priors: Welch's t-test. Pairs are formed within one column,
    so likelihoods of different kinds are never ranked against each other.
    """
    entries = {n: (r["seeds"], r.get("priors") or {}) for n, r in results.items()}
    return _holm(_tests(entries, column))


def _tests_markdown(tests: list[dict[str, Any]], with_at: bool = False) -> list[str]:
    md = ["Paired designs (the same trained prior at every seed, other sampler settings): paired t-test "
          "and exact sign-flip permutation test over the per-seed differences, the larger p decides. "
          "Independently trained priors: Welch's t-test. Two-sided; Holm's correction over the "
          f"{len(tests)} test{'s' if len(tests) != 1 else ''} of this table at {ALPHA}; "
          "difference = first - second.", ""]
    head = ["pair"] + (["steps"] if with_at else []) + ["design", "difference", "t (df)", "p (t)",
                                                        "p (sign-flip)", "Holm-adjusted p", "verdict"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tests:
        verdict = "significant after Holm" if t["significant"] else "not significant"
        flip = f"{t['p_sign_flip']:.3g}" if t["p_sign_flip"] is not None else "—"
        design = f"paired, {t['n']} seeds" if t["design"] == "paired" else "independent (Welch)"
        cells = [f"{t['a']} vs {t['b']}"] + ([str(t["at"])] if with_at else []) + [
            design, f"{t['difference']:.4g}", f"{t['t']:.3g} ({t['df']:.3g})", f"{t['p_t']:.3g}", flip,
            f"{t['p_holm']:.3g}", verdict]
        md.append("| " + " | ".join(cells) + " |")
    return md


SAMPLERS_TEXT = {
    "tuned on validation, reported on test": "each combination's sampler settings were tuned on the validation "
    "reference (a grid over the `tune:` settings; the one with the lowest FID, or highest accuracy, as mean "
    "over seeds on the primary metric, on samples drawn for tuning only) and are reported here on fresh samples against the disjoint test reference",
    "frontier": "compared along a frontier: quality against counted sampling FLOPs and seconds per image at "
    "each step count (see below)",
    "as set per combination": "not matched (no `tune:` or `sweep:`): each combination samples with its own "
    "settings, so a difference may be a sampler effect",
}


def write_comparison(out_dir: str, results: dict[str, Any], primary: str | None = None,
                     samplers: str = "as set per combination") -> None:
    """comparison.md (table), comparison.csv, comparison_seeds.csv and comparison.png."""
    columns = table_columns(results)
    cells = {name: {c.key: cell(r["seeds"], c.key) for c in columns} for name, r in results.items()}
    ns = sorted({n for per in cells.values() for _, _, n in per.values() if n})
    arrow = {"lower": " ↓", "higher": " ↑", "": ""}
    header = ["combination", "N"] + [f"{c.label}{arrow[c.better]}" for c in columns]
    md = [f"Samplers: {samplers} — {SAMPLERS_TEXT.get(samplers, samplers)}.", ""]
    if ns and min(ns) >= MIN_SEEDS_FOR_T:
        md += [f"Mean [95% t-interval over N seeds, cut to the metric's range] (N = {', '.join(map(str, ns))}); "
               "every seed's value is in comparison_seeds.csv."]
    else:
        md += [f"Fewer than {MIN_SEEDS_FOR_T} seeds (N = {', '.join(map(str, ns)) or '0'}): every seed's value, "
               "no interval over seeds; in brackets the 95% interval within that seed's run (FID, KID: "
               "bootstrap over the samples with the reference fixed, for the value at this sample count; "
               "class accuracy, precision, coverage: Wilson), never outside the metric's range."]
    md += ["Shared across seeds: the data split, tokenizer, latent set, evaluation classifier and reference "
           "images; per seed: the prior's initial weights, batch order and noise, and its samples.", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in results:
        n = max((k for _, _, k in cells[name].values()), default=0)
        md.append("| " + " | ".join([name, str(n)] + [cells[name][c.key][0] for c in columns]) + " |")
    kinds = sorted({m.get(k) for r in results.values() for m in r["seeds"].values()
                    for k in m if k.endswith("/nll_kind")} - {None})
    if kinds:
        md += ["", "Held-out likelihood columns by kind (never compared across kinds):", ""]
        md += [f"- `{k}`: {NLL_KIND_LABELS.get(k, k)}" for k in kinds]
    md += ["", "Cost: prior train FLOPs = one training step counted by torch's FlopCounterMode "
           "(matmuls, convolutions) x steps; train s = wall time of the prior stage (shared priors "
           "counted in every combination that uses them); sampling FLOPs / image = one sampling call "
           "of the priors counted by FlopCounterMode (a cached autoregressive step counts what it "
           "computes for one token, a parallel step the whole grid); evals / image = backbone rows "
           "per image."]
    tuned = {n: r["tuned"] for n, r in results.items() if r.get("tuned") is not None}
    if tuned:
        md += ["", "## Tuned sampler settings", "",
               "| combination | tuned settings | validation value of each setting tried |", "|---|---|---|"]
        for name, t in tuned.items():
            tried = "; ".join(f"{', '.join(f'{k}={v}' for k, v in g['settings'].items())}: "
                              + (f"{g['value']:.4g}" if g["value"] is not None else "—") for g in t["grid"])
            chosen = ", ".join(f"{k}={v}" for k, v in t["settings"].items()) or "(no tunable setting)"
            md.append(f"| {name} | {chosen} | {t['metric']}: {tried} |")
    first = pick_primary(results, primary, columns)
    # a likelihood as primary metric: one test table per kind, never a pair across kinds
    primaries = [c for c in columns if primary and c.key.startswith(primary + "[")] or ([first] if first else [])
    if primary and not primaries:
        md += ["", f"No significance test: the primary metric '{primary}' is not among the results."]
    for primary_col in primaries:
        tests = significance(results, primary_col)
        md += ["", f"## Differences in {primary_col.label}", ""]
        if not tests:
            md.append("No test: it needs two combinations with at least two seeds each (paired: two common seeds).")
        else:
            md += _tests_markdown(tests)
    md += ["", "Overrides per combination:", ""]
    md += [f"- `{name}`: " + ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) for name, r in results.items()]
    io.write_text(os.path.join(out_dir, "comparison.md"), "\n".join(md) + "\n")

    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["combination"] + [f"{c.key}{suffix}" for c in columns for suffix in ("", ":low", ":high", ":n")])
    for name, r in results.items():
        row = [name]
        for c in columns:
            items = _seed_items(r["seeds"], c.key)
            iv = cells[name][c.key][1]
            row += ["", "", "", 0] if not items else [
                sum(v for _, v, _ in items) / len(items), iv.low if iv else "", iv.high if iv else "", len(items)]
        writer.writerow(row)
    io.write_text(os.path.join(out_dir, "comparison.csv"), buf.getvalue())

    buf = _io.StringIO()
    writer = csv.writer(buf)
    within = [c.key for c in columns if any(f"{c.key}:low" in m for r in results.values() for m in r["seeds"].values())]
    writer.writerow(["combination", "seed"] + [c.key for c in columns] + [f"{k}{s}" for k in within
                                                                           for s in (":low", ":high")])
    for name, r in results.items():
        for seed, m in r["seeds"].items():
            em = expand_kinds(m)
            writer.writerow([name, seed] + [em.get(c.key, "") for c in columns]
                            + [em.get(f"{k}{s}", "") for k in within for s in (":low", ":high")])
    io.write_text(os.path.join(out_dir, "comparison_seeds.csv"), buf.getvalue())
    _bar_chart(out_dir, results, columns, cells)


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


def _bar_chart(out_dir: str, results: dict[str, Any], columns: list[Column], cells: dict[str, dict]) -> None:
    """Means with their clipped t-interval (>= 3 seeds) or every seed's value with its within-run interval.

    Quality and likelihood columns only; the costs are in the table.
    """
    cost = {c.key for c in COST_COLUMNS}
    numeric = [c for c in columns if c.key not in cost and all(cells[n][c.key][2] for n in results)]
    if not numeric:
        return
    plt = _pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(numeric), figsize=(3.2 * len(numeric), 3.4), squeeze=False)
    for ax, c in zip(axes[0], numeric):
        bars, points = [], []  # (x, value, low, high): one matplotlib call each, not one per point
        for x, name in enumerate(names):
            iv = cells[name][c.key][1]
            if iv is not None:
                bars.append((x, iv.estimate, iv.low, iv.high))
                continue
            items = _seed_items(results[name]["seeds"], c.key)
            for j, (_, v, w) in enumerate(items):
                xj = x + 0.15 * (j - (len(items) - 1) / 2)
                points.append((xj, v, w.low if w is not None else v, w.high if w is not None else v))
        for group, kind in ((bars, "bar"), (points, "point")):
            if not group:
                continue
            xs, ys, lows, highs = zip(*group)
            if kind == "bar":
                ax.bar(xs, ys, color="tab:blue")
            # KID's unbiased estimate can fall below 0, where its interval (clipped to the true
            # KID's range, >= 0) does not reach: the point is drawn where it is, its bar from 0
            yerr = [[max(0.0, y - lo) for y, lo in zip(ys, lows)], [max(0.0, hi - y) for y, hi in zip(ys, highs)]]
            ax.errorbar(xs, ys, yerr=yerr, fmt="none" if kind == "bar" else "o", color="black" if kind == "bar"
                        else "tab:blue", capsize=2, markersize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(c.label, fontsize=8)
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "comparison.png"))


# --------------------------------------------------------------------------------------------
# sampling-steps sweep: the frontier


def write_sweep(out_dir: str, results: dict[str, Any], primary: str | None = None) -> None:
    """sweep.csv and sweep.png: quality against counted sampling FLOPs and seconds per image.

    A combination whose prior has no ``steps`` (autoregressive) is one point, from its main runs.
    Combinations are tested against each other at every step count (paired where they share the
    trained priors), and each combination at consecutive step counts (paired: one trained prior),
    Holm-corrected over all the sweep's tests together.
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
            text, iv, n = cell(per_seed, quality.key)
            if not n:
                continue
            cost = {}
            for k in ("evaluations_per_image", "flops_per_image", "seconds_per_image"):
                v = _values(per_seed, f"sample/{k}")
                cost[k] = sum(v) / len(v) if v else ""
            items = _seed_items(per_seed, quality.key)
            rows.append({"combination": name, "steps": steps if steps is not None else "", **cost,
                         quality.key: sum(v for _, v, _ in items) / n, f"{quality.key}:low": iv.low if iv else "",
                         f"{quality.key}:high": iv.high if iv else "", "n": n,
                         "per_seed": ";".join(f"{v:.6g}" for _, v, _ in items), "text": text})
    buf = _io.StringIO()
    fields = ["combination", "steps", "evaluations_per_image", "flops_per_image", "seconds_per_image", quality.key,
              f"{quality.key}:low", f"{quality.key}:high", "n", "per_seed"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(os.path.join(out_dir, "sweep.csv"), buf.getvalue())
    flops_axis = all(r["flops_per_image"] != "" for r in rows)
    x_axes = [("flops_per_image", "counted sampling FLOPs per image") if flops_axis
              else ("evaluations_per_image", "backbone evaluations per image"),
              ("seconds_per_image", "seconds per image")]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (x_key, x_label) in zip(axes, x_axes):
        for name in results:
            pts = sorted((r for r in rows if r["combination"] == name and r[x_key] != ""), key=lambda r: r[x_key])
            if not pts:
                continue
            x = [p[x_key] for p in pts]
            y = [p[quality.key] for p in pts]
            line = ax.plot(x, y, marker="o" if len(pts) > 1 else "s", label=name,
                           linestyle="-" if len(pts) > 1 else "none")[0]
            if all(p[f"{quality.key}:low"] != "" for p in pts):  # >= 3 seeds: the clipped t-interval
                low, high = [p[f"{quality.key}:low"] for p in pts], [p[f"{quality.key}:high"] for p in pts]
                if len(pts) > 1:
                    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
                else:
                    ax.errorbar(x, y, yerr=[[y[0] - low[0]], [high[0] - y[0]]], color=line.get_color(), capsize=3)
            else:  # fewer seeds: every seed's value, no band
                for p in pts:
                    seeds = [float(v) for v in p["per_seed"].split(";")]
                    ax.scatter([p[x_key]] * len(seeds), seeds, s=8, color=line.get_color(), alpha=0.5)
        ax.set_xscale("log")
        # plain numbers at 1-2-5 steps (the default minor-tick labels overlap on a short log axis)
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{quality.label}{' (lower is better)' if quality.better == 'lower' else ''}")
        ax.legend(fontsize=7)
    ns = sorted({r["n"] for r in rows})
    how = ("mean, 95% t-band cut to the metric's range" if ns and min(ns) >= MIN_SEEDS_FOR_T
           else "mean line, every seed as a dot, no band")
    fig.suptitle(f"{quality.label} vs sampling cost ({how}; N = {', '.join(map(str, ns))} seeds)", fontsize=9)
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "sweep.png"))
    lines = ["", "## Quality vs sampling cost (frontier)", "",
             f"![sweep](sweep.png)  (data: sweep.csv; {quality.label}: "
             + ("mean [95% t-interval]" if ns and min(ns) >= MIN_SEEDS_FOR_T else "every seed's value") + ")", "",
             "| combination | steps | sampling FLOPs / image | evals / image | s / image | " + quality.label + " |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.4g}" if v != "" else "—"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['combination']} | {r['steps']} | {fmt(r['flops_per_image'])} | "
                     f"{fmt(r['evaluations_per_image'])} | {fmt(r['seconds_per_image'])} | {r['text']} |")
    step_counts = sorted({s for r in results.values() for s in r["sweep"]})
    tests = []
    for steps in step_counts:
        entries = {n: (r["sweep"][steps], r.get("sweep_priors", {}).get(steps) or {})
                   for n, r in results.items() if steps in r["sweep"]}
        tests += _tests(entries, quality, label=str(steps))
    for name, r in results.items():  # one trained prior at consecutive step counts: paired
        for s1, s2 in zip(step_counts, step_counts[1:]):
            if s1 in r["sweep"] and s2 in r["sweep"]:
                tests += _tests({f"{name}@{s}": (r["sweep"][s], r.get("sweep_priors", {}).get(s) or {})
                                 for s in (s1, s2)}, quality, label=f"{s1} vs {s2}")
    if tests:
        lines += ["", f"### Differences in {quality.label} at each step count", ""]
        lines += _tests_markdown(_holm(tests), with_at=True)
    io.write_text(md_path, io.read_bytes(md_path).decode() + "\n".join(lines) + "\n")


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the terminal: a few columns of the comparison, as in comparison.md."""
    columns = [c for c in table_columns(results)
               if c.key in ("fidelity/fid", "class_accuracy", "train/flops", "sample/seconds_per_image")
               or "bits_per_token" in c.key]
    header = ["combination", "N"] + [c.label for c in columns]
    rows = []
    for name, r in results.items():
        texts, n = [], 0
        for c in columns:
            text, _, k = cell(r["seeds"], c.key)
            n = max(n, k)
            texts.append(text)
        rows.append([name, str(n)] + texts)
    return header, rows


class _CallableModule(type(sys.modules[__name__])):
    """``genfw.ablate`` is this module and the Python API's function at once: calling the module
    runs :func:`genfw.api.ablate` (a submodule import would otherwise replace the function)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from genfw.api import ablate

        return ablate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
