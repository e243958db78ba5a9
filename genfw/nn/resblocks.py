"""Convolutional residual stacks and strided resampling of the VQ-VAE / VQ-VAE-2 encoders and
decoders (van den Oord et al. 2017 sec. 4.1; Razavi et al. 2019, Fig. 2a and Table 5).

A residual block is ReLU, 3x3 conv to ``residual_channels`` ("residual units"), ReLU, 1x1 conv
back, added to its input; a stack ends with a ReLU. Downsampling uses 4x4 stride-2 convs and
upsampling 4x4 stride-2 transposed convs, as in the paper's Table 5.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def log2_exact(factor: int) -> int:
    """log2 of a power of two (raises ``ValueError`` otherwise)."""
    n = int(round(math.log2(factor))) if factor >= 1 else -1
    if n < 0 or 2**n != factor:
        raise ValueError(f"downsampling factor must be a power of two, got {factor}")
    return n


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x))))."""

    def __init__(self, channels: int, residual_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, residual_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(residual_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Sequential):
    """``num_blocks`` residual blocks followed by a ReLU."""

    def __init__(self, channels: int, residual_channels: int, num_blocks: int) -> None:
        super().__init__(*[ResidualBlock(channels, residual_channels) for _ in range(num_blocks)], nn.ReLU())


class DownEncoder(nn.Sequential):
    """Strided encoder: log2(factor) 4x4 stride-2 convs, a 3x3 conv, then a residual stack.

    Widths follow the VQ-VAE-2 reference: for factor 4, ``in -> ch/2 -> ch``; for factor 2,
    ``in -> ch/2``; the 3x3 conv then brings the width to ``ch``. ``factor=1`` skips striding.
    """

    def __init__(self, in_channels: int, channels: int, residual_channels: int, num_blocks: int, factor: int) -> None:
        n = log2_exact(factor)
        layers: list[nn.Module] = []
        width = in_channels
        for i in range(n):
            out = channels if (i == n - 1 and n > 1) else channels // 2
            layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.ReLU()]
            width = out
        layers += [nn.Conv2d(width, channels, 3, padding=1), ResidualStack(channels, residual_channels, num_blocks)]
        super().__init__(*layers)


class UpDecoder(nn.Sequential):
    """Strided decoder: a 3x3 conv, a residual stack, then log2(factor) 4x4 stride-2 transposed convs."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, residual_channels: int,
                 num_blocks: int, factor: int) -> None:
        n = log2_exact(factor)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1),
                                   ResidualStack(channels, residual_channels, num_blocks)]
        width = channels
        for i in range(n):
            last = i == n - 1
            out = out_channels if last else channels // 2
            layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            width = out
        if n == 0:
            layers.append(nn.Conv2d(channels, out_channels, 1))
        super().__init__(*layers)


class Upsampler(nn.Sequential):
    """log2(factor) 4x4 stride-2 transposed convs at constant width (ReLU between them)."""

    def __init__(self, channels: int, factor: int) -> None:
        n = log2_exact(factor)
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)
