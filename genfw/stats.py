"""Small statistics for comparing runs over seeds: Student-t intervals and Welch's t-test.

No SciPy: the Student-t CDF is computed from the regularised incomplete beta function
(continued fraction, Numerical Recipes §6.4), its quantile by bisection. Accurate to about
1e-10, far below what a handful of seeds can resolve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x = {x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (df > 0, not necessarily whole)."""
    if df <= 0:
        raise ValueError(f"t_cdf: degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q = {q} must be in (0, 1)")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Mean of n values with the half-width of its two-sided ``level`` t-interval (0 when n < 2)."""

    mean: float
    half_width: float
    n: int
    std: float

    def text(self, fmt: str = "{:.4g}") -> str:
        if self.n < 2:
            return fmt.format(self.mean)
        spread = self.half_width if self.half_width > 1e-12 * max(1.0, abs(self.mean)) else 0.0
        return f"{fmt.format(self.mean)} ± {fmt.format(spread)}"


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean, t-interval half-width (``level``), count and sample standard deviation."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("summarize: no values")
    mean = sum(xs) / n
    if n < 2:
        return Summary(mean, 0.0, n, 0.0)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(mean, t_ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n), n, std)


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of mean(a) - mean(b)."""

    difference: float
    t: float
    df: float
    p: float  # two-sided


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Two-sided Welch t-test; both samples need at least two values.

    Two samples with zero spread give p = 0 when their means differ and 1 when they agree.
    """
    sa, sb = summarize(a), summarize(b)
    if sa.n < 2 or sb.n < 2:
        raise ValueError("Welch's t-test needs at least two values per group")
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    diff = sa.mean - sb.mean
    if va + vb == 0:
        return Welch(diff, math.inf if diff else 0.0, float(sa.n + sb.n - 2), 0.0 if diff else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va**2 / (sa.n - 1) if va else 0.0) + (vb**2 / (sb.n - 1) if vb else 0.0))
    return Welch(diff, t, df, 2.0 * (1.0 - t_cdf(abs(t), df)))


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni: which of several tests reject at family-wise error rate ``alpha``."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    reject = [False] * len(pvalues)
    m = len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject
