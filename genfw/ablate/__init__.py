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

**Modules.** :mod:`~genfw.ablate.plan` reads the ablation file and lists every run (combinations x
seeds, sweep points, the two halves of ``tune:``); :mod:`~genfw.ablate.runner` runs them, sharing
stages, and counts their costs; :mod:`~genfw.ablate.columns` says which metrics the tables show;
:mod:`~genfw.ablate.stats` computes the cells' intervals and the tests; :mod:`~genfw.ablate.report`
writes the tables and figures. ``genfw.ablate`` itself is callable: ``genfw.ablate(path, ...)`` is
:func:`genfw.ablate.runner.ablate`.
"""

from __future__ import annotations

import sys
from typing import Any

from genfw.ablate.columns import (
    BASE_COLUMNS,
    COST_COLUMNS,
    PRIMARY_DEFAULTS,
    PROPORTIONS,
    TOKENIZER_COLUMNS,
    Column,
    _values,
    bounds,
    expand_kinds,
    mean_metrics,
    pick_primary,
    table_columns,
)
from genfw.ablate.plan import (
    MAX_SEEDS,
    MAX_SWEEP_POINTS,
    MAX_TUNE_POINTS,
    SAMPLER_FREE_METRICS,
    TUNE_SEED_OFFSET,
    Plan,
    _as_set,
    choose_tuned,
    combinations,
    load_ablation,
    plan_ablation,
)
from genfw.ablate.report import (
    SAMPLERS_TEXT,
    measuring_stick,
    summary_rows,
    tuned_rows,
    write_comparison,
    write_sweep,
)
from genfw.ablate.runner import ablate, run_ablation
from genfw.ablate.stats import ALPHA, MAX_KID_BOOTSTRAP, cell, significance, within_run_intervals

__all__ = ["ALPHA", "BASE_COLUMNS", "COST_COLUMNS", "MAX_KID_BOOTSTRAP", "MAX_SEEDS", "MAX_SWEEP_POINTS",
           "MAX_TUNE_POINTS", "PRIMARY_DEFAULTS", "PROPORTIONS", "SAMPLERS_TEXT", "SAMPLER_FREE_METRICS",
           "TOKENIZER_COLUMNS", "TUNE_SEED_OFFSET", "Column", "Plan", "_as_set", "_values", "ablate", "bounds",
           "cell", "choose_tuned", "combinations", "expand_kinds", "load_ablation", "mean_metrics", "measuring_stick",
           "pick_primary", "plan_ablation", "run_ablation", "significance", "summary_rows", "table_columns",
           "tuned_rows", "within_run_intervals", "write_comparison", "write_sweep"]


class _CallableModule(type(sys.modules[__name__])):
    """``genfw.ablate`` is this package and the Python API's function at once: calling the package
    runs :func:`genfw.ablate.runner.ablate` (a submodule import would otherwise replace the function)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return ablate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
