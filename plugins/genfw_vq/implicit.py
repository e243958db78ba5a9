"""``fsq`` and ``lfq``: the ``vqgan`` tokenizer (same encoder, decoder, LPIPS + PatchGAN loss and
params) with an implicit-codebook quantizer in place of the codebook, so a study swaps only the
quantizer.

- ``fsq``: finite scalar quantization (Mentzer et al. 2023), :class:`genfw.nn.fsq.FiniteScalarQuantizer`;
  ``levels`` per channel, K = prod(levels), no quantizer loss.
- ``lfq``: lookup-free quantization (Yu et al. 2023, MAGVIT-v2), :class:`genfw.nn.lfq.LookupFreeQuantizer`;
  ``codebook_bits`` binary channels, K = 2 ** bits, entropy penalty plus commitment as the
  quantizer loss (weighted by ``codebook_weight`` like vqgan's).

The 1x1 ``quant_conv``/``post_quant_conv`` map the encoder's ``z_channels`` to the code dimension
(len(levels) or codebook_bits) and back. Codebook usage is logged like the VQ tokenizers'
(``level0/perplexity``, ``usage``, ``dead_codes``).
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator

from genfw.interfaces import Level
from genfw.nn.fsq import FiniteScalarQuantizer
from genfw.nn.lfq import LookupFreeQuantizer
from genfw_vq.vqgan import VQGAN, GANParams


class FSQGAN(VQGAN):
    """VQ-GAN's networks and loss over finite scalar quantization (no codebook to learn)."""

    class Params(GANParams):
        levels: list[int] = Field([8, 5, 5, 5], min_length=1, description=(
            "L_i: quantization levels per code channel; K = prod(levels) (FSQ paper Table 1: "
            "[8,8,8] ~ 2^9, [8,5,5,5] ~ 2^10, [8,8,8,5,5,5] ~ 2^16)"))

        @field_validator("levels")
        @classmethod
        def _at_least_two(cls, v: list[int]) -> list[int]:
            if any(x < 2 for x in v):
                raise ValueError(f"every level count must be at least 2, got {v}")
            return v

        @property
        def code_dim(self) -> int:
            return len(self.levels)

    def make_quantizer(self) -> FiniteScalarQuantizer:
        return FiniteScalarQuantizer(list(self.params.levels))

    @property
    def levels(self) -> list[Level]:
        return [Level(codebook_size=math.prod(self.params.levels), factor=self.factor)]


class LFQGAN(VQGAN):
    """VQ-GAN's networks and loss over lookup-free (binary) quantization."""

    class Params(GANParams):
        codebook_bits: int = Field(10, ge=1, le=20, description="d: binary code channels; K = 2 ** d")
        entropy_weight: float = Field(0.1, ge=0, description="weight of the entropy penalty (MAGVIT-v2 eq. 5)")
        commitment_weight: float = Field(0.25, ge=0, description="weight of ||z - sg[q]||^2")
        diversity_gamma: float = Field(1.0, ge=0, description="weight of the codebook-entropy term in the penalty")
        inv_temperature: float = Field(100.0, gt=0, description="sharpness of the soft code assignment of the penalty")

        @property
        def code_dim(self) -> int:
            return self.codebook_bits

    def make_quantizer(self) -> LookupFreeQuantizer:
        p = self.params
        return LookupFreeQuantizer(p.codebook_bits, entropy_weight=p.entropy_weight,
                                   commitment_weight=p.commitment_weight, diversity_gamma=p.diversity_gamma,
                                   inv_temperature=p.inv_temperature)

    @property
    def levels(self) -> list[Level]:
        return [Level(codebook_size=2 ** self.params.codebook_bits, factor=self.factor)]
