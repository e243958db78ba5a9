"""Tokenizer metrics: reconstruction MSE, PSNR (:func:`psnr`) and codebook usage/perplexity."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from genfw.errors import DataError
from genfw.interfaces import Tokenizer
from genfw.metrics.base import _eval_mode, _module_device

PSNR_MAX_DB = 100.0  # identical images would give +inf, which JSON cannot hold


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
