"""Finite scalar quantization (Mentzer et al. 2023, *Finite Scalar Quantization: VQ-VAE Made
Simple*, arXiv:2309.15505, sec. 3 and appendix A.1).

Each of the d channels is squashed into a bounded range and rounded to one of L_i levels; the
codebook is implicit, the product grid of all levels (K = prod L_i codes, no parameters, no
codebook loss). The bound is the paper's: ``tanh(z + shift) * half_l - offset`` with
``half_l = (L - 1)(1 + eps) / 2``, and for even L an offset of 1/2 (and the shift that keeps 0
mapped to 0), so even L gives L levels too. Rounding passes gradients straight through.
Codes are scaled to [-1, 1] by dividing by ``L // 2``. The index of a code counts in mixed
radix with the *first* channel as the least significant digit.

Checked against lucidrains/vector-quantize-pytorch ``finite_scalar_quantization.py``
(tests/test_fsq_lfq.py): same codes and indices on fixed inputs.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from genfw.nn.quantizer import CodeUsage, QuantizerOutput

BOUND_EPS = 1e-3  # eps of the bound (paper appendix A.1)


class FiniteScalarQuantizer(nn.Module):
    """FSQ over the channel axis of ``[B, d, *spatial]`` inputs, ``d = len(levels)``."""

    def __init__(self, levels: list[int]) -> None:
        super().__init__()
        if any(v < 2 for v in levels):
            raise ValueError(f"every FSQ level count must be at least 2, got {levels}")
        self.levels_list = [int(v) for v in levels]
        self.dim = len(levels)
        self.codebook_size = math.prod(self.levels_list)
        # Derived from the params, so not saved in checkpoints.
        self.register_buffer("levels", torch.tensor(self.levels_list, dtype=torch.long), persistent=False)
        radix = torch.cumprod(torch.tensor([1, *self.levels_list[:-1]]), 0)
        self.register_buffer("radix", radix.long(), persistent=False)
        self.usage = CodeUsage(self.codebook_size)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., d]`` squashed so that rounding gives L_i values per channel."""
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 + BOUND_EPS) / 2
        offset = (self.levels % 2 == 0).to(z.dtype) * 0.5
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., d]`` -> codes in [-1, 1] (straight-through rounding)."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / (self.levels // 2).to(z.dtype)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., d]`` in [-1, 1] -> indices ``[...]`` (long)."""
        half = (self.levels // 2).to(codes.dtype)
        digits = (codes * half + half).round().long()
        return (digits * self.radix).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[...]`` -> codes ``[..., d]`` in [-1, 1]."""
        digits = (indices[..., None] // self.radix) % self.levels
        half = self.levels // 2
        return (digits - half).float() / half.float()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Indices [B, *spatial] -> code vectors [B, d, *spatial]."""
        return torch.movedim(self.indices_to_codes(codes), -1, 1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` [B, d, *spatial] (in fp32, even under autocast); no loss."""
        b, d, *spatial = z.shape
        if d != self.dim:
            raise ValueError(f"FSQ with {self.dim} levels got {d} channels")
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z.float(), "b d ... -> (b ...) d")
            codes_vec = self.quantize(flat)
            indices = self.codes_to_indices(codes_vec.detach())
        quantized = torch.movedim(codes_vec.to(z.dtype).reshape(b, *spatial, d), -1, 1)
        stats = self.usage.usage_stats(indices)
        return QuantizerOutput(quantized, indices.reshape(b, *spatial), z.new_zeros(()).float(), stats)

    def health(self) -> dict[str, float]:
        return self.usage.health()
