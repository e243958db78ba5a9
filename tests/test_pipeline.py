"""End to end: genfw run, stage reuse, export + sample in a new process, inpaint, eval."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

RECIPE = {
    "name": "tiny",
    "seed": 3,
    "data": {"name": "synthetic", "params": {"size": 48, "resolution": 8, "num_classes": 3}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 2},
              "backbone": {"name": "transformer", "params": {"dim": 32, "depth": 1, "heads": 2}}},
    "train": {"prior": {"steps": 12, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 5}},
    "latents": {"flip": True, "holdout": 0.35},  # 17 held-out images: halves of 8 and 9
    "sample": {"n": 6, "batch_size": 4, "params": {"steps": 12, "min_steps": 4}},
    "evaluate": {"n_samples": 8, "classifier_steps": 20, "batch_size": 16},
}
ENV = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0"}


def genfw(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "genfw", *map(str, args)], capture_output=True, text=True,
                            env=ENV, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = genfw("run", recipe, "--output-dir", root / "run")
    return root, recipe, root / "run", result


def test_run_writes_every_output(finished_run):
    _, _, run, result = finished_run
    for name in ("recipe.yaml", "tokenizer/model.safetensors", "latents/train/index.json", "prior0/model.safetensors",
                 "samples/grid.png", "metrics.json", "report.md", "curves.png"):
        assert (run / name).exists(), name
    pngs = sorted((run / "samples").glob("0*.png"))
    assert len(pngs) == 6 and "_class-" in pngs[0].name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"prior0/denoising_ce_bits_per_token", "fidelity/fid", "class_accuracy", "sample/seconds_per_image",
            "sample/evaluations_per_image"} <= set(metrics)
    index = json.loads((run / "latents/train/index.json").read_text())
    assert index["flip"] is True
    report = (run / "report.md").read_text()
    assert "## Metrics" in report and "samples/grid.png" in report and "![samples](samples.png)" in report
    assert "### How they were computed" in report and "| fidelity/num_samples | 8 |" in report.split("### How")[1]
    assert "kid_std" not in report  # 8 samples against 8 reference images: the subset is the whole set
    # the floor and the tokenizer beside FID; both classifiers' held-out accuracy beside class accuracy
    assert "real-vs-real floor" in report and "the tokenizer's reconstructions of the reference" in report
    assert "by the convnet classifier (its accuracy on 17 held-out real images" in report
    assert "by the lenet classifier (its accuracy on 17 held-out real images" in report
    printed = " ".join(result.stdout.split())  # genfw run prints the same lines under its metrics table
    assert "real-vs-real floor" in printed and "by the lenet classifier" in printed
    assert "Written 20" in report and "by `genfw run " in report and "Versions: genfw " in report
    assert (run / "samples.png").exists()


def test_second_run_reuses_every_stage(finished_run):
    _, recipe, run, _ = finished_run
    before = (run / "prior0/model.safetensors").stat().st_mtime_ns
    result = genfw("run", recipe, "--output-dir", run)
    assert result.stderr.count("unchanged, reused") >= 5 or result.stdout.count("unchanged, reused") >= 5
    assert (run / "prior0/model.safetensors").stat().st_mtime_ns == before


def test_changed_sampler_reruns_only_sampling(finished_run, tmp_path):
    _, recipe, run, _ = finished_run
    before = (run / "prior0/model.safetensors").stat().st_mtime_ns
    result = genfw("run", recipe, "--output-dir", run, "--set", "sample.params.temperature=0.5",
                   "--stages", "sample")
    assert "samples: inputs changed" in result.stdout + result.stderr
    assert (run / "prior0/model.safetensors").stat().st_mtime_ns == before


def test_export_then_sample_in_new_process_reproduces_images(finished_run):
    root, _, run, _ = finished_run
    bundle = root / "model.safetensors"
    genfw("export", run, "-o", bundle)
    a, b = root / "a", root / "b"
    genfw("sample", bundle, "-n", 3, "--seed", 7, "--label", 2, "--out", a)
    genfw("sample", bundle, "-n", 3, "--seed", 7, "--label", 2, "--out", b)
    names = sorted(p.name for p in a.glob("*.png"))
    assert "00000_class-cross.png" in names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    c = root / "c"
    genfw("sample", bundle, "-n", 3, "--seed", 8, "--label", 2, "--out", c)
    assert not all(np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(c / n))) for n in names)
    bad = genfw("sample", bundle, "-n", 1, "--label", 9, check=False)
    assert bad.returncode != 0 and "out of range" in bad.stderr


def test_inpaint_changes_only_the_masked_region(finished_run):
    root, _, run, _ = finished_run
    image = Image.open(sorted((run / "samples").glob("00000_*.png"))[0])
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[4:, :] = 255  # bottom half
    Image.fromarray(mask).save(root / "mask.png")
    out = root / "inpainted"
    genfw("inpaint", run, "--image", sorted((run / "samples").glob("00000_*.png"))[0], "--mask", root / "mask.png",
          "-n", 3, "--out", out, "--seed", 1, "--label", 0)
    original = np.asarray(image)
    for i in range(3):
        completion = np.asarray(Image.open(out / f"{i:03d}.png"))
        assert np.array_equal(completion[:4], original[:4])  # pixels tokenizer: latent = pixel
    assert (out / "side_by_side.png").exists()
    wrong = Image.fromarray(np.zeros((5, 5), dtype=np.uint8))
    wrong.save(root / "wrong.png")
    bad = genfw("inpaint", run, "--image", sorted((run / "samples").glob("00000_*.png"))[0], "--mask",
                root / "wrong.png", "--label", 0, check=False)
    assert bad.returncode != 0 and "mask" in bad.stderr and "Traceback" not in bad.stderr


def test_dry_run_prints_plan_with_parameters_and_flops(finished_run):
    _, recipe, _, _ = finished_run
    result = genfw("run", recipe, "--dry-run")
    assert "GFLOP per forward" in result.stdout and "prior level 0" in result.stdout


def test_run_directory_of_another_recipe_is_refused(finished_run, tmp_path):
    _, _, run, _ = finished_run
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**RECIPE, "name": "other"}))
    result = genfw("run", other, "--output-dir", run, check=False)
    assert result.returncode != 0 and "belongs to recipe 'tiny'" in result.stderr
    assert (run / "prior0/model.safetensors").exists()


def test_pipeline_in_process_latent_masks():
    from genfw.registry import build
    from genfw.sampling import latent_masks

    class F4:
        levels = [type("L", (), {"factor": 4, "codebook_size": 8})()]

        def grid_shapes(self, h, w):
            return [(h // 4, w // 4)]

    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 5, 1] = True  # one pixel in the bottom-left 4x4 patch
    (m,) = latent_masks(F4(), mask)
    assert m.tolist() == [[[False, False], [True, False]]]
    pixels = build("tokenizer", "pixels", {"levels": 4}, channels=3, resolution=[2, 2])
    (m,) = latent_masks(pixels, torch.tensor([[[True, False], [False, False]]]))
    assert m.tolist() == [[[True, False, True, False, True, False], [False] * 6]]
