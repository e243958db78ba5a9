"""Statistics for comparing runs: which test fits which design, and intervals that stay in range.

The rules (``genfw ablate`` follows them; docs/evaluation.md says the same in a user's words):

* **Paired design** — two settings measured on the same trained model (sampler settings,
  sweep points): the paired t-test *and* the exact sign-flip permutation test over the
  per-seed differences (:func:`paired_t`, :func:`sign_flip`); a verdict uses the larger p.
* **Independent design** — priors trained separately: Welch's unequal-variance t-test
  (:func:`welch`).
* **Several tests behind one claim** — Holm's correction over all of them (:func:`holm`).
* **Intervals** — over seeds, a Student-t interval only with at least 3 seeds (fewer: every
  seed's value, no interval), clipped to the metric's range (:func:`clip`); within one seed,
  a bootstrap over the samples for FID/KID (:func:`bootstrap_fid`, :func:`bootstrap_kid`; the
  difference of two samplers of one model: :func:`bootstrap_fid_difference`) and
  Wilson's score interval for proportions such as class accuracy (:func:`wilson`). No bound
  leaves [0, 1] for a proportion or goes below 0 for FID/KID.

No SciPy at run time: the Student-t CDF is computed from the regularised incomplete beta
function (continued fraction, Numerical Recipes §6.4), its quantile by bisection, accurate to
about 1e-10; the tests check every function against SciPy on fixed data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Fewest seeds for which a Student-t interval over seeds is printed (with 2 the 95% quantile is 12.7).
MIN_SEEDS_FOR_T = 3


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


def holm_adjusted(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (monotone step-down, capped at 1): reject where adjusted <= alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


# --------------------------------------------------------------------------------------------
# paired designs: the same trained model under two settings


@dataclass(frozen=True)
class Paired:
    """Paired comparison of a and b over n pairs: mean difference, paired t, and the exact sign-flip p."""

    difference: float  # mean of a_i - b_i
    t: float
    df: int
    p_t: float  # two-sided paired t-test
    p_sign_flip: float  # two-sided exact permutation test over the 2^n sign flips
    n: int

    @property
    def p(self) -> float:
        """The p-value a verdict uses: the larger of the two (both tests must reject)."""
        return max(self.p_t, self.p_sign_flip)


def _differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"a paired test needs pairs: got {len(a)} and {len(b)} values")
    return [float(x) - float(y) for x, y in zip(a, b)]


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int]:
    """(t, two-sided p, df) of the paired t-test of mean(a - b) = 0; needs at least two pairs.

    Differences with zero spread give p = 0 when their mean is not 0 and 1 when it is.
    """
    d = _differences(a, b)
    s = summarize(d)
    if s.n < 2:
        raise ValueError("the paired t-test needs at least two pairs")
    if s.std == 0:
        return (math.inf if s.mean else 0.0), (0.0 if s.mean else 1.0), s.n - 1
    t = s.mean / (s.std / math.sqrt(s.n))
    return t, 2.0 * (1.0 - t_cdf(abs(t), s.n - 1)), s.n - 1


def sign_flip(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided p of the sign-flip permutation test of the paired differences a - b.

    Under the null each difference is as likely positive as negative: p is the fraction of the
    2^n sign assignments whose mean is at least as far from 0 as the observed one (the observed
    assignment included, so p >= 2^-(n-1) and n = 2 pairs can never give p < 0.5).
    """
    d = np.asarray(_differences(a, b), dtype=np.float64)
    n = d.size
    if n < 1:
        raise ValueError("the sign-flip test needs at least one pair")
    if n > 24:
        raise ValueError(f"the exact sign-flip test enumerates 2^n assignments: n = {n} pairs is too many")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # [2^n, n]
    stats = np.abs(signs @ d)
    observed = abs(d.sum())
    return float(np.mean(stats >= observed - 1e-12 * max(1.0, observed)))


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Both paired tests of a against b (same model under two settings, one pair per seed)."""
    t, p_t, df = paired_t(a, b)
    d = _differences(a, b)
    return Paired(sum(d) / len(d), t, df, p_t, sign_flip(a, b), len(d))


# --------------------------------------------------------------------------------------------
# intervals that stay in the metric's range


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided interval [low, high] and how it was made."""

    estimate: float
    low: float
    high: float
    method: str

    def text(self, fmt: str = "{:.4g}") -> str:
        return f"{fmt.format(self.estimate)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def clip(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """An interval cut to a metric's range: the true value lies in the range, so no coverage is lost."""
    lo, hi = bounds
    return min(max(low, lo), hi), max(min(high, hi), lo)


def t_interval(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf),
               level: float = 0.95) -> Interval | None:
    """Student-t interval of the mean over seeds, clipped to ``bounds``; None with fewer than 3 values."""
    if len(values) < MIN_SEEDS_FOR_T:
        return None
    s = summarize(values, level)
    low, high = clip(s.mean - s.half_width, s.mean + s.half_width, bounds)
    return Interval(s.mean, low, high, f"{level:.0%} t-interval over {s.n} seeds")


def wilson(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson's score interval for a proportion (inside [0, 1] by construction)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = normal_ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = clip(centre - half, centre + half, (0.0, 1.0))
    return Interval(p, low, high, f"{level:.0%} Wilson interval over {n} samples")


def normal_ppf(q: float) -> float:
    """The q-quantile of the standard normal (bisection on erf)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"normal_ppf: q = {q} must be in (0, 1)")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------
# bootstrap over the samples of one run (reference set held fixed)
#
# Each replicate draws the samples with replacement, represented by the count c_k of each
# original sample, so no resampled copy is materialised. What the interval is for: the value the
# estimator gives at this number of samples against this reference (its finite-sample bias
# included: FIDs are only compared at equal counts). A resample holds only about 63% distinct
# samples, so FID's bias pushes every replicate up, far past the estimate (real-vs-real, 200
# samples of 128-d features: estimate 42, replicates about 60), and neither plain percentiles nor
# the "basic" reversal contain the estimate then. So the replicates' spread around their own
# mean is placed around the estimate: est - (q_hi - mean*) .. est + (mean* - q_lo) (the
# reversal keeps a skewed spread on the correct side). Then clipped at 0: FID and the squared
# MMD behind KID are >= 0.


def _float64(x, device: str = "cpu"):
    import torch

    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float64,
                           device=device)


def fid_from_features(samples, reference, counts=None, device: str = "cpu") -> float:
    """FID of (optionally count-weighted) sample features [N, D] against reference features [M, D], float64.

    ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₂^½ Σ₁ Σ₂^½)^½, the same quantity torch-fidelity computes.
    """
    return _FID(reference, device)(_float64(samples, device), counts)


class _FID:
    """FID against one fixed reference: its moments and Σ_r^½ are computed once (float64, on ``device``)."""

    def __init__(self, reference, device: str = "cpu") -> None:
        import torch

        r = _float64(reference, device)
        self.device = device
        self.mu_r = r.mean(0)
        rc = r - self.mu_r
        self.cov_r = rc.T @ rc / (r.shape[0] - 1)
        w, v = torch.linalg.eigh((self.cov_r + self.cov_r.T) / 2)
        self.root_r = (v * w.clamp_min(0).sqrt()) @ v.T
        self.trace_r = float(torch.trace(self.cov_r))

    def __call__(self, samples, counts=None) -> float:
        """FID of the samples, weighted by ``counts`` [N] (how often each was drawn) when given."""
        return float(self.batch(samples, None if counts is None else _float64(counts, self.device)[None])[0])

    def batch(self, x, counts=None, memory: float = 2**28):
        """FIDs of several weightings of the samples at once: ``counts`` [B, N] -> [B] (numpy)."""
        import torch

        n, d = x.shape
        if counts is None:
            counts = torch.ones(1, n, dtype=torch.float64, device=x.device)
        out = []
        # Σ_s = Bᵀ B / (n - 1) with B = diag(√c) (X - μ): tr (Σ_r^½ Σ_s Σ_r^½)^½ is the sum of the square roots
        # of the eigenvalues of G Gᵀ (fewer samples than dimensions; G = B Σ_r^½ / √(n - 1)) or of
        # Σ_r^½ Σ_s Σ_r^½; the draws go through in chunks that fit in ``memory`` bytes
        chunk = max(1, int(memory // (8 * n * max(n, d))))
        for c in counts.split(chunk):
            total = c.sum(1)  # [b]
            mu = c @ x / total[:, None]  # [b, D]
            b = c.sqrt()[:, :, None] * (x[None] - mu[:, None])  # [b, N, D]
            if n < d:
                g = b @ self.root_r / (total - 1).sqrt()[:, None, None]
                gram = g @ g.transpose(1, 2)
            else:
                gram = self.root_r @ (b.transpose(1, 2) @ b / (total - 1)[:, None, None]) @ self.root_r
            trace_root = torch.linalg.eigvalsh((gram + gram.transpose(1, 2)) / 2).clamp_min(0).sqrt().sum(1)
            trace_s = (b**2).sum((1, 2)) / (total - 1)
            out.append(((mu - self.mu_r) ** 2).sum(1) + trace_s + self.trace_r - 2 * trace_root)
        return torch.cat(out).cpu().numpy()


class _KID:
    """Unbiased squared MMD with the cubic kernel (x·y/d + 1)³ against a fixed reference."""

    def __init__(self, samples: np.ndarray, reference: np.ndarray) -> None:
        d = samples.shape[1]
        kernel = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
        self.k_ss = kernel(samples, samples)
        m = reference.shape[0]
        k_rr = kernel(reference, reference)
        self.rr = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
        self.sr = kernel(samples, reference).mean(1)  # [n]: mean kernel of each sample to the reference

    def __call__(self, counts: np.ndarray | None = None) -> float:
        n = self.k_ss.shape[0]
        c = np.ones(n) if counts is None else np.asarray(counts, np.float64)
        total = c.sum()
        # pairs of distinct original samples only: a sample drawn twice is not paired with its copy,
        # whose kernel value with itself would bias every replicate upwards
        same = (c * c * np.diag(self.k_ss)).sum()
        ss = (c @ self.k_ss @ c - same) / (total * total - (c * c).sum())
        return float(ss + self.rr - 2 * (c @ self.sr) / total)


def _centred_bootstrap(estimate: float, replicates: np.ndarray, level: float, lower: float,
                       method: str) -> Interval:
    q_lo, q_hi = np.quantile(replicates, [0.5 - level / 2, 0.5 + level / 2])
    centre = float(np.mean(replicates))
    low, high = clip(estimate - (q_hi - centre), estimate + (centre - q_lo), (lower, math.inf))
    return Interval(estimate, float(low), float(high), method)


def _counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def bootstrap_fid(samples, reference, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                  device: str = "cpu") -> Interval:
    """FID with a bootstrap interval over the samples (reference fixed; see above), never below 0.

    float64 on ``device``: a draw costs about 2 N D² + 10 D³ FLOPs (N samples, D dimensions), so
    50,000 Inception features (D = 2048) want a GPU; 256 classifier features (D = 128) do not.
    """
    fid = _FID(reference, device)
    samples = _float64(samples, device)
    estimate = fid(samples)
    reps = fid.batch(samples, _float64(_counts(samples.shape[0], n_boot, seed), device))
    return _centred_bootstrap(estimate, reps, level, 0.0,
                            f"{level:.0%} bootstrap over {samples.shape[0]} samples ({n_boot} draws)")


def bootstrap_kid(samples: np.ndarray, reference: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> Interval:
    """KID (unbiased MMD² over the whole sets) with a bootstrap interval over the samples, low >= 0.

    The estimate itself may be slightly negative (it is unbiased); the interval is for the
    squared MMD, which is not.
    """
    kid = _KID(np.asarray(samples, np.float64), np.asarray(reference, np.float64))
    estimate = kid()
    reps = np.array([kid(c) for c in _counts(kid.k_ss.shape[0], n_boot, seed)])
    return _centred_bootstrap(estimate, reps, level, 0.0,
                            f"{level:.0%} bootstrap over {kid.k_ss.shape[0]} samples ({n_boot} draws)")


def bootstrap_fid_difference(samples_a, samples_b, reference, n_boot: int = 1000, level: float = 0.95,
                             seed: int = 0, device: str = "cpu") -> Interval:
    """FID(a) - FID(b) against one reference, with a bootstrap interval over both sample sets.

    For two sampler settings of the *same* trained model (one seed): each draw resamples a's and
    b's samples independently (they were drawn independently), the reference fixed as in
    :func:`bootstrap_fid`. The interval says whether the difference is larger than the samples'
    own noise for this one model; whether it holds across trained models is the paired test's
    question (:func:`paired`). Unbounded: a difference may have either sign.
    """
    fid = _FID(reference, device)
    a, b = _float64(samples_a, device), _float64(samples_b, device)
    estimate = fid(a) - fid(b)
    reps = (fid.batch(a, _float64(_counts(a.shape[0], n_boot, seed), device))
            - fid.batch(b, _float64(_counts(b.shape[0], n_boot, seed + 1), device)))
    return _centred_bootstrap(estimate, reps, level, -math.inf,
                              f"{level:.0%} bootstrap over {a.shape[0]} and {b.shape[0]} samples ({n_boot} draws)")
