"""The classifier genfw trains on a recipe's labelled images: feature extractor and class judge.

:class:`Classifier` is a small CNN (:func:`train_classifier`); its penultimate features stand in
for Inception's in FID on small images, and its logits give the class accuracy of samples
(:func:`classifier_accuracy`), calibration (:func:`expected_calibration_error`) and McNemar's test
between two classifiers (:func:`mcnemar_p`). Saved and loaded as safetensors
(:func:`save_classifier`, :func:`load_classifier`); :func:`fingerprint` names its weights.
Registering it with torch-fidelity and extracting features is :mod:`genfw.metrics.features`.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn

from genfw import checkpoint
from genfw.errors import CheckpointError, DataError
from genfw.interfaces import Params
from genfw.metrics.base import _eval_mode, _module_device, to_uint8
from genfw.progress import progress_bar

#: ``auto`` prefers the classifier up to this image size: Inception at 299 px sees digits as blobs.
SMALL_IMAGE_MAX = 64


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

