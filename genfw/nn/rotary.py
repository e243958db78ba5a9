"""2D axial rotary position embeddings.

Rotary embeddings (Su et al., 2021, *RoFormer*) rotate pairs of query/key features by an angle
proportional to the token's position, so attention scores depend on relative position. The
megapixel-SUNDAE hourglass (McKinney & Willcocks, §3.2) extends them to two axes (after
Biderman et al., 2021): half of each head's features are rotated by the row position, the other
half by the column position, with positions ``linspace(-1, 1, side)`` per axis and
"pixel"-style frequencies ``linspace(1, max_freq / 2, n) * pi`` as in the authors' code.

Unlike the authors' hourglass code (which rotates before splitting heads, so only the first head
gets positions), the tables here are applied to every head.

Layout: features ``(2j, 2j + 1)`` form pair ``j``; the first ``head_dim / 4`` pairs turn with
the row, the remaining ``head_dim / 4`` with the column (a fixed permutation of any other layout,
which the learned q/k projection absorbs). In float32/float64 a pair is rotated as one complex
multiplication (one pass over memory, one allocation); other dtypes (bf16/fp16, which have no
complex type) take the equivalent real formula.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class RotaryTables(NamedTuple):
    """Per position and feature pair, ``[n, head_dim / 2]`` each (n = h * w, raster order):
    ``cos`` and ``sin`` of the angle, and ``rot = cos + i sin`` (None for dtypes without complex)."""

    cos: torch.Tensor
    sin: torch.Tensor
    rot: torch.Tensor | None

    def at(self, position: int) -> RotaryTables:
        """The tables of one raster position, ``[1, head_dim / 2]`` each."""
        return RotaryTables(*(t if t is None else t[position : position + 1] for t in self))

    def broadcast(self, *axes: int) -> RotaryTables:
        """The tables with singleton axes inserted at ``axes`` (e.g. ``1, 1`` for ``[n, 1, 1, e/2]``)."""
        tables = list(self)
        for axis in axes:
            tables = [t if t is None else t.unsqueeze(axis) for t in tables]
        return RotaryTables(*tables)


def _complex_ok(x: torch.Tensor, tables: RotaryTables) -> bool:
    # view_as_complex needs unit stride on the pair axis and even strides/offset elsewhere
    return (tables.rot is not None and x.is_floating_point() and tables.rot.dtype == x.dtype.to_complex()
            and x.stride(-1) == 1
            and x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1]))


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate ``x [..., head_dim]``; the tables must broadcast against ``[..., head_dim / 2]``
    (``[n, e/2]`` for ``x [..., n, e]``). Pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    if _complex_ok(x, tables):
        return torch.view_as_real(torch.view_as_complex(pairs) * tables.rot).flatten(-2)
    x1, x2 = pairs.unbind(-1)
    cos, sin = tables.cos.to(x.dtype), tables.sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


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
        cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
        rot = None
        if dtype in (torch.float32, torch.float64):
            rot = torch.polar(torch.ones_like(angles), angles).to(device, dtype.to_complex())
        return RotaryTables(cos.contiguous(), sin.contiguous(), rot)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_freq={self.max_freq}"
