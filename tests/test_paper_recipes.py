"""The paper recipes: plans print, and the FFHQ1024 pipeline runs end to end when shrunk."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ENV = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0"}


def genfw(*args):
    result = subprocess.run([sys.executable, "-m", "genfw", *map(str, args)], capture_output=True, text=True,
                            env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_ffhq1024_dry_run_prints_the_plan():
    out = genfw("run", "recipes/ffhq1024_sundae.yaml", "--dry-run").stdout
    assert "vqgan" in out and "8192 codes @ 32x32" in out and "sundae / hourglass" in out
    assert "GFLOP per forward" in out


SHRINK = [
    "tokenizer.params.ch=32", "tokenizer.params.num_res_blocks=1", "tokenizer.params.attn_resolutions=[8]",
    "tokenizer.params.z_channels=8", "tokenizer.params.embed_dim=8", "tokenizer.params.codebook_size=32",
    "tokenizer.params.perceptual_weight=0", "tokenizer.params.disc_ndf=8",
    "train.tokenizer.steps=2", "train.tokenizer.batch_size=2",
    "prior.backbone.params={dim: 32, depth: [1, 1, 1], heads: 2, head_dim: 16}",
    "train.prior.steps=2", "train.prior.batch_size=2",
    "sample.n=2", "sample.batch_size=2", "sample.params.steps=3", "sample.params.min_steps=1",
    "evaluate.metrics=[reconstruction, nll]", "latents.holdout=0.25",
    "data.params.resolution=256",  # the images on disk are 1024x1024; loading resizes them
]


def test_ffhq1024_recipe_runs_all_stages_when_shrunk(tmp_path):
    data = tmp_path / "ffhq"
    data.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024] / 1024.0
    for i in range(4):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        face = np.stack([a * yy, b * xx, c * (1 - yy) * xx], -1)
        Image.fromarray((face * 255).astype(np.uint8)).save(data / f"{i:05d}.png")
    run = tmp_path / "run"
    genfw("run", "recipes/ffhq1024_sundae.yaml", "--output-dir", run, "--set", f"data.params.path={data}",
          *[arg for s in SHRINK for arg in ("--set", s)])
    metrics = json.loads((run / "metrics.json").read_text())
    assert "tokenizer/psnr" in metrics and "prior0/denoising_ce_bits_per_token" in metrics
    assert metrics["prior0/nll_kind"] == "not_likelihood" and "prior0/nll_bits_per_token" not in metrics
    index = json.loads((run / "latents/train/index.json").read_text())
    assert index["flip"] is True and index["levels"] == [[32, 8, 8]]
    samples = sorted((run / "samples").glob("0*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (256, 256)
    assert (run / "report.md").exists()
