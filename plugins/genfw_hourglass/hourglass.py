"""The hourglass transformer backbone: 2D-aware (megapixel-SUNDAE, §3.2) or 1D (Nawrot et al., 2021).

An hourglass runs ``pre`` transformer layers at full resolution, shortens the sequence by a factor
k, runs the ``valley`` layers (itself an hourglass when several shorten factors are given), and
lengthens it back, adding the residual saved before shortening, then runs ``post`` layers:

    x -> pre -> down(k) -> valley -> up(k) + residual -> post -> logits

Resampling (McKinney & Willcocks, eq. 4): ``h' = A(W R(h) + r)``. In ``2d`` mode R is
space-to-depth by sqrt(k) along each grid axis (a sqrt(k) x sqrt(k) patch becomes one valley
token), W a learned linear map (d*k -> d down, d -> d*k then depth-to-space up), r the residual
(0 down), A the post-resampling attention layer: the pooled token attends to its k tokens (down),
each of the k tokens attends to its valley token (up). Groups are the same 2D patches the linear
resampling uses (the authors' code groups k raster-consecutive tokens instead: a mismatch we fix).
``1d`` mode is Nawrot et al.'s shortening of the flattened sequence: k consecutive raster tokens
(within a row, the width padded to a multiple of k), kept as the ablation baseline of the paper's
"2D-aware downsampling significantly improves" claim. Their causal shift is not needed: this
backbone is bidirectional only (the paper removes the causal constraint).

Positions: 2D axial rotary embeddings on every head of every self-attention layer, with each
level's own grid. Grids not divisible by the patch are zero-padded before shortening and cropped
after lengthening, so odd and non-square grids work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from pydantic import Field, model_validator
from torch import nn

from genfw.interfaces import Backbone, Params
from genfw.nn.attention import CrossBlock, TransformerBlock, init_transformer_weights
from genfw.nn.embedding import GridEmbedding
from genfw.nn.rotary import AxialRotary


class HourglassParams(Params):
    """Params of the ``hourglass`` backbone (defaults: megapixel-SUNDAE FFHQ256, Table 3)."""

    dim: int = Field(1024, ge=1, description="model width d")
    depth: list[int] = Field(
        [3, 16, 3],
        description="layers per stage, outermost first: [pre, valley, post] for one shorten factor; "
                    "[pre1, pre2, valley, post2, post1] for two, and so on (length 2 * len(shorten_factors) + 1)",
    )
    shorten_factors: list[int] = Field(
        [4], description="k per nesting level, outermost first ([4]: 16x16 -> 8x8 valley; [4, 4]: 16x16 -> 8x8 -> 4x4)"
    )
    resampling: Literal["2d", "1d"] = Field(
        "2d", description="2d: sqrt(k) x sqrt(k) patches (the paper); 1d: k consecutive raster tokens (Nawrot et al.)"
    )
    attention_resampling: bool = Field(True, description="post-resampling attention layer after each down/up")
    heads: int = Field(8, ge=1, description="attention heads")
    head_dim: int = Field(64, ge=4, description="features per head (64 in every paper configuration)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of dim")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention and residual branches")
    rotary_max_freq: float = Field(
        10.0, gt=0, description="axial rotary: highest frequency max_freq/2*pi over positions linspace(-1, 1, side)"
    )
    qkv_bias: bool = Field(False, description="bias in the q/k/v projections")
    norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon")
    # The megapixel-SUNDAE code's behaviour, for converted models (genfw convert sundae); the
    # defaults are genfw's (see the module docstring for why it differs).
    rotary_heads: Literal["all", "first"] = Field(
        "all", description="heads that get rotary positions: all, or the first only (the authors' code)"
    )
    resampling_groups: Literal["patch", "raster"] = Field(
        "patch", description="tokens each valley token attends to when resampling: its 2D patch, or k "
                             "raster-consecutive tokens (the authors' code)"
    )
    valley_rotary_max_freq: float | None = Field(
        None, gt=0, description="rotary max_freq of the innermost valley layers (None: rotary_max_freq; the "
                                "authors' code uses int(sqrt(valley tokens)) there and 16 elsewhere)"
    )
    resampling_context_norm: bool = Field(
        True, description="LayerNorm on the attended tokens in the resampling attention (the authors' code: none)"
    )

    @model_validator(mode="after")
    def _check(self) -> HourglassParams:
        if len(self.depth) != 2 * len(self.shorten_factors) + 1:
            raise ValueError(
                f"depth {self.depth} needs 2 * len(shorten_factors) + 1 = {2 * len(self.shorten_factors) + 1} "
                "entries: pre layers outermost first, the valley, post layers innermost first"
            )
        if any(d < 0 for d in self.depth):
            raise ValueError(f"depth entries must be >= 0, got {self.depth}")
        for k in self.shorten_factors:
            if k < 2:
                raise ValueError(f"shorten factors must be >= 2, got {k}")
            if self.resampling == "2d" and math.isqrt(k) ** 2 != k:
                raise ValueError(f"2d resampling needs square shorten factors (4, 9, 16...), got {k}")
        if self.head_dim % 4:
            raise ValueError(f"axial rotary embeddings need head_dim divisible by 4, got {self.head_dim}")
        return self


def _blocks(p: HourglassParams, n: int) -> nn.ModuleList:
    rotary_heads = 1 if p.rotary_heads == "first" else None
    return nn.ModuleList(
        TransformerBlock(p.dim, p.heads, p.head_dim, p.mlp_ratio, p.dropout, p.qkv_bias, p.norm_eps, rotary_heads)
        for _ in range(n)
    )


def _run(blocks: nn.ModuleList, x: torch.Tensor, rotary: AxialRotary) -> torch.Tensor:
    """Self-attention layers over a grid ``[b, h, w, d]`` with that grid's rotary tables."""
    if len(blocks) == 0:
        return x
    _, h, w, _ = x.shape
    tables = rotary(h, w, x.device, x.dtype)
    x = rearrange(x, "b h w d -> b (h w) d")
    for block in blocks:
        x = block(x, rotary=tables)
    return rearrange(x, "b (h w) d -> b h w d", h=h, w=w)


class HourglassLevel(nn.Module):
    """One level: pre layers, shorten, inner level (or plain valley layers), lengthen, post layers.

    With no shorten factors left it is just a stack of ``depth[0]`` layers (the innermost valley).
    """

    def __init__(self, p: HourglassParams, depth: Sequence[int], shorten_factors: Sequence[int]) -> None:
        super().__init__()
        self.pre = _blocks(p, depth[0])
        if not shorten_factors:
            self.inner = None
            return
        k = shorten_factors[0]
        # patch (rows, cols) shortened into one valley token
        self.patch = (math.isqrt(k), math.isqrt(k)) if p.resampling == "2d" else (1, k)
        self.down = nn.Linear(p.dim * k, p.dim)
        self.up = nn.Linear(p.dim, p.dim * k)
        self.raster_groups = p.resampling_groups == "raster"
        attn = (p.dim, p.heads, p.head_dim, p.mlp_ratio, p.dropout, p.qkv_bias, p.norm_eps, p.resampling_context_norm)
        self.down_attention = CrossBlock(*attn) if p.attention_resampling else None
        self.up_attention = CrossBlock(*attn) if p.attention_resampling else None
        self.inner = HourglassLevel(p, depth[1:-1], shorten_factors[1:])
        self.post = _blocks(p, depth[-1])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``[b, h, w, d]`` at the bottom/right to a multiple of the patch."""
        b, h, w, d = x.shape
        ph, pw = self.patch
        height, width = -(-h // ph) * ph, -(-w // pw) * pw
        if height == h and width == w:
            return x
        return torch.nn.functional.pad(x, (0, 0, 0, width - w, 0, height - h))

    def shorten(self, x: torch.Tensor) -> torch.Tensor:
        """Padded grid ``[b, H, W, d]`` -> valley ``[b, H/ph, W/pw, d]`` (space-to-depth, linear, attention)."""
        ph, pw = self.patch
        valley = self.down(rearrange(x, "b (h p1) (w p2) d -> b h w (p1 p2 d)", p1=ph, p2=pw))
        if self.down_attention is None:
            return valley
        b, h, w, _ = valley.shape
        group = self._groups(x)
        pooled = self.down_attention(rearrange(valley, "b h w d -> (b h w) 1 d"), group)
        return rearrange(pooled, "(b h w) 1 d -> b h w d", b=b, h=h, w=w)

    def lengthen(self, valley: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Valley ``[b, h, w, d]`` -> padded grid ``[b, h*ph, w*pw, d]`` (linear, depth-to-space, + residual, attention)."""
        ph, pw = self.patch
        x = rearrange(self.up(valley), "b h w (p1 p2 d) -> b (h p1) (w p2) d", p1=ph, p2=pw) + residual
        if self.up_attention is None:
            return x
        b, h, w, _ = valley.shape
        group = self.up_attention(self._groups(x), rearrange(valley, "b h w d -> (b h w) 1 d"))
        if self.raster_groups:
            return group.reshape(x.shape)
        return rearrange(group, "(b h w) (p1 p2) d -> b (h p1) (w p2) d", b=b, h=h, w=w, p1=ph, p2=pw)

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """Padded grid ``[b, H, W, d]`` -> the tokens of each valley position ``[(b h w), k, d]``."""
        ph, pw = self.patch
        if self.raster_groups:  # valley token n (raster order) <-> tokens n*k .. n*k+k-1 of the raster sequence
            return x.reshape(-1, ph * pw, x.shape[-1])
        return rearrange(x, "b (h p1) (w p2) d -> (b h w) (p1 p2) d", p1=ph, p2=pw)

    def forward(self, x: torch.Tensor, rotary: AxialRotary, valley_rotary: AxialRotary | None = None) -> torch.Tensor:
        """``[b, h, w, d]`` -> ``[b, h, w, d]``; ``valley_rotary`` (if given) serves the innermost layers."""
        if self.inner is None:
            return _run(self.pre, x, valley_rotary or rotary)
        x = _run(self.pre, x, rotary)
        _, h, w, _ = x.shape
        residual = self.pad(x)
        valley = self.inner(self.shorten(residual), rotary, valley_rotary)
        x = self.lengthen(valley, residual)[:, :h, :w]
        return _run(self.post, x, rotary)


class Hourglass(Backbone):
    """Hourglass transformer: embeddings -> nested hourglass levels -> LayerNorm -> linear head."""

    Params = HourglassParams
    supports_causal = False
    causal_unsupported_reason = (
        "the 2D hourglass has no causal masking: its resampling mixes later tokens into earlier ones and the "
        "megapixel-SUNDAE paper removes the causal constraint; use the 'transformer' backbone for autoregressive priors"
    )

    def __init__(self, params: HourglassParams | dict | None = None, **construct) -> None:
        super().__init__(params, **construct)  # vocab_size, out_size, grid, num_classes, context
        p: HourglassParams = self.params
        self.embed = GridEmbedding(self.vocab_size, p.dim, self.num_classes, self.context)
        self.drop = nn.Dropout(p.dropout)
        self.rotary = AxialRotary(p.head_dim, p.rotary_max_freq)
        self.valley_rotary = (AxialRotary(p.head_dim, p.valley_rotary_max_freq)
                              if p.valley_rotary_max_freq is not None and p.shorten_factors else None)
        self.body = HourglassLevel(p, p.depth, p.shorten_factors)
        self.norm = nn.LayerNorm(p.dim, eps=p.norm_eps)
        self.head = nn.Linear(p.dim, self.out_size)
        init_transformer_weights(self)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                context: list[torch.Tensor] | None = None, causal: bool = False) -> torch.Tensor:
        """tokens ``[b, h, w]`` (any grid) -> logits ``[b, h, w, out_size]``; bidirectional only."""
        if causal:
            raise ValueError(f"hourglass cannot be causal: {self.causal_unsupported_reason}")
        x = self.drop(self.embed(tokens, labels, context))
        return self.head(self.norm(self.body(x, self.rotary, self.valley_rotary)))
