"""Differentiable augmentation of discriminator inputs (Zhao et al. 2020, "Differentiable
Augmentation for Data-Efficient GAN Training"), as the Unleashing Transformers VQ-GAN applies
to every real and fake discriminator input (Bond-Taylor et al., sec. 3.4): colour (brightness,
saturation, contrast) and translation by up to 1/8 of the image, filling with zeros.

Each call draws fresh random parameters per sample; gradients flow to the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)


def colour(x: torch.Tensor) -> torch.Tensor:
    """Random brightness in [-0.5, 0.5], saturation in [0, 2], contrast in [0.5, 1.5]."""
    x = x + (_per_sample(x) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_per_sample(x) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_sample(x) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size per axis; vacated pixels become 0."""
    b, c, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if sy == 0 and sx == 0:
        return x
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    padded = F.pad(x, (sx, sx, sy, sy))  # b c (h + 2 sy) (w + 2 sx)
    rows = (torch.arange(h, device=x.device)[None, :, None] + sy + dy).expand(b, h, w)
    cols = (torch.arange(w, device=x.device)[None, None, :] + sx + dx).expand(b, h, w)
    batch = torch.arange(b, device=x.device)[:, None, None].expand(b, h, w)
    # gather per pixel: b h w c -> back to b c h w
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def diff_augment(x: torch.Tensor) -> torch.Tensor:
    """The colour + translation policy."""
    return translation(colour(x))
