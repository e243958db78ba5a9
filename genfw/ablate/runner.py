"""Running an ablation: every planned run, sharing the stages they agree on, with its costs; then the comparison.

:func:`run_ablation` executes what :func:`genfw.ablate.plan.plan_ablation` lists (pre-flight
checks first, then the ``tune:`` runs on the validation reference, then the reported runs),
points each run's training stages at shared folders keyed by their fingerprints
(:func:`_link_shared`: a stage already computed is not computed again), adds each run's counted
costs (training and sampling FLOPs, seconds) and within-run intervals to its metrics, and writes
the comparison (:mod:`genfw.ablate.report`). :func:`ablate` is the Python API's
``genfw.ablate(...)`` (also ``genfw.api.ablate``). What the runs are is decided in
:mod:`genfw.ablate.plan`; the statistics and the tables are :mod:`genfw.ablate.stats` and
:mod:`genfw.ablate.report`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from genfw import checkpoint, io
from genfw.ablate.columns import mean_metrics, pick_primary, table_columns
from genfw.ablate.plan import _sampler_free, _slug, choose_tuned, plan_ablation
from genfw.ablate.report import write_comparison, write_sweep
from genfw.ablate.stats import within_run_intervals
from genfw.catalog import resolve
from genfw.data import LatentDataset
from genfw.preflight import preflight
from genfw.progress import console
from genfw.sampling import sample_labels


def ablate(path: str | os.PathLike, overrides: list[str] | None = None, device: str | None = None,
           output_dir: str | None = None, seeds: int | None = None, sweep_steps: list[int] | None = None,
           shared_dir: str | None = None) -> dict[str, Any]:
    """Run an ablation file (or a shipped one, e.g. ``"ablations/priors"``) like ``genfw ablate``.

    Returns ``{combination: {"overrides", "seeds": {seed: metrics}, "metrics": means over seeds,
    "sweep": ..., "priors": ..., "tuned": ...}}`` (see :func:`genfw.ablate.run_ablation`).
    """
    return run_ablation(resolve(os.fspath(path)), overrides, device=device, seeds=seeds, sweep_steps=sweep_steps,
                        shared_dir=shared_dir, output_dir=output_dir)


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
    from genfw.pipeline import Run  # late: start-up time (the pipeline's stages load genfw.metrics)

    plan = plan_ablation(path, extra_overrides, seeds=seeds, sweep_steps=sweep_steps, output_dir=output_dir)
    spec, out_dir, combos, tune, sweep = plan.spec, plan.out_dir, plan.combos, plan.tune, plan.sweep
    jobs, tuning = plan.jobs, plan.tuning
    # Every run is validated (plan_ablation); check this machine can run each of them before the
    # first stage of the first.
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
        jobs = plan.reported_jobs({c: results[c]["tuned"]["settings"] for c in tuned})
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


def _link_shared(run, shared: str, only: tuple[str, ...] | None = None) -> None:
    """Point the run's training stages (or ``only`` these) at shared folders keyed by their fingerprint.

    Combinations that agree on a stage's inputs (e.g. every sampler setting of one prior, or
    every prior on one tokenizer) then compute it once.
    """
    os.makedirs(run.dir, exist_ok=True)
    stages = [("tokenizer", run._fp_tokenizer()), ("latents", run._fp_latents())]
    stages += [(f"prior{i}", run._fp_prior(i)) for i in range(len(run.resolved.prior_specs))]
    for stage, fp in stages:
        if only is not None and stage not in only:
            continue
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


def _prior_costs(run, flops_cache: dict[str, int]) -> dict[str, Any]:
    """Training FLOPs (one counted step x steps) and wall seconds of the run's priors."""
    # late: start-up time (genfw.metrics loads torch-fidelity, ~1 s; genfw.api imports this package)
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


def _sampling_flops(run, cache: dict[str, Any]) -> dict[str, Any]:
    """Sampling FLOPs per image: one sampling call of the run's priors counted by torch's FlopCounterMode.

    Counted, not estimated: an autoregressive prior's cached one-token steps count by what they
    compute, a parallel step by its whole grid. At most 8 images (``sample.batch_size`` or fewer).
    """
    from torch.utils.flop_counter import FlopCounterMode  # late: start-up time (loads triton, ~60 ms)

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
