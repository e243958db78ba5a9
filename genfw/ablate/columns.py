"""The columns of an ablation's tables and the per-seed values under them.

Which metrics a comparison shows (fidelity, the tokenizer's where it differs, held-out
likelihoods split by kind, cost), the range each lies in, the primary metric, and means over
seeds. No tests or intervals (:mod:`genfw.ablate.stats`), no files (:mod:`genfw.ablate.report`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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
    # the second, independently trained evaluation classifier (genfw.evaluate.CLASSIFIERS)
    Column("classifier2/class_accuracy", "class acc. (classifier 2)", "higher"),
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
