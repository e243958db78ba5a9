"""Image tensors to pictures: one image to PIL, a batch to one grid on white padding.

Used by sample writing, reports, loggers and inpainting; nothing here reads data or knows a
dataset (those live in :mod:`genfw.data`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [-1, 1] -> PIL image (mode L for one channel, RGB for three), values rounded."""
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu())


def make_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> Image.Image:
    """[B, C, H, W] in [-1, 1] -> one PIL image with the images in a grid on white padding.

    ``columns`` defaults to ceil(sqrt(B)). torchvision's ``make_grid`` lays it out; a single
    image keeps its padding and greyscale stays greyscale (torchvision returns one image bare
    and copies one channel to three).
    """
    from torchvision.utils import make_grid as tv_make_grid

    b, c, h, w = images.shape
    columns = columns or max(1, int(np.ceil(np.sqrt(b))))
    x = images.detach().float().cpu().clamp(-1, 1)
    if columns > b:  # torchvision would narrow the grid to b columns: fill the row with white
        x = torch.cat([x, torch.ones(columns - b, c, h, w)])
    if x.shape[0] == 1:
        grid = torch.nn.functional.pad(x[0], (pad, pad, pad, pad), value=1.0)
    else:
        grid = tv_make_grid(x, nrow=columns, padding=pad, pad_value=1.0)[:c]
    return to_pil(grid)
