"""Recompute every test in docs/comparison-round1.md from docs/data/round1_per_seed.csv.

    .venv/bin/python benchmarks/comparison_round1.py            # prints the tables of the page

The CSV holds the per-seed values of the first MNIST study (2026-12-02) as its comparison files
reported them (the run folders were not kept). The tests are the ones that fit the design: the
proportion study samples the *same* trained SUNDAE prior at each proportion, so its differences
are paired (paired t and the exact sign-flip test, Holm over the tests that back the claim); the
priors were trained independently, so theirs are Welch tests. With two seeds no t-interval is
printed: per-seed values only (a t quantile of 12.7 gives intervals outside the metric's range).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

from genfw import stats

DATA = Path(__file__).resolve().parents[1] / "docs" / "data" / "round1_per_seed.csv"


def load(path: Path = DATA) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_seed(rows: list[dict[str, str]], metric: str, **where: str) -> list[float]:
    """The metric's values over seeds (in seed order) of the rows matching ``where``."""
    chosen = sorted((r for r in rows if all(r[k] == v for k, v in where.items()) and r[metric]),
                    key=lambda r: int(r["seed"]))
    return [float(r[metric]) for r in chosen]


def proportion_claim(rows: list[dict[str, str]]) -> list[dict[str, object]]:
    """p = 0.2 against p = 0.8 at each step count: paired over seeds, Holm over the three tests."""
    out = []
    for steps in ("8", "16", "32"):
        low = by_seed(rows, "fid", study="proportion", arm="p0.2", steps=steps)
        high = by_seed(rows, "fid", study="proportion", arm="p0.8", steps=steps)
        test = stats.paired(low, high)
        out.append({"steps": int(steps), "differences": [round(a - b, 2) for a, b in zip(low, high)],
                    "paired_t_p": test.p_t, "sign_flip_p": test.p_sign_flip})
    adjusted = stats.holm_adjusted([max(r["paired_t_p"], r["sign_flip_p"]) for r in out])
    for r, p in zip(out, adjusted):
        r["holm_p"] = p
    return out


def table4(rows: list[dict[str, str]]) -> dict[str, object]:
    """Absorbing's held-out ELBO against the autoregressive prior's exact NLL (independent trainings)."""
    bound = by_seed(rows, "heldout_bits_per_token", study="priors", arm="absorbing")
    exact = by_seed(rows, "heldout_bits_per_token", study="priors", arm="autoregressive")
    w = stats.welch(bound, exact)
    return {"absorbing_elbo": bound, "autoregressive_nll": exact, "difference": sum(bound) / 2 - sum(exact) / 2,
            "welch_p": w.p}


def main() -> int:
    rows = load()
    print("priors at their round-1 samplers (per seed; no interval with N = 2):")
    per_arm = defaultdict(dict)
    for metric in ("fid", "class_accuracy", "heldout_bits_per_token"):
        for arm in ("sundae", "absorbing", "autoregressive"):
            per_arm[arm][metric] = by_seed(rows, metric, study="priors", arm=arm)
    for arm, values in per_arm.items():
        print(f"  {arm:15s} " + "  ".join(f"{m} {v}" for m, v in values.items() if v))
    print("proportion claim (FID, p=0.2 minus p=0.8, paired over seeds 0 and 1):")
    for r in proportion_claim(rows):
        print(f"  {r['steps']:2d} steps: differences {r['differences']}, paired t p = {r['paired_t_p']:.3f}, "
              f"exact sign-flip p = {r['sign_flip_p']:.3f}, Holm-adjusted p = {r['holm_p']:.3f}")
    t4 = table4(rows)
    print(f"Table 4: absorbing ELBO {t4['absorbing_elbo']} vs autoregressive NLL {t4['autoregressive_nll']} "
          f"bits/token: difference {t4['difference']:+.3f}, Welch p = {t4['welch_p']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
