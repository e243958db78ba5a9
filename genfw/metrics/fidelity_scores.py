"""Fidelity of samples against reference images, from one set of features per image.

FID (Heusel et al. 2017), KID (Binkowski et al. 2018), precision/recall (Kynkaanniemi et al.
2019) and, for Inception only, the Inception score, all computed by torch-fidelity; density and
coverage (Naeem et al. 2020, eqs. 10b/10d of the Unleashing Transformers paper) from
:mod:`genfw.metrics.prdc`. The features come from :mod:`genfw.metrics.features`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from genfw import dist
from genfw.errors import ConfigError
from genfw.metrics.classifier import Classifier
from genfw.metrics.features import FeatureExtractor
from genfw.metrics.prdc import density_coverage


def fidelity(
    samples: torch.Tensor,
    reference: torch.Tensor,
    extractor: Classifier | str,
    *,
    batch_size: int = 64,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    prdc_k: int = 5,
    device: str | torch.device = "cpu",
    inception_weights_path: str | os.PathLike | None = None,
    seed: int = 2020,
    features_out: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """FID, KID, precision/recall, density/coverage (and IS with Inception) of samples vs reference.

    ``samples``/``reference``: [N, C, H, W] in [-1, 1]. ``extractor``: a trained
    :class:`Classifier`, or ``"inception-v3-compat"`` (weights from ``inception_weights_path``
    or the hub cache; never downloaded). Precision/recall and density/coverage use ``prdc_k``
    neighbours; KID uses ``kid_subsets`` subsets of ``kid_subset_size`` (default
    min(1000, N, M)). Returns the metrics with the counts and settings that produced them;
    ``features_out``, when given, receives the features (``samples`` [N, D], ``reference`` [M, D]).
    """
    n, m = samples.shape[0], reference.shape[0]
    _check_counts(n, m, prdc_k)
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape[1:])} and reference "
                         f"{tuple(reference.shape[1:])} differ in shape")
    fe = FeatureExtractor(extractor, batch_size=batch_size, device=device,
                          inception_weights_path=inception_weights_path)
    fake, real = fe(samples), fe(reference)
    if features_out is not None and fake is not None:  # (under torchrun: rank 0's, which holds them all)
        features_out |= {"samples": fake["features"], "reference": real["features"]}
    result = fidelity_from_features(fake, real, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                                    prdc_k=prdc_k, seed=seed)
    return result | fe.described


def _check_counts(n: int, m: int, prdc_k: int) -> None:
    if min(n, m) <= prdc_k:
        raise ConfigError(f"fidelity metrics with k={prdc_k} neighbours need more than {prdc_k} samples and "
                          f"reference images (got {n} and {m}): raise evaluate.n_samples")


def fidelity_from_features(
    fake: dict[str, torch.Tensor],
    real: dict[str, torch.Tensor],
    *,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    prdc_k: int = 5,
    seed: int = 2020,
) -> dict[str, Any]:
    """:func:`fidelity` on features a :class:`FeatureExtractor` computed (samples, reference).

    Under ``torchrun`` every rank calls it: rank 0, which holds the gathered features, computes
    and every rank gets the result (the others pass the None their extractor returned)."""
    if dist.is_initialized():
        result = _fidelity_from_features(fake, real, kid_subset_size, kid_subsets, prdc_k, seed) \
            if dist.is_main() else None
        return dist.broadcast(result)
    return _fidelity_from_features(fake, real, kid_subset_size, kid_subsets, prdc_k, seed)


def _fidelity_from_features(fake: dict[str, torch.Tensor], real: dict[str, torch.Tensor],
                            kid_subset_size: int | None, kid_subsets: int, prdc_k: int, seed: int) -> dict[str, Any]:
    f_fake, f_real = fake["features"].float(), real["features"].float()
    n, m = f_fake.shape[0], f_real.shape[0]
    _check_counts(n, m, prdc_k)
    info: dict[str, Any] = {"num_samples": n, "num_reference": m, "prdc_k": prdc_k,
                            "feature_dim": int(f_fake.shape[1])}

    out: dict[str, Any] = {}
    stats_fake, stats_real = fid_features_to_statistics(f_fake), fid_features_to_statistics(f_real)
    out["fid"] = fid_statistics_to_metric(stats_fake, stats_real, False)[torch_fidelity.KEY_METRIC_FID]
    subset = kid_subset_size or min(1000, n, m)
    # A subset as large as both sets is the whole set every time: one subset says all there is,
    # and a standard deviation over identical subsets (0) would mean nothing, so none is reported.
    whole = subset >= n and subset >= m
    subsets = 1 if whole else kid_subsets
    # float64: the cubic kernel of large float32 features loses KID to cancellation (we saw -6.7)
    kid = kid_features_to_metric(f_fake.double(), f_real.double(), kid_subsets=subsets,
                                 kid_subset_size=subset, rng_seed=seed, verbose=False)
    out["kid"] = kid[torch_fidelity.KEY_METRIC_KID_MEAN]
    if not whole:
        out["kid_std"] = kid[torch_fidelity.KEY_METRIC_KID_STD]
    info |= {"kid_subsets": subsets, "kid_subset_size": subset}
    prc = prc_features_to_metric(f_fake, f_real, prc_neighborhood=prdc_k, save_cpu_ram=True, verbose=False)
    out["precision"] = prc[torch_fidelity.KEY_METRIC_PRECISION]
    out["recall"] = prc[torch_fidelity.KEY_METRIC_RECALL]
    out |= density_coverage(f_real, f_fake, k=prdc_k)
    if "isc_logits" in fake:
        isc = isc_features_to_metric(fake["isc_logits"], splits=min(10, n), shuffle=True, rng_seed=seed)
        out["inception_score"] = isc[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["inception_score_std"] = isc[torch_fidelity.KEY_METRIC_ISC_STD]
    return {k: float(v) for k, v in out.items()} | info
