"""genfw.stats against SciPy on fixed data: paired and unpaired tests, Holm, intervals that stay in range."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from genfw import stats

A = [3.1, 2.4, 4.0, 3.3, 2.9, 3.8]
B = [2.7, 2.5, 3.1, 2.6, 2.8, 3.0]


def test_student_t_and_welch_match_scipy():
    for q, df in ((0.975, 1), (0.975, 2.5), (0.9, 7), (0.025, 30)):
        assert stats.t_ppf(q, df) == pytest.approx(sps.t.ppf(q, df), rel=1e-8)
        assert stats.t_cdf(stats.t_ppf(q, df), df) == pytest.approx(q, rel=1e-9)
    w = stats.welch(A, B[:4])
    ref = sps.ttest_ind(A, B[:4], equal_var=False)
    assert (w.t, w.p) == (pytest.approx(ref.statistic, rel=1e-9), pytest.approx(ref.pvalue, rel=1e-7))


def test_paired_t_and_exact_sign_flip_match_scipy():
    p = stats.paired(A, B)
    ref = sps.ttest_rel(A, B)
    assert p.t == pytest.approx(ref.statistic, rel=1e-9) and p.p_t == pytest.approx(ref.pvalue, rel=1e-7)
    assert p.df == len(A) - 1 and p.difference == pytest.approx(np.mean(np.subtract(A, B)))
    perm = sps.permutation_test((A, B), lambda x, y: np.mean(x - y), permutation_type="samples",
                                n_resamples=np.inf, vectorized=False)
    assert p.p_sign_flip == pytest.approx(perm.pvalue, rel=1e-12)
    assert p.p == max(p.p_t, p.p_sign_flip)
    # a paired design seen as paired: the seed effect cancels, Welch on the same numbers cannot see it
    base = [10.0, 14.0, 8.0, 12.0, 16.0, 9.0]
    better = [b - 1.0 - 0.05 * i for i, b in enumerate(base)]
    assert stats.paired(base, better).p_t < 1e-4 and stats.welch(base, better).p > 0.4
    # exact: two pairs can never give p below 0.5, six at best 1/32
    assert stats.sign_flip([2.0, 3.0], [1.0, 1.0]) == 0.5
    assert stats.sign_flip(base, better) == pytest.approx(1 / 32)
    with pytest.raises(ValueError, match="pairs"):
        stats.paired([1.0, 2.0], [1.0])


def test_holm_matches_the_step_down_rule():
    pv = [0.01, 0.04, 0.03, 0.005]
    # by hand: sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> monotone 0.06
    assert stats.holm_adjusted(pv) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm(pv) == [p <= 0.05 for p in stats.holm_adjusted(pv)] == [True, False, False, True]
    # the case: p = 0.0498 alone is below 0.05, not after Holm over the claim's 3 tests
    assert stats.holm([0.0498, 0.83, 0.4]) == [False, False, False]


def test_wilson_interval_matches_scipy_and_stays_in_range():
    for k, n in ((0, 10), (10, 10), (161, 200), (1, 3)):
        iv = stats.wilson(k, n)
        ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (iv.low, iv.high) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))
        assert 0.0 <= iv.low <= iv.estimate <= iv.high <= 1.0
    assert stats.normal_ppf(0.975) == pytest.approx(sps.norm.ppf(0.975), rel=1e-10)


def test_t_interval_needs_three_seeds_and_is_clipped_to_the_range():
    assert stats.t_interval([0.85, 0.75]) is None  # N = 2: per-seed values, no t-interval
    iv = stats.t_interval([0.99, 0.7, 0.98], bounds=(0.0, 1.0))
    s = stats.summarize([0.99, 0.7, 0.98])
    assert s.mean + s.half_width > 1.0 and iv.high == 1.0  # the raw interval would pass 1
    assert iv.low == pytest.approx(s.mean - s.half_width)
    fid = stats.t_interval([1.0, 9.0, 2.0], bounds=(0.0, math.inf))
    assert fid.low == 0.0 and fid.high > 9.0


def _features(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, d))


def test_fid_and_kid_from_features_match_scipy_and_torch_fidelity():
    import torch
    from scipy import linalg
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = _features(60, 8, 0.3, 0), _features(60, 8, 0.0, 1)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    by_hand = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert stats.fid_from_features(x, y) == pytest.approx(by_hand, rel=1e-8)
    tf = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(x)),
                                  fid_features_to_statistics(torch.from_numpy(y)), False)["frechet_inception_distance"]
    assert stats.fid_from_features(x, y) == pytest.approx(tf, rel=1e-6)
    kid = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=1, kid_subset_size=60,
                                 verbose=False)["kernel_inception_distance_mean"]
    assert stats._KID(x, y)() == pytest.approx(kid, rel=1e-9)
    # a replicate's counts give what the materialised resample gives (for KID: without self-pairs)
    idx = np.random.default_rng(5).integers(0, 60, size=60)
    counts = np.bincount(idx, minlength=60).astype(float)
    assert stats.fid_from_features(x, y, counts) == pytest.approx(stats.fid_from_features(x[idx], y), rel=1e-9)
    # fewer samples than dimensions (the other branch), and a batch of draws at once
    few, wide = _features(12, 30, 0.2, 7), _features(40, 30, 0.0, 8)
    s1, s2 = np.cov(few, rowvar=False), np.cov(wide, rowvar=False)
    by_hand = ((few.mean(0) - wide.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert stats.fid_from_features(few, wide) == pytest.approx(by_hand, rel=1e-6)
    draws = stats._counts(12, 3, 1)
    batch = stats._FID(wide).batch(torch.from_numpy(few), torch.from_numpy(draws))
    singly = [stats.fid_from_features(few[np.repeat(np.arange(12), c.astype(int))], wide) for c in draws]
    assert batch == pytest.approx(singly, rel=1e-8)


def test_bootstrap_intervals_contain_the_estimate_and_never_go_below_zero():
    ref = _features(80, 6, 0.0, 2)
    same = _features(80, 6, 0.0, 3)  # a perfect model: FID near its finite-sample floor
    for fn in (stats.bootstrap_fid, stats.bootstrap_kid):
        iv = fn(same, ref, n_boot=200, seed=0)
        assert iv.low >= 0.0 and iv.high > iv.low and iv.low <= max(iv.estimate, 0.0) <= iv.high
        assert fn(same, ref, n_boot=200, seed=0) == iv  # deterministic for a seed
    far = stats.bootstrap_fid(_features(80, 6, 1.0, 4), ref, n_boot=200)
    assert far.low > stats.bootstrap_fid(same, ref, n_boot=200).high  # a shifted model is told apart
    # where FID's finite-sample bias is large (few samples, many dimensions) every replicate lies far
    # above the estimate; the interval still holds it
    wide = stats.bootstrap_fid(_features(60, 40, 0.0, 5), _features(60, 40, 0.0, 6), n_boot=200)
    reps = [stats.fid_from_features(_features(60, 40, 0.0, 5), _features(60, 40, 0.0, 6), c)
            for c in stats._counts(60, 20, 0)]
    assert min(reps) > wide.estimate and wide.low <= wide.estimate <= wide.high


def test_bootstrap_fid_difference_tells_a_worse_sampler_from_sample_noise():
    ref = _features(80, 6, 0.0, 2)
    good, also_good, shifted = _features(80, 6, 0.0, 3), _features(80, 6, 0.0, 7), _features(80, 6, 0.8, 4)
    worse = stats.bootstrap_fid_difference(shifted, good, ref, n_boot=200)
    assert worse.estimate == pytest.approx(stats.fid_from_features(shifted, ref) - stats.fid_from_features(good, ref))
    assert worse.low > 0 and worse.low <= worse.estimate <= worse.high  # a shifted model is worse, beyond noise
    flipped = stats.bootstrap_fid_difference(good, shifted, ref, n_boot=200)
    assert flipped.high < 0  # differences keep their sign: no clipping at 0
    tie = stats.bootstrap_fid_difference(good, also_good, ref, n_boot=200)
    assert tie.low < 0 < tie.high  # two samples of one distribution: no difference claimed
    assert stats.bootstrap_fid_difference(good, also_good, ref, n_boot=200) == tie  # deterministic
