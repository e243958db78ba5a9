"""Planning an ablation: the ablation file, its combinations and every run they need, before any runs.

Reads and checks the file (:func:`load_ablation`), expands variants x grid into named
combinations (:func:`combinations`) and lists the runs (:func:`plan_ablation`): every
combination per seed and per sweep point, and with ``tune:`` its two halves -- every setting on
the validation reference, then the chosen one (:func:`choose_tuned`) on the test reference
(:meth:`Plan.reported_jobs`). Every run's recipe is validated here, before the first run starts;
running them is :mod:`genfw.ablate.runner`.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from genfw.ablate.columns import BASE_COLUMNS, COST_COLUMNS, Column, _values
from genfw.config import apply_overrides, load_yaml, validate_recipe
from genfw.errors import ConfigError
from genfw.registry import get_registry

MAX_SEEDS = 20
MAX_SWEEP_POINTS = 20
MAX_TUNE_POINTS = 24
#: Sample seed offset of tuning runs: tuning draws other samples than the reported runs.
TUNE_SEED_OFFSET = 1000


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


# --------------------------------------------------------------------------------------------
# the runs


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


def _prior_has_steps(resolved) -> bool:
    registry = get_registry()
    return all("steps" in registry.load("prior", s.name).SamplerParams.model_fields for s in resolved.prior_specs)


@dataclass
class Plan:
    """Every run of an ablation, its recipe validated: what :func:`genfw.ablate.runner.run_ablation` runs."""

    path: str
    spec: dict[str, Any]  # the checked ablation file, with --seeds and --sweep-steps applied
    out_dir: str
    combos: list[tuple[str, dict[str, Any]]]  # (combination, its overrides)
    base: dict[str, Any]  # the base recipe
    common: list[str]  # the file's set:, applied to every combination
    last: list[str]  # the command line's --set: wins over the file and its variants
    jobs: list[tuple] = field(default_factory=list)  # (combination, seed, sweep steps or None, folder, resolved)
    tuning: list[tuple] = field(default_factory=list)  # (combination, seed, settings, folder, resolved)

    @property
    def tune(self) -> dict[str, Any]:
        return self.spec.get("tune") or {}

    @property
    def sweep(self) -> list[int]:
        return (self.spec.get("sweep") or {}).get("steps") or []

    def resolve(self, cname: str, overrides: dict[str, Any], extra: list[str]):
        raw = apply_overrides(self.base, self.common + _as_set(overrides) + self.last + extra)  # seeds, sweep steps last
        raw["name"] = f"{raw.get('name', 'recipe')}-{cname}"
        try:
            return validate_recipe(raw)
        except ConfigError as e:
            raise type(e)(f"ablation combination '{cname}': {e}") from None

    def reported_jobs(self, settings: dict[str, dict[str, Any]]) -> list[tuple]:
        """``tune:``'s second half: the reported runs, each tuned combination (a key of ``settings``)
        with its chosen sampler settings, on the test reference."""
        overrides = dict(self.combos)
        return [(c, s, st, f, r if c not in settings else self.resolve(
                    c, overrides[c], _seed_overrides(s) + ["evaluate.reference=test"]
                    + _as_set({f"sample.params.{k}": v for k, v in settings[c].items()})))
                for c, s, st, f, r in self.jobs]


def plan_ablation(path: str, extra_overrides: list[str] | None = None, seeds: int | None = None,
                  sweep_steps: list[int] | None = None, output_dir: str | None = None) -> Plan:
    """Every run of the ablation file ``path``, each recipe validated (arguments as :func:`run_ablation`'s).

    ``jobs``: each combination per seed, and per sweep point (the point that is the main run's own
    step count has no folder: the main run is it); ``tuning``: with ``tune:``, every setting of
    the tune grid that the combination's prior has, per seed, on the validation reference with
    their own samples (``sample.seed`` + :data:`TUNE_SEED_OFFSET`).
    """
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
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), spec["base"])
    base = load_yaml(base_path)
    common = list(spec.get("set") or [])
    last = list(extra_overrides or [])  # the command line's --set wins over the file and its variants
    name = spec.get("name") or os.path.splitext(os.path.basename(path))[0]
    out_dir = output_dir or spec.get("output_dir") or os.path.join("runs", f"ablation-{name}")
    plan = Plan(path, spec, out_dir, combinations(spec), base, common, last)
    resolve, tune, sweep = plan.resolve, plan.tune, plan.sweep

    def tune_points(res) -> list[dict[str, Any]]:
        """The tune grid restricted to the settings this combination's prior(s) have."""
        fields = set.intersection(*(set(get_registry().load("prior", p.name).SamplerParams.model_fields)
                                    for p in res.prior_specs))
        keys = [k for k in tune if k in fields]
        return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))] if keys else []

    def sample_seed(res) -> int:
        r = res.recipe
        return r.sample.seed if r.sample.seed is not None else r.seed

    # Validate every run before starting any of them.
    jobs, tuning = plan.jobs, plan.tuning  # tuning runs first, on the validation reference
    if tune:
        unknown = set(tune)
    for cname, overrides in plan.combos:
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
    return plan


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
