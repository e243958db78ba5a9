"""2D axial rotary position embeddings.

Rotary embeddings (Su et al., 2021, *RoFormer*) rotate pairs of query/key features by an angle
proportional to the token's position, so attention scores depend on relative position. The
megapixel-SUNDAE hourglass (McKinney & Willcocks, §3.2) extends them to two axes (after
Biderman et al., 2021): half of each head's features are rotated by the row position, the other
half by the column position, with positions ``linspace(-1, 1, side)`` per axis and
"pixel"-style frequencies ``linspace(1, max_freq / 2, n) * pi`` as in the authors' code.

Unlike the authors' code (which rotates before splitting heads, so only the first head gets
positions — see REFERENCE.md), the tables here are applied to every head.

Layout ("rotate half"): feature ``j`` is paired with feature ``j + head_dim / 2``; the first
``head_dim / 4`` pairs turn with the row, the remaining ``head_dim / 4`` with the column. That is
a fixed permutation of the interleaved layout, which a learned q/k projection absorbs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class RotaryTables(NamedTuple):
    """Cosines and sines per position, each ``[n, head_dim]`` (n = h * w, raster order)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def at(self, position: int) -> RotaryTables:
        """The tables of one raster position, ``[1, head_dim]`` each."""
        return RotaryTables(self.cos[position : position + 1], self.sin[position : position + 1])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate ``x [..., n, head_dim]`` (any number of leading axes, e.g. batch and heads)."""
    return x * tables.cos + rotate_half(x) * tables.sin


class AxialRotary(nn.Module):
    """Builds (and caches) 2D axial rotary tables for a grid.

    Args:
        head_dim: features per attention head; must be a multiple of 4 (two axes, pairs).
        max_freq: highest frequency is ``max_freq / 2 * pi`` radians per unit of position; with
            positions in [-1, 1] this sets the finest resolvable spacing (10, the authors' value,
            separates neighbours on grids up to ~64 per side well).
        max_cached: grids whose tables are kept (keyed by h, w, device, dtype).
    """

    def __init__(self, head_dim: int, max_freq: float = 10.0, max_cached: int = 16) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"axial rotary embeddings need head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.max_freq = max_freq
        self.max_cached = max_cached
        self._cache: dict[tuple, RotaryTables] = {}

    def forward(self, height: int, width: int, device: torch.device | str, dtype: torch.dtype) -> RotaryTables:
        """Tables for an ``height x width`` grid in raster order."""
        key = (height, width, str(device), dtype)
        tables = self._cache.get(key)
        if tables is None:
            # Built outside inference mode: tables cached while sampling are reused in training,
            # where autograd must be able to save them.
            with torch.inference_mode(False), torch.no_grad():
                tables = self._build(height, width, torch.device(device), dtype)
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = tables
        return tables

    def _build(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> RotaryTables:
        n_freq = self.head_dim // 4
        freqs = torch.linspace(1.0, self.max_freq / 2, n_freq, dtype=torch.float64) * math.pi
        rows = torch.linspace(-1.0, 1.0, height, dtype=torch.float64)[:, None] * freqs  # h f
        cols = torch.linspace(-1.0, 1.0, width, dtype=torch.float64)[:, None] * freqs  # w f
        angles = torch.cat(
            (rows[:, None, :].expand(height, width, n_freq), cols[None, :, :].expand(height, width, n_freq)), dim=-1
        ).reshape(height * width, 2 * n_freq)
        angles = torch.cat((angles, angles), dim=-1)  # feature j and j + head_dim/2 share an angle
        return RotaryTables(angles.cos().to(device, dtype).contiguous(), angles.sin().to(device, dtype).contiguous())

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_freq={self.max_freq}"
