"""VQ-VAE: one code grid from a residual conv encoder/decoder (van den Oord et al. 2017;
the encoder/decoder of Razavi et al. 2019, Table 5, used at a single level).

Loss: MSE reconstruction + the quantizer's loss (VQ-VAE-2 eq. 2, beta = 0.25 on the
commitment term, EMA codebook by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from genfw.interfaces import Level, StepOutput
from genfw.nn.quantizer import QuantizerOutput, QuantizerParams, VectorQuantizer
from genfw.nn.resblocks import DownEncoder, UpDecoder, log2_exact
from genfw_vq.base import VQTokenizer


class VQVAE(VQTokenizer):
    """Single-level VQ-VAE; ``factor`` f gives an (H/f) x (W/f) code grid."""

    class Params(QuantizerParams):
        factor: int = Field(4, ge=1, description="f: downsampling factor (a power of two)")
        hidden_channels: int = Field(128, ge=2, description="encoder/decoder width ('hidden units', Table 5)")
        residual_channels: int = Field(64, ge=1, description="width inside residual blocks ('residual units')")
        num_res_blocks: int = Field(2, ge=0, description="residual blocks per stack ('layers')")

        @field_validator("factor")
        @classmethod
        def _power_of_two(cls, v: int) -> int:
            log2_exact(v)
            return v

    def __init__(self, params=None, **construct) -> None:
        super().__init__(params, **construct)  # channels, resolution
        channels = self.channels
        p = self.params
        self.check_resolution(p.factor)
        self.encoder = DownEncoder(channels, p.hidden_channels, p.residual_channels, p.num_res_blocks, p.factor)
        self.quant_conv = nn.Conv2d(p.hidden_channels, p.embed_dim, 1)
        self.quantize = VectorQuantizer.from_params(p)
        self.decoder = UpDecoder(p.embed_dim, channels, p.hidden_channels, p.residual_channels,
                                 p.num_res_blocks, p.factor)

    @property
    def levels(self) -> list[Level]:
        return [Level(codebook_size=self.params.codebook_size, factor=self.params.factor)]

    def quantizers(self) -> list[VectorQuantizer]:
        return [self.quantize]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images [B, C, H, W] -> (reconstruction, quantizer output)."""
        q = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(q.quantized), q

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.quantize(self.quant_conv(self.encoder(images))).codes]

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        (grid,) = codes
        return self.decoder(self.quantize.lookup(grid)).clamp(-1, 1)

    def training_step(self, images: torch.Tensor, step: int) -> StepOutput:
        recon, q = self(images)
        mse = F.mse_loss(recon.float(), images.float())
        loss = mse + q.loss
        logs = {"mse": float(mse.detach()), **self.quantizer_logs([q])}
        return StepOutput(losses={"main": loss}, logs=logs)
