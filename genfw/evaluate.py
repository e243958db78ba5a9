"""The evaluate stage: every metric of a run, written to ``metrics.json``.

* ``reconstruction`` — tokenizer MSE/PSNR and codebook usage on held-out images;
* ``nll`` — each prior's held-out value in bits per token with its kind: an exact NLL, a bound,
  an estimate of a bound, or (SUNDAE) a denoising loss that is not a likelihood;
* ``fidelity`` — FID, KID, precision/recall, density/coverage of the samples against real
  images, with the classifier feature extractor (trained here on the recipe's labelled data)
  or Inception from local weights; plus ``class_accuracy``, the fraction of class-conditional
  samples the classifier assigns to the class they were asked for;
* speed — sampling seconds and backbone evaluations per image, from the sample stage.

The rules of the fidelity metrics:

* **References never trained anything.** The held-out images (``latents.holdout``; the
  tokenizer, the prior and the classifiers train on the rest) are split into two disjoint
  halves fixed by the seed, ``validation`` and ``test``. FID/KID/PRDC references come only from
  the half ``evaluate.reference`` names (``test`` by default): ``n_samples`` of them, or all of
  the half when it is smaller (``fidelity/num_reference`` says how many).
* **Every FID and KID has its floor and its tokenizer beside it.** ``floor_fid``/``floor_kid``:
  real images of the *other* held-out half (as many as there are samples, or all of the half)
  against the same reference — what a perfect model scores at these counts;
  ``reconstruction_fid``/``reconstruction_kid``: the tokenizer's reconstructions of the
  reference images against those images.
* **Two classifiers.** A batch-norm convnet (its features give FID/KID/PRDC, its predictions
  ``class_accuracy``) and an independently trained LeNet-style network (another seed), both
  trained on the training split only; each one's accuracy and calibration error (ECE) on every
  held-out image stand beside its class accuracy, and an exact McNemar test says whether they
  disagree about the samples by more than chance (``classifier/disagreement_p``).
"""

from __future__ import annotations

from typing import Any

import torch

from genfw import checkpoint, io, metrics
from genfw.context import RunContext as Run
from genfw.data import AsTorchDataset, LatentDataset
from genfw.errors import ConfigError
from genfw.progress import console, progress_bar, tracked
from genfw.sampling import decode_codes, generate, sample_labels

PRDC_K = 5  # neighbours of precision/recall/density/coverage (metrics.fidelity's default)


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

    if "reconstruction" in spec.metrics:
        # without a held-out split (latents.holdout: 0) reconstruction is measured on training images
        recon_idx = hold_idx or train_idx[: spec.n_samples]
        loader = torch.utils.data.DataLoader(AsTorchDataset(run.dataset, recon_idx), batch_size=spec.batch_size)
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
    # References come only from the chosen held-out half (nothing was trained on it); the floor's
    # real "samples" from the other half, so no image is ever compared with itself.
    reference_half, other_half = reference_halves(run)
    images, sample_labels_ = _sample_images(run, tokenizer, priors, n)
    reference, _ = _stack(dataset, _subset(reference_half, n, run.recipe.seed))
    floor_real, _ = _stack(dataset, _subset(other_half, n, run.recipe.seed + 2))
    out: dict[str, Any] = {}
    if extractor == "classifier":
        pool = _subset(train_idx, 20_000, run.recipe.seed + 1)
        x, y = _stack(dataset, pool)
        classifiers = evaluation_classifiers(x, y, dataset.num_classes, spec.classifier_steps, run.recipe.seed, device)
        for prefix, model in classifiers.items():
            metrics.save_classifier(model, run.path("evaluate", f"{prefix}.safetensors"))
        hx, hy = _stack(dataset, hold_idx)
        labelled_ = hy >= 0  # unlabelled images (label -1) say nothing about accuracy
        out |= _classifier_metrics(classifiers, hx[labelled_], hy[labelled_], images, sample_labels_)
        extractor = classifiers["classifier"]
    fe = metrics.FeatureExtractor(extractor, batch_size=spec.batch_size, device=device,
                                  inception_weights_path=spec.inception_weights)
    with progress_bar(f"evaluate: fidelity features ({images.shape[0]} samples, {reference.shape[0]} reference, "
                      f"{floor_real.shape[0]} real for the floor, {reference.shape[0]} reconstructions)", total=None):
        features = {"samples": fe(images), "reference": fe(reference), "floor": fe(floor_real),
                    "reconstruction": fe(_reconstruct(tokenizer, reference, spec.batch_size, device))}
    result = metrics.fidelity_from_features(features["samples"], features["reference"]) | fe.described
    floor = metrics.fidelity_from_features(features["floor"], features["reference"])
    recon = metrics.fidelity_from_features(features["reconstruction"], features["reference"])
    for k, v in result.items():
        out[f"fidelity/{k}"] = v
        if k in ("fid", "kid"):  # beside each: what real images score, and the tokenizer's reconstructions
            out[f"fidelity/floor_{k}"] = floor[k]
            out[f"fidelity/reconstruction_{k}"] = recon[k]
    out["fidelity/floor_num_samples"] = floor["num_samples"]
    out["fidelity/reference"] = spec.reference
    if features["samples"] is not None:  # (under torchrun only rank 0 holds the features, and writes them)
        _save_per_sample(run, {"samples": features["samples"]["features"],
                               "reference": features["reference"]["features"]}, extractor, images,
                         sample_labels_, result)
    return out


def reference_halves(run: Run) -> tuple[list[int], list[int]]:
    """(reference half, other half) of the held-out images, as ``evaluate.reference`` chooses."""
    halves = run.heldout_halves()
    chosen = run.recipe.evaluate.reference
    other = "validation" if chosen == "test" else "test"
    smallest = min(len(halves[chosen]), len(halves[other]))
    if smallest <= PRDC_K:
        raise ConfigError(f"the fidelity metrics need more than {PRDC_K} held-out images in each half (reference "
                          f"and floor); latents.holdout gives {len(halves[chosen]) + len(halves[other])} in all: "
                          "raise latents.holdout")
    return halves[chosen], halves[other]


def _sample_images(run: Run, tokenizer, priors, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n decoded samples and the labels they were asked for: the sample stage's codes, topped up
    with fresh samples when ``evaluate.n_samples`` asks for more."""
    spec = run.recipe.evaluate
    device = run.device
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
    return images[:n], sample_labels_[:n] if sample_labels_ is not None else None


def _reconstruct(tokenizer, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """The tokenizer's reconstructions decode(encode(x)) of images [N, C, H, W], on the CPU."""
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with torch.inference_mode():
            return torch.cat([tokenizer.decode(tokenizer.encode(chunk.to(device))).float().clamp(-1, 1).cpu()
                              for chunk in images.split(batch_size)])
    finally:
        tokenizer.train(was_training)


#: The two independently trained evaluation classifiers (different architectures, seeds and batch
#: sizes), by their metrics prefix: the first gives the fidelity features and ``class_accuracy``.
CLASSIFIERS = {"classifier": ("convnet", 64), "classifier2": ("lenet", 128)}


def evaluation_classifiers(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, seed: int,
                           device="cpu") -> dict[str, Any]:
    """The two evaluation classifiers trained on labelled images x [N, C, H, W], y [N] (seeds
    ``seed`` and ``seed + 1``), by metrics prefix; trained once per process for the same inputs."""
    return {prefix: _classifier(x, y, num_classes, steps, seed + i, device, arch, batch_size)
            for i, (prefix, (arch, batch_size)) in enumerate(CLASSIFIERS.items())}


def _classifier_metrics(classifiers: dict[str, Any], heldout: torch.Tensor, heldout_labels: torch.Tensor,
                        samples: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
    """Each classifier's accuracy and calibration on held-out real images and its class accuracy
    on the samples; whether the two disagree on the samples by more than chance allows."""
    out: dict[str, Any] = {}
    correct, predicted = {}, {}
    for prefix, model in classifiers.items():
        out[f"{prefix}/arch"] = model.params.arch
        if heldout.shape[0]:
            real = metrics.classifier_report(model, heldout, heldout_labels)
            out[f"{prefix}/heldout_accuracy"] = real["accuracy"]
            out[f"{prefix}/heldout_ece"] = real["ece"]
            out[f"{prefix}/num_heldout"] = real["num_images"]
        if labels is not None:
            predicted[prefix] = metrics.classify(model, samples)
            correct[prefix] = predicted[prefix] == labels.long()
            key = "class_accuracy" if prefix == "classifier" else f"{prefix}/class_accuracy"
            out[key] = float(correct[prefix].double().mean())
    if len(correct) == 2:
        (a, pa), (b, pb) = zip(correct.values(), predicted.values(), strict=True)
        out["classifier/agreement"] = float((pa == pb).double().mean())
        out["classifier/disagreement_p"] = metrics.mcnemar_p(a, b)
    return out


#: Per-sample outputs of the fidelity metrics, for intervals within one run (bootstrap, Wilson).
PER_SAMPLE_FILE = "features.safetensors"


def _save_per_sample(run: Run, features: dict[str, torch.Tensor], extractor, images: torch.Tensor,
                     labels: torch.Tensor | None, result: dict[str, Any]) -> None:
    """``evaluate/features.safetensors``: what :mod:`genfw.stats` bootstraps over.

    ``sample_features`` [N, D] and ``reference_features`` [M, D] (the features FID/KID used) and,
    for class-conditional samples judged by the classifier, ``correct`` [N] (1 where the
    classifier assigns a sample to the class it was asked for).
    """
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
_CLASSIFIER_CACHE_SIZE = 4  # the two classifiers of two datasets


def _classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, seed: int, device,
                arch: str = "convnet", batch_size: int = 64):
    import hashlib

    digest = hashlib.sha256(x.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().tobytes())
    key = (digest.hexdigest(), tuple(x.shape), num_classes, steps, seed, str(device), arch, batch_size)
    if key in _CLASSIFIERS:
        console.print(f"[dim]evaluation classifier ({arch}): the one trained earlier in this process on the "
                      "same images, steps and seed[/dim]")
        return _CLASSIFIERS[key]
    console.print(f"[dim]training the evaluation classifier ({arch}) on {x.shape[0]} images[/dim]")
    model = metrics.train_classifier(x, y, num_classes, steps=steps, seed=seed, device=device, arch=arch,
                                     batch_size=batch_size)
    while len(_CLASSIFIERS) >= _CLASSIFIER_CACHE_SIZE:
        _CLASSIFIERS.pop(next(iter(_CLASSIFIERS)))
    _CLASSIFIERS[key] = model
    return model


def _read_sample_codes(run: Run):
    return checkpoint.read(run.path("samples", "codes.safetensors"))
