"""The ``pixels`` tokenizer: each pixel's grey level (or each channel value) quantised to v levels.

The megapixel-SUNDAE paper trains its MNIST model directly on 28x28 pixels with v = 256; this
makes that a tokenizer so any prior can run on raw pixels. With C > 1 channels the channel
planes are laid side by side along the width: the code grid is [B, H, C*W] (folding channels
into one code would need v**C codes).
"""

from __future__ import annotations

import torch
from pydantic import Field

from genfw.interfaces import Level, Params, Tokenizer


class Pixels(Tokenizer):
    """Pixel values as codes: code = round((x + 1) / 2 * (v - 1))."""

    trainable = False

    class Params(Params):
        levels: int = Field(256, ge=2, le=65536, description="v: quantisation levels per value")

    @property
    def levels(self) -> list[Level]:
        return [Level(codebook_size=self.params.levels, factor=1)]

    def grid_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        return [(height, width * self.channels)]

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        v = self.params.levels
        codes = ((images.float().clamp(-1, 1) + 1) / 2 * (v - 1)).round().long()  # b c h w
        b, c, h, w = codes.shape
        return [codes.permute(0, 2, 1, 3).reshape(b, h, c * w)]  # channels side by side

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        v = self.params.levels
        (grid,) = codes
        b, h, cw = grid.shape
        c = self.channels
        x = grid.reshape(b, h, c, cw // c).permute(0, 2, 1, 3).float()
        return x / (v - 1) * 2 - 1
