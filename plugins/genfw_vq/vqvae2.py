"""Hierarchical VQ-VAE-2 (Razavi et al. 2019, sec. 3.1, Fig. 2a, Algorithm 1, Table 5).

``strides`` lists each encoder's downsampling, bottom first: ``[4, 2]`` is the ImageNet-256
model (bottom 64x64 at f = 4, top 32x32 at f = 8); ``[8, 2, 2]`` the FFHQ-1024 one (Table 5's
128x128, 64x64 and 32x32 latent maps). Encoding runs bottom-up through the encoders, then
quantizes top-down: each lower level's quantizer input is its encoder features concatenated
with the *decoded* quantized level above (1x1 conv to the embedding width), so a lower level
encodes what the upper one misses. The decoder takes every level, each upsampled to the bottom
grid by strided transposed convs. Codes come back coarsest first. Loss: MSE + the quantizers'
losses (beta = 0.25, EMA codebooks with gamma = 0.99 by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from genfw.interfaces import Level, StepOutput
from genfw.nn.quantizer import QuantizerOutput, QuantizerParams, VectorQuantizer
from genfw.nn.resblocks import DownEncoder, UpDecoder, Upsampler, log2_exact
from genfw_vq.base import VQTokenizer


class VQVAE2(VQTokenizer):
    """Two- or three-level VQ-VAE-2; ``levels`` and ``encode`` are coarsest (top) first."""

    class Params(QuantizerParams):
        strides: list[int] = Field(
            [4, 2], min_length=2, max_length=3,
            description="downsampling of each level's encoder, bottom first (ImageNet-256 [4, 2]; FFHQ-1024 [8, 2, 2])",
        )
        hidden_channels: int = Field(128, ge=2, description="encoder/decoder width ('hidden units', Table 5)")
        residual_channels: int = Field(64, ge=1, description="width inside residual blocks ('residual units')")
        num_res_blocks: int = Field(2, ge=0, description="residual blocks per stack ('layers')")

        @field_validator("strides")
        @classmethod
        def _powers_of_two(cls, v: list[int]) -> list[int]:
            for s in v:
                if s < 2:
                    raise ValueError("every stride must be >= 2")
                log2_exact(s)
            return v

    def __init__(self, params=None, **construct) -> None:
        super().__init__(params, **construct)  # channels, resolution
        channels = self.channels
        p = self.params
        ch, res, blocks, d = p.hidden_channels, p.residual_channels, p.num_res_blocks, p.embed_dim
        self.factors = [math.prod(p.strides[: i + 1]) for i in range(len(p.strides))]  # bottom first
        self.check_resolution(self.factors[-1])
        n = len(p.strides)
        # Index i counts from the bottom (finest) level.
        self.encoders = nn.ModuleList(
            [DownEncoder(channels if i == 0 else ch, ch, res, blocks, s) for i, s in enumerate(p.strides)]
        )
        # Quantizer inputs: the top sees only its features; lower levels also the decoded level above.
        self.quant_convs = nn.ModuleList([nn.Conv2d(ch + (d if i < n - 1 else 0), d, 1) for i in range(n)])
        self.quantize = nn.ModuleList([VectorQuantizer.from_params(p) for _ in range(n)])
        # Decoders of the level above, to condition level i (i < n - 1) on it at level i's grid.
        self.cond_decoders = nn.ModuleList(
            [UpDecoder(d, d, ch, res, blocks, p.strides[i + 1]) for i in range(n - 1)]
        )
        # Bring every level to the bottom grid for the final decoder.
        self.upsamplers = nn.ModuleList([Upsampler(d, self.factors[i] // self.factors[0]) for i in range(n)])
        self.decoder = UpDecoder(n * d, channels, ch, res, blocks, p.strides[0])

    @property
    def levels(self) -> list[Level]:
        return [Level(codebook_size=self.params.codebook_size, factor=f) for f in reversed(self.factors)]

    def quantizers(self) -> list[VectorQuantizer]:
        return list(reversed(self.quantize))

    # -- encode / decode ------------------------------------------------------------------------

    def _quantize_all(self, images: torch.Tensor) -> list[QuantizerOutput]:
        """Bottom-up features, top-down quantization; outputs bottom first."""
        feats = []
        h = images
        for enc in self.encoders:
            h = enc(h)
            feats.append(h)
        n = len(feats)
        outs: list[QuantizerOutput | None] = [None] * n
        for i in reversed(range(n)):
            x = feats[i]
            if i < n - 1:
                x = torch.cat([x, self.cond_decoders[i](outs[i + 1].quantized)], dim=1)
            outs[i] = self.quantize[i](self.quant_convs[i](x))
        return outs  # type: ignore[return-value]

    def _decode_quantized(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        """Quantized embeddings, bottom first -> images."""
        ups = [up(q) for up, q in zip(self.upsamplers, quantized, strict=True)]
        return self.decoder(torch.cat(ups, dim=1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[QuantizerOutput]]:
        """images -> (reconstruction, quantizer outputs bottom first)."""
        outs = self._quantize_all(images)
        return self._decode_quantized([q.quantized for q in outs]), outs

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [q.codes for q in reversed(self._quantize_all(images))]

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        bottom_first = list(reversed(codes))
        quantized = [q.lookup(c) for q, c in zip(self.quantize, bottom_first, strict=True)]
        return self._decode_quantized(quantized).clamp(-1, 1)

    def training_step(self, images: torch.Tensor, step: int) -> StepOutput:
        recon, outs = self(images)
        mse = F.mse_loss(recon.float(), images.float())
        vq = sum(q.loss for q in outs)
        logs = {"mse": float(mse.detach()), **self.quantizer_logs(list(reversed(outs)))}
        return StepOutput(losses={"main": mse + vq}, logs=logs)
