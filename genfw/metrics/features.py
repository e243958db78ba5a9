"""Image features for the fidelity metrics: torch-fidelity's extractors, with weights kept local.

Two extractors: genfw's :class:`~genfw.metrics.classifier.Classifier`, registered with
torch-fidelity as ``genfw-classifier`` (:class:`ClassifierFeatureExtractor`, on import), and
torch-fidelity's ``inception-v3-compat`` with weights from a local file or the torch hub cache —
never downloaded (:func:`inception_weights`), and checked to load without running code.
:func:`choose_extractor` resolves ``auto``; :class:`FeatureExtractor` builds one once and maps
uint8-quantised images to features, split over the ranks under ``torchrun``
(:func:`split_features`). The metrics computed from the features are in
:mod:`genfw.metrics.fidelity_scores`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from genfw import dist
from genfw.errors import ConfigError
from genfw.metrics.base import to_uint8
from genfw.metrics.classifier import SMALL_IMAGE_MAX, Classifier, fingerprint, load_classifier

CLASSIFIER_EXTRACTOR = "genfw-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
EXTRACTOR_CHOICES = ("auto", "classifier", INCEPTION_EXTRACTOR)
#: torch-fidelity's Inception weights: where they come from and the file name its cache uses.
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]


class _UInt8Images(torch.utils.data.Dataset):
    """A torch Dataset of uint8 images, as torch-fidelity's feature extraction expects."""

    def __init__(self, images: torch.Tensor, channels: int | None = None) -> None:
        self.images, self.channels = images, channels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        image = to_uint8(self.images[i].cpu())
        if self.channels is not None and image.shape[0] != self.channels:
            image = image.expand(self.channels, -1, -1)  # greyscale -> RGB for Inception
        return image


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """The :class:`Classifier` as a torch-fidelity feature extractor (``genfw-classifier``).

    Takes uint8 images [B, C, H, W]; provides ``features`` (used for FID, KID, PRC) and
    ``logits``. Built by torch-fidelity with either ``genfw_classifier=<Classifier>`` or
    ``feature_extractor_weights_path=<file from save_classifier>``, so
    ``torch_fidelity.calculate_metrics(feature_extractor="genfw-classifier", ...)`` works too.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 genfw_classifier: Classifier | None = None, **kwargs: Any) -> None:
        super().__init__(name, features_list)
        if genfw_classifier is not None:
            self.model = copy.deepcopy(genfw_classifier)  # torch-fidelity moves it; leave the caller's alone
        elif feature_extractor_weights_path is not None:
            self.model = load_classifier(feature_extractor_weights_path)
        else:
            raise ConfigError(f"feature extractor {name} needs genfw_classifier= "
                              "or feature_extractor_weights_path=")
        self.model.requires_grad_(False)
        self.model.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        features, logits = self.model(x.float() / 127.5 - 1)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


def register_classifier_extractor() -> None:
    """Register :class:`ClassifierFeatureExtractor` with torch-fidelity (idempotent)."""
    if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)


register_classifier_extractor()


# --------------------------------------------------------------------------------------------
# Inception weights (never downloaded) and the choice of extractor


def inception_cache_path() -> Path:
    """Where torch hub (hence torch-fidelity) caches the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def find_inception_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The Inception weights file: ``path`` if given (it must exist), else the hub cache, else None."""
    if path is not None:
        p = Path(os.path.expanduser(os.fspath(path)))
        if not p.is_file():
            raise ConfigError(f"evaluate.inception_weights: file not found: {p}")
        return p
    cached = inception_cache_path()
    return cached if cached.is_file() else None


def inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Like :func:`find_inception_weights` but a missing file is a ``ConfigError`` saying what to do."""
    found = find_inception_weights(path)
    if found is None:
        raise ConfigError(
            f"Inception weights not found (genfw never downloads them): download {INCEPTION_WEIGHTS_URL} "
            f"to {inception_cache_path()} or set evaluate.inception_weights to its path, "
            "or use evaluate.feature_extractor: classifier"
        )
    return found


def choose_extractor(requested: str, *, has_labels: bool, resolution: int | tuple[int, int],
                     inception_weights_path: str | os.PathLike | None = None) -> str:
    """Resolve ``auto`` | ``classifier`` | ``inception-v3-compat`` to ``classifier`` or Inception.

    ``auto`` picks the classifier when the data has labels and the images are small (<= 64 px)
    or no Inception weights are found; Inception otherwise.
    """
    if requested not in EXTRACTOR_CHOICES:
        raise ConfigError(f"evaluate.feature_extractor: unknown '{requested}'; "
                          f"choose one of {', '.join(EXTRACTOR_CHOICES)}")
    if requested == "classifier":
        if not has_labels:
            raise ConfigError("evaluate.feature_extractor: classifier needs a dataset with labels; "
                              "use inception-v3-compat with local weights instead")
        return "classifier"
    if requested == INCEPTION_EXTRACTOR:
        inception_weights(inception_weights_path)
        return INCEPTION_EXTRACTOR
    found = find_inception_weights(inception_weights_path)
    small = max((resolution, resolution) if isinstance(resolution, int) else resolution) <= SMALL_IMAGE_MAX
    if has_labels and (small or found is None):
        return "classifier"
    if found is not None:
        return INCEPTION_EXTRACTOR
    inception_weights(None)  # raises with instructions
    raise AssertionError("unreachable")


def _check_loadable_without_pickle(path: Path) -> None:
    # torch-fidelity loads the file with weights_only=False; loading it first with the
    # restricted unpickler rejects a file that would run code, and reports a corrupt one clearly.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not plain weights
        raise ConfigError(f"Inception weights {path} are not a plain PyTorch state dict "
                          f"({type(e).__name__}); download {INCEPTION_WEIGHTS_URL} again") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ConfigError(f"{path} does not hold torch-fidelity's Inception weights "
                          f"(expected {INCEPTION_WEIGHTS_FILE})")


# --------------------------------------------------------------------------------------------
# extracting features


def _feature_extractor(extractor: Classifier | str, cuda: bool, weights_path: str | os.PathLike | None):
    """(torch-fidelity extractor, feature layer, IS layer or None, channels to expand to, description)."""
    if isinstance(extractor, Classifier):
        fe = create_feature_extractor(CLASSIFIER_EXTRACTOR, ["features"], cuda=cuda,
                                      genfw_classifier=extractor, verbose=False)
        described = {"feature_extractor": CLASSIFIER_EXTRACTOR, "feature_extractor_id": fingerprint(extractor)}
        return fe, "features", None, None, described
    if extractor == INCEPTION_EXTRACTOR:
        weights = inception_weights(weights_path)
        _check_loadable_without_pickle(weights)
        fe = create_feature_extractor(INCEPTION_EXTRACTOR, ["2048", "logits_unbiased"], cuda=cuda,
                                      feature_extractor_weights_path=str(weights), verbose=False)
        described = {"feature_extractor": INCEPTION_EXTRACTOR, "feature_extractor_id": weights.name}
        return fe, "2048", "logits_unbiased", 3, described
    raise ConfigError(f"unknown feature extractor {extractor!r}: pass a trained Classifier or "
                      f"'{INCEPTION_EXTRACTOR}'")


class FeatureExtractor:
    """A feature extractor built once for several image sets (Inception's weights load once).

    ``extractor(images)`` maps images [N, C, H, W] in [-1, 1] to ``{"features": [N, D]}`` (plus
    ``"isc_logits"`` with Inception), computed on uint8-quantised images; ``described`` says
    which extractor it is, for ``metrics.json``.
    """

    def __init__(self, extractor: Classifier | str, *, batch_size: int = 64, device: str | torch.device = "cpu",
                 inception_weights_path: str | os.PathLike | None = None) -> None:
        self.device, self.batch_size = torch.device(device), batch_size
        self.cuda = self.device.type == "cuda"
        with self._on_device():
            self._fe, self._layer, self._isc_layer, self._channels, described = _feature_extractor(
                extractor, self.cuda, inception_weights_path)
        self.described = described | {"batch_size": batch_size}

    def _on_device(self) -> contextlib.AbstractContextManager:
        # torch-fidelity moves its work to "the" GPU: make that the one asked for.
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The features of ``images``; under ``torchrun`` every rank must call it: each extracts a
        share, rank 0 receives them all (in order), the other ranks get None."""
        return split_features(images, self._extract)

    def _extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._on_device():
            # save_cpu_ram=True: no DataLoader worker processes (the data is already in memory).
            got = get_featuresdict_from_dataset(_UInt8Images(images.detach().cpu(), self._channels), self._fe,
                                                self.batch_size, self.cuda, save_cpu_ram=True, verbose=False)
        out = {"features": got[self._layer].float()}
        if self._isc_layer is not None:
            out["isc_logits"] = got[self._isc_layer]
        return out


def split_features(images: torch.Tensor, extract: Callable[[torch.Tensor], dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor] | None:
    """``extract(images)``; under ``torchrun`` each rank extracts a contiguous share and rank 0
    receives them all, in order (the other ranks get None). Every rank must call it."""
    if not dist.is_initialized():
        return extract(images)
    n, world = images.shape[0], dist.world_size()
    a, b = n * dist.rank() // world, n * (dist.rank() + 1) // world
    mine = {k: v.cpu() for k, v in extract(images[a:b]).items()} if b > a else None
    parts = dist.gather([mine])
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

