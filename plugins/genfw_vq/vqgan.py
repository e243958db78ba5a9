"""VQ-GAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis"), the
tokenizer of the megapixel-SUNDAE, Unleashing Transformers and taming papers.

Encoder and decoder are taming-transformers' (``ch``, ``ch_mult``, ``num_res_blocks``,
``attn_resolutions``, ``z_channels``; f = 2 ** (len(ch_mult) - 1)); module and parameter names
follow its ``VQModel`` (``encoder.down.N.block.M.conv1``, ``quant_conv``, ``quantize.embedding``,
``post_quant_conv``, ``decoder.up.N...``, ``loss.discriminator.main.K``) so its state dicts load
after the mapping in docs/tokenizers.md (:func:`genfw_vq.convert.convert_taming`). The loss
lives in :mod:`genfw_vq.losses`. Two parameter groups, ``generator`` and ``discriminator``;
train them with Adam betas (0.5, 0.9) (``train.tokenizer.betas`` in a recipe).

``attn_resolutions`` are feature-map heights, counted from the construction ``resolution``'s
height (taming's single ``resolution``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from genfw.interfaces import Level, StepOutput
from genfw.interfaces import Params as BaseParams
from genfw.nn.quantizer import QuantizerOutput, QuantizerParams, VectorQuantizer
from genfw_vq.base import VQTokenizer
from genfw_vq.losses import VQGANLoss

GROUPS = 32  # GroupNorm groups of taming-transformers


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - taming's name
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice, with a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 conv projections, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # b c h w -> b 1 (h w) c: one head over every position
        q, k, v = (t(hn).flatten(2).transpose(1, 2)[:, None] for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, as taming
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """taming's Encoder (double_z = False): conv_in, down levels, mid (res-attn-res), conv_out."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], dropout: float, resolution: int, z_channels: int,
                 out_activation: bool = True) -> None:
        super().__init__()
        self.out_activation = out_activation
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = [1, *ch_mult]
        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            width = ch * in_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(width, ch * mult, dropout))
                width = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(width))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(width)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width, dropout)
        self.mid.attn_1 = AttnBlock(width)
        self.mid.block_2 = ResnetBlock(width, width, dropout)
        self.norm_out = Normalize(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.norm_out(h)
        return self.conv_out(F.silu(h) if self.out_activation else h)


class Decoder(nn.Module):
    """taming's Decoder: conv_in, mid, up levels (num_res_blocks + 1 blocks each), conv_out."""

    def __init__(self, *, out_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], dropout: float, resolution: int, z_channels: int,
                 out_activation: bool = True, blocks_per_level: int | None = None) -> None:
        super().__init__()
        self.out_activation = out_activation
        n = len(ch_mult)
        width = ch * ch_mult[-1]
        res = resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width, dropout)
        self.mid.attn_1 = AttnBlock(width)
        self.mid.block_2 = ResnetBlock(width, width, dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1 if blocks_per_level is None else blocks_per_level):
                level.block.append(ResnetBlock(width, ch * ch_mult[i], dropout))
                width = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(width))
            if i != 0:
                level.upsample = Upsample(width)
                res *= 2
            levels.insert(0, level)  # up[i] is the level at ch_mult[i], as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(F.silu(h) if self.out_activation else h)


class GANParams(BaseParams):
    """The encoder, decoder and loss fields of ``vqgan``, shared with ``fsq`` and ``lfq`` (which
    swap only the quantizer); each tokenizer adds its quantizer's fields and ``code_dim``."""

    ch: int = Field(128, ge=1, description="base width of encoder/decoder")
    ch_mult: list[int] = Field([1, 1, 2, 2, 4], min_length=1, description="width multiplier per level; f = 2**(len-1)")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per encoder level (decoder: +1)")
    attn_resolutions: list[int] = Field([16], description="feature heights that get self-attention")
    z_channels: int = Field(256, ge=1, description="encoder output / decoder input width")
    dropout: float = Field(0.0, ge=0, lt=1)
    disc_start: int = Field(15000, ge=0, description="step at which the discriminator switches on")
    disc_weight: float = Field(1.0, ge=0, description="multiplier of the adaptive weight (taming: 0.8)")
    codebook_weight: float = Field(1.0, ge=0, description="weight of the quantizer loss")
    perceptual_weight: float = Field(1.0, ge=0, description="weight of LPIPS (0 = no perceptual loss)")
    lambda_max: float | None = Field(
        1.0, gt=0, description="clamp of the adaptive weight (Unleashing: 1; None: taming's 1e4)"
    )
    diffaug: bool = Field(True, description="DiffAugment (colour, translation) on discriminator inputs")
    disc_layers: int = Field(3, ge=1, description="PatchGAN layers")
    disc_ndf: int = Field(64, ge=1, description="PatchGAN base width")
    perceptual_weights: str | None = Field(
        None, description="local .pth/.safetensors with LPIPS-VGG16 weights (else the torch hub cache)"
    )
    # Architecture variants, for converted models (genfw convert unleashing); defaults are taming's.
    quant_convs: bool = Field(True, description=(
        "1x1 convs between encoder, codebook and decoder (taming); False: the encoder outputs codewords "
        "directly (Unleashing Transformers; needs z_channels == the code dimension: embed_dim for vqgan)"))
    decoder_res_blocks: int | None = Field(None, ge=1, description=(
        "residual blocks per decoder level (None: num_res_blocks + 1, as taming; Unleashing: num_res_blocks)"))
    out_activation: bool = Field(True, description=(
        "swish between the last GroupNorm and conv of encoder and decoder (taming); Unleashing has none"))
    unit_range: bool = Field(False, description=(
        "the networks work on images in [0, 1] (Unleashing Transformers); genfw's [-1, 1] images are mapped in and out"))

    @model_validator(mode="after")
    def _group_norm_widths(self):
        bad = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % GROUPS})
        if self.ch % GROUPS or bad:
            raise ValueError(f"ch and ch * ch_mult must be multiples of {GROUPS} (GroupNorm groups); got widths "
                             f"{[self.ch, *bad]}")
        if not self.quant_convs and self.z_channels != self.code_dim:
            raise ValueError(f"quant_convs: false needs z_channels == the code dimension, got {self.z_channels} "
                             f"and {self.code_dim}")
        return self

    @property
    def code_dim(self) -> int:
        """Channels of the quantizer's input (and of a code vector)."""
        raise NotImplementedError


class VQGAN(VQTokenizer):
    """taming-transformers' VQModel with the Unleashing Transformers loss fixes."""

    class Params(QuantizerParams, GANParams):
        codebook_size: int = Field(1024, ge=2, description="K: number of codewords")
        embed_dim: int = Field(256, ge=1, description="D: codeword dimension")
        ema: bool = Field(False, description="EMA codebook instead of the codebook loss (taming: off)")

        @property
        def code_dim(self) -> int:
            return self.embed_dim

    def __init__(self, params=None, **construct) -> None:
        super().__init__(params, **construct)  # channels, resolution
        channels = self.channels
        p = self.params
        self.check_resolution(self.factor)
        arch = dict(ch=p.ch, ch_mult=list(p.ch_mult), num_res_blocks=p.num_res_blocks,
                    attn_resolutions=list(p.attn_resolutions), dropout=p.dropout,
                    resolution=self.resolution[0], z_channels=p.z_channels)
        self.encoder = Encoder(in_channels=channels, out_activation=p.out_activation, **arch)
        self.decoder = Decoder(out_channels=channels, out_activation=p.out_activation,
                               blocks_per_level=p.decoder_res_blocks, **arch)
        self.loss = VQGANLoss(channels, disc_start=p.disc_start, disc_weight=p.disc_weight,
                              codebook_weight=p.codebook_weight, perceptual_weight=p.perceptual_weight,
                              lambda_max=p.lambda_max, diffaug=p.diffaug, disc_layers=p.disc_layers,
                              disc_ndf=p.disc_ndf, perceptual_weights=p.perceptual_weights)
        self.quantize = self.make_quantizer()
        self.quant_conv = nn.Conv2d(p.z_channels, p.code_dim, 1) if p.quant_convs else nn.Identity()
        self.post_quant_conv = nn.Conv2d(p.code_dim, p.z_channels, 1) if p.quant_convs else nn.Identity()

    def make_quantizer(self) -> nn.Module:
        """The quantizer (what ``fsq`` and ``lfq`` replace): returns a ``QuantizerOutput``,
        and has ``lookup(codes)`` and ``health()``."""
        return VectorQuantizer.from_params(self.params)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.params.ch_mult) - 1)

    @classmethod
    def preflight(cls, params) -> list[str]:
        """Files training needs (checked before any stage runs): the LPIPS weights."""
        from genfw_vq.lpips import missing_weights

        if params.perceptual_weight <= 0:
            return []
        problem = missing_weights(params.perceptual_weights)
        return [problem] if problem else []

    @property
    def levels(self) -> list[Level]:
        return [Level(codebook_size=self.params.codebook_size, factor=self.factor)]

    def quantizers(self) -> list[VectorQuantizer]:
        return [self.quantize]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        disc = {id(p) for p in self.loss.discriminator.parameters()}
        return {
            "generator": [p for p in self.parameters() if p.requires_grad and id(p) not in disc],
            "discriminator": [p for p in self.loss.discriminator.parameters() if p.requires_grad],
        }

    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive weight compares gradients."""
        return self.decoder.conv_out.weight

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1] -> quantizer inputs."""
        return self.quant_conv(self.encoder(images * 0.5 + 0.5 if self.params.unit_range else images))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Codewords ``[b, D, h, w]`` -> images in genfw's [-1, 1] scale, not clamped."""
        out = self.decoder(self.post_quant_conv(z))
        return out * 2 - 1 if self.params.unit_range else out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images -> (reconstruction, quantizer output)."""
        q = self.quantize(self._latents(images))
        return self.decode_latents(q.quantized), q

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.quantize(self._latents(images)).codes]

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        (grid,) = codes
        return self.decode_latents(self.quantize.lookup(grid)).clamp(-1, 1)

    def training_step(self, images: torch.Tensor, step: int) -> StepOutput:
        recon, q = self(images)
        losses, logs = self.loss(images, recon, q.loss, step, self.last_layer())
        logs.update(self.quantizer_logs([q]))
        return StepOutput(losses=losses, logs=logs)
