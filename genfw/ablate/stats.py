"""The statistics of a comparison: table cells with their intervals, tests with Holm, within-run intervals.

The rules are :mod:`genfw.stats`'s (t-intervals from 3 seeds, paired t-test and sign-flip test,
Welch's t-test, Holm's correction, bootstrap and Wilson intervals); this module applies them to
an ablation's results. Which columns exist is :mod:`genfw.ablate.columns`; how the tests are
written out, :mod:`genfw.ablate.report`.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import torch

from genfw import checkpoint, io
from genfw.ablate.columns import Column, bounds, expand_kinds
from genfw.stats import (
    Interval,
    bootstrap_fid,
    bootstrap_kid,
    holm_adjusted,
    paired,
    t_interval,
    welch,
    wilson,
)

ALPHA = 0.05


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


#: Most samples for KID's within-run interval: its bootstrap holds the N x N kernel matrix.
MAX_KID_BOOTSTRAP = 5000


def within_run_intervals(folder: str, n_boot: int = 1000, device: str = "cpu") -> dict[str, Any]:
    """Per-run 95% intervals from ``evaluate/features.safetensors``: bootstrap FID/KID; Wilson for class
    accuracy, precision and coverage.

    Keys ``<metric>:low`` and ``<metric>:high``; empty when the run evaluated no fidelity.
    """
    from genfw.evaluate import PER_SAMPLE_FILE  # late: start-up time (genfw.evaluate loads genfw.metrics)

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
        r, f = torch.from_numpy(real), torch.from_numpy(fake)
        radii = torch.cdist(r, r).kthvalue(k + 1, dim=1).values  # +1: the image itself
        d = torch.cdist(f, r)  # [N, M]
        proportions["fidelity/precision"] = (d <= radii[None]).any(1)
        proportions["fidelity/coverage"] = (d < radii[None]).any(0)
    for key, hits in proportions.items():
        iv = wilson(int(hits.sum()), int(hits.numel()))
        out |= {f"{key}:low": iv.low, f"{key}:high": iv.high}
    # the second classifier judged the same samples; its hits are its accuracy times their count
    metrics_file = os.path.join(folder, "metrics.json")
    if "correct" in tensors and os.path.exists(metrics_file):
        second = io.read_json(metrics_file).get("classifier2/class_accuracy")
        if isinstance(second, (int, float)):
            n = int(tensors["correct"].numel())
            iv = wilson(round(second * n), n)
            out |= {"classifier2/class_accuracy:low": iv.low, "classifier2/class_accuracy:high": iv.high}
    return out
