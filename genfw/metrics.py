"""Evaluation metrics for ``genfw eval``: fidelity, reconstruction, likelihood and speed.

* :func:`fidelity` — FID (Heusel et al. 2017), KID (Binkowski et al. 2018), precision/recall
  (Kynkaanniemi et al. 2019) and, for Inception only, the Inception score, all computed by
  torch-fidelity on one set of features per image; density and coverage (Naeem et al. 2020,
  eqs. 10b/10d of the Unleashing Transformers paper) on the same features, implemented here.
* Feature extractors: :class:`Classifier`, a small CNN genfw trains on the recipe's labelled
  images (:func:`train_classifier`) and registers with torch-fidelity as ``genfw-classifier``,
  or torch-fidelity's ``inception-v3-compat`` with weights from a local file or the torch hub
  cache — never downloaded (:func:`inception_weights`). :func:`choose_extractor` resolves
  ``auto``. :func:`classifier_accuracy` measures that samples are of the requested class.
* :func:`reconstruction` — tokenizer MSE, PSNR (:func:`psnr`) and codebook usage/perplexity.
* :func:`prior_nll` — held-out negative log-likelihood in bits per token, with its kind
  (exact, bound, estimate; SUNDAE's denoising loss is named as not a likelihood).
* :func:`timed` — wall time of a call, synchronising CUDA, for sampling time per image;
  :func:`training_step_flops` — FLOPs of one training step, for training cost.

Images are float tensors ``[N, C, H, W]`` in [-1, 1]; for the feature extractors they are
quantised to uint8 as a PNG would store them. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_fidelity
from einops import rearrange
from pydantic import Field
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from genfw import checkpoint, dist
from genfw.errors import CheckpointError, ConfigError, DataError
from genfw.interfaces import Params, Prior, Tokenizer

CLASSIFIER_EXTRACTOR = "genfw-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
EXTRACTOR_CHOICES = ("auto", "classifier", INCEPTION_EXTRACTOR)
#: torch-fidelity's Inception weights: where they come from and the file name its cache uses.
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
#: ``auto`` prefers the classifier up to this image size: Inception at 299 px sees digits as blobs.
SMALL_IMAGE_MAX = 64
PSNR_MAX_DB = 100.0  # identical images would give +inf, which JSON cannot hold


# --------------------------------------------------------------------------------------------
# image helpers


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, C, H, W], rounded as a saved PNG would be."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# the classifier feature extractor


class ClassifierParams(Params):
    """Shape of the classifier; stored in its safetensors metadata."""

    channels: int = Field(ge=1, le=4, description="image channels")
    num_classes: int = Field(ge=2, description="label classes")
    input_size: tuple[int, int] = Field(description="images are resized to this [H, W] first")
    width: int = Field(16, ge=4, le=512, description="channels of the first conv (x2, x4 after)")
    feature_dim: int = Field(128, ge=8, le=4096, description="size of the penultimate features")
    # convnet and lenet are the two evaluation classifiers; strided is the network of older genfw
    # versions, the default so that classifier files saved before ``arch`` existed still load
    arch: Literal["convnet", "lenet", "strided"] = Field(
        "strided", description="network: convnet (batch norm), lenet (5x5 convs, max pooling), strided (old files)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the features before the class head")


def _classifier_body(p: ClassifierParams) -> nn.Sequential:
    """Convolutions -> [B, C', 4, 4]: the part that differs between architectures."""
    w = p.width
    if p.arch == "convnet":
        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        return nn.Sequential(*block(p.channels, w), *block(w, w), nn.MaxPool2d(2),  # H/2
                             *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # H/4
                             *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4))
    if p.arch == "lenet":
        return nn.Sequential(nn.Conv2d(p.channels, w, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2),
                             nn.Conv2d(w, 2 * w, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2),
                             nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.Tanh(), nn.AdaptiveMaxPool2d(4))
    return nn.Sequential(
        nn.Conv2d(p.channels, w, 4, stride=2, padding=1), nn.SiLU(),  # H/2
        nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),  # H/4
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d(4),  # 4x4 keeps where strokes are, not just which
    )


class Classifier(nn.Module):
    """A small CNN: images [B, C, H, W] in [-1, 1] -> (features [B, D], logits [B, K]).

    The features (penultimate layer, scaled to unit RMS on the training images) play the role
    Inception's pool3 plays in FID; the logits give the class accuracy of samples. In eval mode
    nothing depends on the batch (batch norm uses its running statistics), so results do not
    depend on batch composition or size.
    """

    def __init__(self, params: ClassifierParams | dict) -> None:
        super().__init__()
        if not isinstance(params, ClassifierParams):
            params = ClassifierParams.model_validate(params)
        self.params = params
        p = self.params
        self.body = _classifier_body(p)
        # A smooth activation keeps every feature alive, so feature covariances stay full rank.
        self.features = nn.Sequential(nn.Linear(4 * p.width * 16, p.feature_dim), nn.SiLU())
        self.dropout = nn.Dropout(p.dropout)
        self.head = nn.Linear(p.feature_dim, p.num_classes)
        # Set after training so that features have unit RMS on the training images, the scale
        # KID's kernel (x.y/d + 1)^3 assumes; otherwise its cubic term swamps everything.
        self.register_buffer("feature_scale", torch.ones(()))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if tuple(x.shape[-2:]) != tuple(self.params.input_size):
            x = F.interpolate(x, size=tuple(self.params.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        h = rearrange(self.body(x), "b c h w -> b (c h w)")
        features = self.features(h)
        return features / self.feature_scale, self.head(self.dropout(features))


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` whole pixels, filling with its border."""
    b, _, h, w = images.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).float()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = shift[:, 0] * 2 / w  # whole pixels in normalised coordinates
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


def _random_affine(images: torch.Tensor, max_shift: int, generator: torch.Generator, *,
                   max_degrees: float = 10.0, max_scale: float = 0.1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels, rotate it by up to ``max_degrees`` and
    scale it by up to 1 +- ``max_scale`` (bilinear, filling with its border). With neither
    rotation nor scaling: :func:`_random_shift`, whole pixels as older genfw trained."""
    if max_degrees == 0 and max_scale == 0:
        return _random_shift(images, max_shift, generator)
    b, _, h, w = images.shape
    u = torch.rand(b, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(max_degrees)
    scale = 1 + u[:, 1] * max_scale
    theta = torch.zeros(b, 2, 3)
    # the grid maps output to input coordinates: the inverse of the transform applied
    theta[:, 0, 0] = theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    # sub-pixel shifts: with bilinear sampling they also blur a little (measured once on held-out
    # MNIST: 0.992 against 0.984 with whole-pixel shifts for the convnet, 4 against 8 errors of 500)
    theta[:, 0, 2] = u[:, 2] * max_shift * 2 / w  # pixels in normalised coordinates
    theta[:, 1, 2] = u[:, 3] * max_shift * 2 / h
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 1500,
    seed: int = 0,
    *,
    arch: str = "convnet",
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    feature_dim: int = 128,
    dropout: float = 0.3,
    max_degrees: float = 10.0,
    max_scale: float = 0.1,
    device: str | torch.device = "cpu",
) -> Classifier:
    """Train a :class:`Classifier` on labelled images [N, C, H, W] in [-1, 1] with Adam.

    Unlabelled items (label < 0) are skipped. Images larger than 64 px are seen at 64 px.
    Inputs are shifted by up to 1/16 of the image (2 px at 32 px), rotated by up to
    ``max_degrees`` and scaled by up to 1 +- ``max_scale``, so that slightly off-centre or tilted
    samples are still recognised. Deterministic for a given seed; the global RNG is left untouched.
    """
    keep = labels >= 0
    images, labels = images[keep], labels[keep].long()
    if images.shape[0] < 2 or labels.unique().numel() < 2:
        raise DataError("the classifier feature extractor needs labelled images of at least two classes")
    if int(labels.max()) >= num_classes:
        raise DataError(f"label {int(labels.max())} is out of range for {num_classes} classes")
    h, w = images.shape[-2:]
    scale = min(1.0, SMALL_IMAGE_MAX / max(h, w))
    input_size = (max(1, round(h * scale)), max(1, round(w * scale)))
    params = ClassifierParams(channels=images.shape[1], num_classes=num_classes, input_size=input_size,
                              width=width, feature_dim=feature_dim, arch=arch, dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(params).to(device)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        # Linear decay to zero: the last steps settle the weights instead of bouncing.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps))
        max_shift = max(1, round(max(input_size) / 16))
        model.train()
        from genfw.progress import progress_bar

        with progress_bar(f"classifier ({arch})", total=steps) as bar:
            for step in range(steps):
                idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=g)
                x = images[idx].to(device).float()
                x = _random_affine(x, max_shift, g, max_degrees=max_degrees, max_scale=max_scale)
                _, logits = model(x)
                loss = F.cross_entropy(logits, labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step % 10 == 9 or step == steps - 1:
                    bar.update(step + 1, loss=float(loss.detach()))
    model.eval()
    with torch.no_grad():
        sample = images[torch.randperm(images.shape[0], generator=g)[:1024]].to(device).float()
        features = torch.cat([model(chunk)[0] for chunk in sample.split(256)])
        model.feature_scale.copy_(features.pow(2).mean().sqrt().clamp_min(1e-6))
    return model


@torch.no_grad()
def classifier_logits(model: Classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class logits [N, K] of images [N, C, H, W] in [-1, 1], quantised to uint8 first."""
    device = _module_device(model)
    out = []
    with _eval_mode(model):
        for chunk in images.split(batch_size):
            x = to_uint8(chunk).to(device).float() / 127.5 - 1  # as the samples' PNGs would read
            out.append(model(x)[1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.params.num_classes)


def classify(model: Classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class [N] of images [N, C, H, W] in [-1, 1], quantised to uint8 first."""
    return classifier_logits(model, images, batch_size).argmax(-1)


def classifier_accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 256) -> float:
    """Fraction of images the classifier assigns to their label (e.g. the class samples were asked for)."""
    if images.shape[0] == 0:
        raise ValueError("classifier_accuracy needs at least one image")
    return float((classify(model, images, batch_size) == labels.cpu().long()).double().mean())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins of |accuracy - mean confidence|
    weighted by the fraction of images in the bin; 0 for a calibrated classifier."""
    if logits.shape[0] == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    confidence, predicted = logits.double().softmax(-1).max(-1)
    correct = (predicted == labels.cpu().long()).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence is always > 1/K > 0
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += float(inside.double().mean() * (correct[inside].mean() - confidence[inside].mean()).abs())
    return ece


def classifier_report(model: Classifier, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 256) -> dict[str, float]:
    """Accuracy and calibration (ECE, 15 bins) of a classifier on labelled real images."""
    logits = classifier_logits(model, images, batch_size)
    labels = labels.cpu().long()
    return {"accuracy": float((logits.argmax(-1) == labels).double().mean()),
            "ece": expected_calibration_error(logits, labels), "num_images": int(labels.numel())}


def mcnemar_p(a_correct: torch.Tensor, b_correct: torch.Tensor) -> float:
    """Two-sided exact McNemar p-value that two classifiers judging the same images are equally
    accurate: a binomial test on the images exactly one of them gets right."""
    a, b = a_correct.bool(), b_correct.bool()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(only_a, only_b) + 1)) / 2**m
    return min(1.0, 2 * tail)


def save_classifier(model: Classifier, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save the classifier as safetensors (no pickle); ``extra`` is stored in the metadata."""
    tensors = {k: v for k, v in model.state_dict().items()}
    meta = {"type": "classifier", "classifier": model.params.model_dump(mode="json"), "extra": extra or {}}
    checkpoint.save_tensors(path, tensors, meta)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> Classifier:
    """Load a classifier written by :func:`save_classifier`."""
    tensors, meta = checkpoint.read(path)
    if meta.get("type") != "classifier" or not isinstance(meta.get("classifier"), dict):
        raise CheckpointError(f"{os.fspath(path)} holds genfw data of type '{meta.get('type')}', "
                              "not a classifier")
    try:
        model = Classifier(ClassifierParams.model_validate(meta["classifier"]))
        model.load_state_dict(tensors, strict=True)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{os.fspath(path)}: classifier does not match its metadata: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: classifier-based FIDs compare only with equal fingerprints."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


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
# density and coverage (Naeem et al. 2020)


def _kth_neighbour_distance(x: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    out = [torch.cdist(part, x).kthvalue(k + 1, dim=1).values for part in x.split(chunk)]  # +1: itself
    return torch.cat(out)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5,
                     chunk: int = 4096) -> dict[str, float]:
    """Density and coverage of fake features [M, D] against real features [N, D].

    With r_i the distance from real X_i to its k-th nearest other real point:
    density = 1/(kM) sum_j sum_i 1[|Y_j - X_i| < r_i]; coverage = 1/N sum_i 1[min_j |Y_j - X_i| < r_i].
    Strict inequalities as in Naeem et al.'s reference code: identical sets give exactly 1 and 1.
    """
    real, fake = real.double(), fake.double()
    if real.shape[0] <= k:
        raise ConfigError(f"density/coverage with k={k} need more than {k} reference images, "
                          f"got {real.shape[0]}")
    radii = _kth_neighbour_distance(real, k, chunk)  # [N]
    inside = torch.zeros(fake.shape[0], dtype=torch.float64)  # per fake: how many real balls hold it
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for start in range(0, real.shape[0], chunk):
        d = torch.cdist(real[start : start + chunk], fake)  # [n, M]
        hit = d < radii[start : start + chunk, None]
        inside += hit.sum(0)
        covered[start : start + chunk] = hit.any(1)
    return {"density": float(inside.sum() / (k * fake.shape[0])), "coverage": float(covered.double().mean())}


# --------------------------------------------------------------------------------------------
# fidelity


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


# --------------------------------------------------------------------------------------------
# tokenizers: reconstruction and codebook usage


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images [B, C, H, W] in [-1, 1] (peak-to-peak 2), capped at 100 dB.

    Equal to the usual PSNR of the same images scaled to [0, 1] (or [0, 255] with peak 255).
    """
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    peak = 2.0
    return (10 * torch.log10(peak**2 / mse)).clamp(max=PSNR_MAX_DB)


def _images_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["images"]
    return batch[0]  # (images, labels) as a DataLoader over an ImageDataset yields


@torch.no_grad()
def reconstruction(tokenizer: Tokenizer, images: Iterable[Any],
                   device: str | torch.device | None = None) -> dict[str, float]:
    """Reconstruction MSE and PSNR of a tokenizer, and its codebook usage/perplexity per level.

    ``images`` yields batches: tensors [B, C, H, W] in [-1, 1], or ``(images, labels)``.
    ``mse`` is over all pixels on the [-1, 1] scale; ``psnr`` the mean per-image PSNR
    (:func:`psnr`); ``level{i}/usage`` and ``level{i}/perplexity`` come from
    ``Tokenizer.codebook_stats`` over the codes of every image.
    """
    device = torch.device(device) if device is not None else _module_device(tokenizer)
    sq_err, pixels, psnrs = 0.0, 0, []
    codes_per_level: list[list[torch.Tensor]] = []
    with _eval_mode(tokenizer):
        for batch in images:
            x = _images_of(batch).to(device).float()
            codes = tokenizer.encode(x)
            recon = tokenizer.decode(codes).float().clamp(-1, 1)
            sq_err += float((recon - x).pow(2).sum())
            pixels += x.numel()
            psnrs.append(psnr(recon, x).cpu())
            if not codes_per_level:
                codes_per_level = [[] for _ in codes]
            for store, c in zip(codes_per_level, codes, strict=True):
                store.append(c.to("cpu", torch.int32))
    if not pixels:
        raise DataError("reconstruction metrics need at least one image")
    all_codes = [torch.cat(store).long() for store in codes_per_level]
    out = {"mse": sq_err / pixels, "psnr": float(torch.cat(psnrs).mean()),
           "num_images": float(sum(p.shape[0] for p in psnrs))}
    out |= tokenizer.codebook_stats(all_codes)
    return out


# --------------------------------------------------------------------------------------------
# priors: held-out likelihood


#: What each likelihood kind means, as reports and comparison tables say it.
NLL_KIND_LABELS = {
    "exact": "exact NLL",
    "bound": "NLL upper bound (ELBO, Monte Carlo)",
    "estimate": "NLL estimate (quadrature of the ELBO; error column)",
    "not_likelihood": "denoising cross-entropy (not a likelihood)",
}


def nll_value_key(kind: str) -> str:
    """The metrics key of a prior's held-out value of this kind: only likelihoods are ``nll_*``."""
    return "denoising_ce_bits_per_token" if kind == "not_likelihood" else "nll_bits_per_token"


@torch.no_grad()
def prior_nll(prior: Prior, batches: Iterable[dict[str, Any]], generator: torch.Generator | None = None,
              device: str | torch.device | None = None) -> dict[str, Any]:
    """A prior's mean held-out value in bits per token over every sample the batches yield.

    Each batch is a dict with ``codes`` [B, h, w], optional ``labels`` [B] and ``context``
    (coarser code grids), as :meth:`genfw.interfaces.Prior.nll` takes. ``nll_kind`` says what
    the value is (``exact``, ``bound``, ``estimate`` or ``not_likelihood``, see
    :data:`genfw.interfaces.NLLKind`); the value's key is ``nll_bits_per_token`` for the first
    three and ``denoising_ce_bits_per_token`` for the last, so a loss that is not a likelihood
    never appears under an NLL name. An ``estimate`` also gets ``nll_error_bits_per_token``; a
    prior with an ``nll_bounds`` sentence (which sampling process the bound is for) gets it too.
    """
    device = torch.device(device) if device is not None else _module_device(prior)
    values, errors = [], []
    kind = prior.nll_kind
    with _eval_mode(prior):
        for batch in batches:
            labels = batch.get("labels")
            context = batch.get("context")
            result = prior.nll(
                batch["codes"].to(device),
                labels.to(device) if labels is not None else None,
                [c.to(device) for c in context] if context else None,
                generator=generator,
            )
            values.append(result.bits_per_token.detach().double().cpu())
            if result.error_bits_per_token is not None:
                errors.append(result.error_bits_per_token.detach().double().cpu())
            kind = result.kind
    if not values:
        raise DataError("no held-out codes to evaluate the prior's likelihood on (latents.holdout is 0?)")
    if kind not in NLL_KIND_LABELS:
        raise ValueError(f"{type(prior).__name__}.nll returned kind {kind!r}; "
                         f"expected one of {', '.join(NLL_KIND_LABELS)}")
    bits = torch.cat(values)
    key = nll_value_key(kind)
    out = {
        key: float(bits.mean()),
        # standard error of the mean: how far another held-out draw could move the number
        f"{key}_sem": float(bits.std() / math.sqrt(bits.numel())) if bits.numel() > 1 else 0.0,
        "nll_kind": kind,
        "num_samples": int(bits.numel()),
    }
    if kind == "estimate" and errors:
        out["nll_error_bits_per_token"] = float(torch.cat(errors).mean().abs())
    bounds = getattr(prior, "nll_bounds", None)  # optional: which sampling process a bound is for
    if isinstance(bounds, str) and bounds:
        out["nll_bounds"] = bounds
    return out


# --------------------------------------------------------------------------------------------
# speed


def training_step_flops(model: nn.Module, batch: dict[str, Any]) -> int:
    """FLOPs of one training step's forward and backward (``model.loss(**batch)``'s main loss),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; the
    optimizer step and elementwise work are not counted). Gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            loss = model.loss(**batch).losses["main"]
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return int(counter.get_total_flops())


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Call ``fn(*args, **kwargs)``; return (its result, wall seconds), waiting for CUDA work.

    Divide by the number of images for sampling time per image.
    """
    _synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    _synchronize()
    return result, time.perf_counter() - start
