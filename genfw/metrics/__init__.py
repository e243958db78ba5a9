"""Evaluation metrics for ``genfw eval``: fidelity, reconstruction, likelihood and speed.

One job per module; this package re-exports their public names (``from genfw import metrics``
registers ``genfw-classifier`` with torch-fidelity):

* :mod:`~genfw.metrics.fidelity_scores` — :func:`fidelity`: FID (Heusel et al. 2017), KID
  (Binkowski et al. 2018), precision/recall (Kynkaanniemi et al. 2019) and, for Inception only,
  the Inception score, all computed by torch-fidelity on one set of features per image;
  :mod:`~genfw.metrics.prdc` — density and coverage (Naeem et al. 2020, eqs. 10b/10d of the
  Unleashing Transformers paper) on the same features, implemented here.
* :mod:`~genfw.metrics.features` — the feature extractors: :class:`Classifier` registered with
  torch-fidelity as ``genfw-classifier``, or torch-fidelity's ``inception-v3-compat`` with
  weights from a local file or the torch hub cache — never downloaded (:func:`inception_weights`).
  :func:`choose_extractor` resolves ``auto``.
* :mod:`~genfw.metrics.classifier` — :class:`Classifier`, a small CNN genfw trains on the
  recipe's labelled images (:func:`train_classifier`); :func:`classifier_accuracy` measures that
  samples are of the requested class.
* :mod:`~genfw.metrics.tokenizer` — :func:`reconstruction`: tokenizer MSE, PSNR (:func:`psnr`)
  and codebook usage/perplexity.
* :mod:`~genfw.metrics.likelihood` — :func:`prior_nll`: held-out negative log-likelihood in bits
  per token, with its kind (exact, bound, estimate; SUNDAE's denoising loss is named as not a
  likelihood).
* :mod:`~genfw.metrics.cost` — :func:`timed`: wall time of a call, synchronising CUDA, for
  sampling time per image; :func:`training_step_flops` — FLOPs of one training step.
* :mod:`~genfw.metrics.base` — what they share: :func:`to_uint8`, eval mode.

Images are float tensors ``[N, C, H, W]`` in [-1, 1]; for the feature extractors they are
quantised to uint8 as a PNG would store them. See docs/evaluation.md.
"""

from genfw.metrics.base import to_uint8
from genfw.metrics.classifier import (
    SMALL_IMAGE_MAX,
    Classifier,
    ClassifierParams,
    classifier_accuracy,
    classifier_logits,
    classifier_report,
    classify,
    expected_calibration_error,
    fingerprint,
    load_classifier,
    mcnemar_p,
    save_classifier,
    train_classifier,
)
from genfw.metrics.cost import timed, training_step_flops
from genfw.metrics.features import (
    CLASSIFIER_EXTRACTOR,
    EXTRACTOR_CHOICES,
    INCEPTION_EXTRACTOR,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    ClassifierFeatureExtractor,
    FeatureExtractor,
    _UInt8Images,
    choose_extractor,
    find_inception_weights,
    inception_cache_path,
    inception_weights,
    register_classifier_extractor,
    split_features,
)
from genfw.metrics.fidelity_scores import fidelity, fidelity_from_features
from genfw.metrics.likelihood import NLL_KIND_LABELS, nll_value_key, prior_nll
from genfw.metrics.prdc import density_coverage
from genfw.metrics.tokenizer import PSNR_MAX_DB, psnr, reconstruction

__all__ = [
    "CLASSIFIER_EXTRACTOR", "EXTRACTOR_CHOICES", "INCEPTION_EXTRACTOR", "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL", "NLL_KIND_LABELS", "PSNR_MAX_DB", "SMALL_IMAGE_MAX", "Classifier",
    "ClassifierFeatureExtractor", "ClassifierParams", "FeatureExtractor", "_UInt8Images", "choose_extractor",
    "classifier_accuracy", "classifier_logits", "classifier_report", "classify", "density_coverage",
    "expected_calibration_error", "fidelity", "fidelity_from_features", "find_inception_weights", "fingerprint",
    "inception_cache_path", "inception_weights", "load_classifier", "mcnemar_p", "nll_value_key", "prior_nll",
    "psnr", "reconstruction", "register_classifier_extractor", "save_classifier", "split_features", "timed",
    "to_uint8", "train_classifier", "training_step_flops",
]
