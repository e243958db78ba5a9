"""The evaluate stage: every metric of a run, written to ``metrics.json``.

* ``reconstruction`` — tokenizer MSE/PSNR and codebook usage on held-out images;
* ``nll`` — each prior's held-out value in bits per token with its kind: an exact NLL, a bound,
  an estimate of a bound, or (SUNDAE) a denoising loss that is not a likelihood;
* ``fidelity`` — FID, KID, precision/recall, density/coverage of the samples against real
  images, with the classifier feature extractor (trained here on the recipe's labelled data)
  or Inception from local weights; plus ``class_accuracy``, the fraction of class-conditional
  samples the classifier assigns to the class they were asked for;
* speed — sampling seconds and backbone evaluations per image, from the sample stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from genfw import io, metrics
from genfw.data import AsTorchDataset, LatentDataset
from genfw.progress import console, progress_bar, tracked
from genfw.sampling import decode_codes, generate, sample_labels

if TYPE_CHECKING:
    from genfw.context import RunContext as Run


def _stack(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in tracked(indices, "evaluate: reading images")]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def _subset(indices: list[int], n: int, seed: int) -> list[int]:
    if len(indices) <= n:
        return list(indices)
    g = torch.Generator().manual_seed(seed)
    return sorted(indices[i] for i in torch.randperm(len(indices), generator=g)[:n].tolist())


def evaluate_run(run: Run, tokenizer, priors) -> dict[str, Any]:
    """Compute the recipe's ``evaluate.metrics`` for a run; returns a flat dict."""
    spec = run.recipe.evaluate
    device = run.device
    out: dict[str, Any] = {}
    train_idx, hold_idx = run._split()
    hold_idx = hold_idx or train_idx[: spec.n_samples]

    if "reconstruction" in spec.metrics:
        loader = torch.utils.data.DataLoader(AsTorchDataset(run.dataset, hold_idx), batch_size=spec.batch_size)
        batches = tracked(loader, "evaluate: reconstruction (batches)")
        for k, v in metrics.reconstruction(tokenizer, batches, device=device).items():
            out[f"tokenizer/{k}"] = v

    if "nll" in spec.metrics:
        latents = LatentDataset(run.path("latents", "holdout")) if hold_idx else None
        if latents is not None and len(latents):
            loader = torch.utils.data.DataLoader(latents, batch_size=spec.batch_size)
            for level, prior in enumerate(priors):
                batches = ({"codes": codes[level], "labels": labels if prior.num_classes else None,
                            "context": list(codes[:level]) or None}
                           for codes, labels in tracked(loader, f"evaluate: prior {level} NLL (batches)"))
                g = torch.Generator(device=device).manual_seed(run.recipe.seed)
                result = metrics.prior_nll(prior, batches, generator=g, device=device)
                out |= {f"prior{level}/{k}": v for k, v in result.items()}

    if "fidelity" in spec.metrics:
        out |= _fidelity(run, tokenizer, priors, train_idx, hold_idx)

    try:
        timing = io.read_json(run.path("samples", "timing.json"))
        out["sample/seconds_per_image"] = timing["seconds"] / max(1, timing["n"])
        if timing.get("backbone_evaluations"):
            # rows fed to the backbone per image (a cached autoregressive step is one token)
            out["sample/evaluations_per_image"] = timing["backbone_evaluations"] / max(1, timing["n"])
        out["sample/images_per_second"] = timing["images_per_second"]
        out["sample/device"] = timing.get("device", "")
    except FileNotFoundError:
        pass
    return out


def _fidelity(run: Run, tokenizer, priors, train_idx: list[int], hold_idx: list[int]) -> dict[str, Any]:
    spec = run.recipe.evaluate
    device = run.device
    dataset = run.dataset
    n = spec.n_samples
    labelled = dataset.num_classes > 0
    extractor = metrics.choose_extractor(spec.feature_extractor, has_labels=labelled,
                                         resolution=tuple(dataset.resolution),
                                         inception_weights_path=spec.inception_weights)
    # Samples: the sample stage's codes, topped up with fresh samples when n_samples asks for more.
    tensors, _ = _read_sample_codes(run)
    codes = [tensors[f"codes.{i}"].long() for i in range(len(priors))]
    sample_labels_ = tensors.get("labels")
    images = decode_codes(tokenizer, codes, spec.batch_size, device)  # split over the ranks under torchrun
    if images.shape[0] < n:
        extra_n = n - images.shape[0]
        labels = sample_labels(extra_n, run.num_classes, run.recipe.sample.labels)
        more = generate(tokenizer, priors, extra_n, labels=labels, seed=run.sample_seed() + 10_000,
                        batch_size=run.recipe.sample.batch_size, sampler=run.resolved.sampler_params, device=device,
                        progress="evaluate: extra samples")
        images = torch.cat([images, more.images])
        if sample_labels_ is not None and labels is not None:
            sample_labels_ = torch.cat([sample_labels_, labels])
    images = images[:n]
    sample_labels_ = sample_labels_[:n] if sample_labels_ is not None else None

    # validation and test references are disjoint (a sampler tuned on one is reported on the other)
    pool = _reference_half(hold_idx, spec.reference, run.recipe.seed)
    pool += _reference_half(train_idx, spec.reference, run.recipe.seed)
    reference_idx = _subset(pool, n, run.recipe.seed)
    reference, _ = _stack(dataset, reference_idx)
    out: dict[str, Any] = {}
    if extractor == "classifier":
        pool = _subset(train_idx, 20_000, run.recipe.seed + 1)
        x, y = _stack(dataset, pool)
        classifier = _classifier(x, y, dataset.num_classes, spec.classifier_steps, run.recipe.seed, device)
        metrics.save_classifier(classifier, run.path("evaluate", "classifier.safetensors"))
        if hold_idx:
            hx, hy = _stack(dataset, hold_idx)
            out["classifier/heldout_accuracy"] = metrics.classifier_accuracy(classifier, hx, hy)
        if sample_labels_ is not None:
            out["class_accuracy"] = metrics.classifier_accuracy(classifier, images, sample_labels_)
        extractor = classifier
    features: dict[str, torch.Tensor] = {}
    with progress_bar(f"evaluate: fidelity features ({images.shape[0]} samples, {reference.shape[0]} reference)",
                      total=None):
        result = metrics.fidelity(images, reference, extractor, batch_size=spec.batch_size, device=device,
                                  inception_weights_path=spec.inception_weights, features_out=features)
    out |= {f"fidelity/{k}": v for k, v in result.items()}
    if features:  # (under torchrun only rank 0 holds the features, and writes them)
        _save_per_sample(run, features, extractor, images, sample_labels_, result)
    return out


def _reference_half(indices: list[int], which: str, seed: int) -> list[int]:
    """The ``evaluate.reference`` half of ``indices``: two disjoint halves fixed by the seed."""
    g = torch.Generator().manual_seed(seed + 7919)
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    half = len(order) // 2
    return sorted(order[:half] if which == "validation" else order[half:])


#: Per-sample outputs of the fidelity metrics, for intervals within one run (bootstrap, Wilson).
PER_SAMPLE_FILE = "features.safetensors"


def _save_per_sample(run: Run, features: dict[str, torch.Tensor], extractor, images: torch.Tensor,
                     labels: torch.Tensor | None, result: dict[str, Any]) -> None:
    """``evaluate/features.safetensors``: what :mod:`genfw.stats` bootstraps over.

    ``sample_features`` [N, D] and ``reference_features`` [M, D] (the features FID/KID used) and,
    for class-conditional samples judged by the classifier, ``correct`` [N] (1 where the
    classifier assigns a sample to the class it was asked for).
    """
    from genfw import checkpoint

    tensors = {"sample_features": features["samples"].float().contiguous(),
               "reference_features": features["reference"].float().contiguous()}
    if isinstance(extractor, metrics.Classifier) and labels is not None:
        tensors["correct"] = (metrics.classify(extractor, images) == labels.cpu().long()).to(torch.uint8)
    meta = {"type": "evaluation_features", "feature_extractor_id": result.get("feature_extractor_id", ""),
            "reference": run.recipe.evaluate.reference, "prdc_k": result.get("prdc_k", 5)}
    checkpoint.save_tensors(run.path("evaluate", PER_SAMPLE_FILE), tensors, meta)


#: Classifiers trained in this process, by (images, labels, steps, seed, device): the runs of one
#: ablation or study evaluate with the same classifier, trained once (training is deterministic).
_CLASSIFIERS: dict[tuple, Any] = {}
_CLASSIFIER_CACHE_SIZE = 2


def _classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, seed: int, device):
    import hashlib

    digest = hashlib.sha256(x.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().tobytes())
    key = (digest.hexdigest(), tuple(x.shape), num_classes, steps, seed, str(device))
    if key in _CLASSIFIERS:
        console.print("[dim]classifier feature extractor: the one trained earlier in this process on the same "
                      "images, steps and seed[/dim]")
        return _CLASSIFIERS[key]
    console.print(f"[dim]training the classifier feature extractor on {x.shape[0]} images[/dim]")
    model = metrics.train_classifier(x, y, num_classes, steps=steps, seed=seed, device=device)
    while len(_CLASSIFIERS) >= _CLASSIFIER_CACHE_SIZE:
        _CLASSIFIERS.pop(next(iter(_CLASSIFIERS)))
    _CLASSIFIERS[key] = model
    return model


def _read_sample_codes(run: Run):
    from genfw import checkpoint

    return checkpoint.read(run.path("samples", "codes.safetensors"))
