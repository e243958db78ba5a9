"""The vanilla transformer backbone (Vaswani et al., 2017) over a flattened code grid.

As in Unleashing Transformers (Bond-Taylor et al., §4; a GPT-2-style pre-norm stack of 24 layers,
width 512, 8 heads, learned absolute positions) and, with ``positions: rotary``, with the 2D axial
rotary embeddings of the megapixel-SUNDAE hourglass (§3.2) on every head. Bidirectional for
non-autoregressive priors; causal (``is_causal`` attention) for autoregressive ones, with a
key/value cache so sampling costs one token's work per step. Labels add a class embedding to
every input embedding; coarser code grids of a hierarchical tokenizer are embedded, resized
(nearest) and added.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from pydantic import Field, model_validator
from torch import nn

from genfw.interfaces import Backbone, Params
from genfw.nn.attention import KVCache, TransformerBlock, init_transformer_weights
from genfw.nn.embedding import GridEmbedding
from genfw.nn.rotary import AxialRotary


class TransformerParams(Params):
    """Params of the ``transformer`` backbone (defaults: Unleashing Transformers' prior)."""

    dim: int = Field(512, ge=1, description="model width d")
    depth: int = Field(24, ge=1, description="number of transformer blocks")
    heads: int = Field(8, ge=1, description="attention heads")
    head_dim: int | None = Field(None, ge=1, description="features per head (default dim // heads)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of dim")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention and residual branches")
    positions: Literal["learned", "rotary"] = Field(
        "learned", description="learned absolute embeddings (UT; training grid only) or 2D axial rotary (any grid)"
    )
    rotary_max_freq: float = Field(
        10.0, gt=0, description="rotary: highest frequency max_freq/2*pi over positions linspace(-1, 1, side)"
    )
    qkv_bias: bool = Field(True, description="bias in the q/k/v projection (GPT-2/minGPT has one)")
    norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon")

    @model_validator(mode="after")
    def _check(self) -> TransformerParams:
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}; set head_dim")
        if self.positions == "rotary" and self.resolved_head_dim % 4:
            raise ValueError(f"rotary positions need head_dim divisible by 4, got {self.resolved_head_dim}")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.heads


class Transformer(Backbone):
    """Pre-norm transformer: embeddings -> blocks -> LayerNorm -> linear head to ``out_size``."""

    Params = TransformerParams
    supports_causal = True

    def __init__(self, params: TransformerParams | dict | None = None, **construct) -> None:
        super().__init__(params, **construct)  # vocab_size, out_size, grid, num_classes, context
        p: TransformerParams = self.params
        self.head_dim = p.resolved_head_dim
        self.embed = GridEmbedding(self.vocab_size, p.dim, self.num_classes, self.context)
        self.positions = nn.Parameter(torch.zeros(self.grid[0] * self.grid[1], p.dim)) if p.positions == "learned" else None
        self.rotary = AxialRotary(self.head_dim, p.rotary_max_freq) if p.positions == "rotary" else None
        self.drop = nn.Dropout(p.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(p.dim, p.heads, self.head_dim, p.mlp_ratio, p.dropout, p.qkv_bias, p.norm_eps)
            for _ in range(p.depth)
        )
        self.norm = nn.LayerNorm(p.dim, eps=p.norm_eps)
        self.head = nn.Linear(p.dim, self.out_size, bias=False)
        init_transformer_weights(self)
        if self.positions is not None:
            nn.init.normal_(self.positions, std=0.02)

    def _check_grid(self, h: int, w: int) -> None:
        if self.positions is not None and (h, w) != self.grid:
            raise ValueError(
                f"transformer with learned positions was built for a {self.grid[0]}x{self.grid[1]} grid, got {h}x{w}; "
                "use positions: rotary for other grid sizes (or sample larger grids by windows)"
            )

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                context: list[torch.Tensor] | None = None, causal: bool = False) -> torch.Tensor:
        """tokens ``[b, h, w]`` -> logits ``[b, h, w, out_size]``; ``causal`` masks later raster positions."""
        _, h, w = tokens.shape
        self._check_grid(h, w)
        x = rearrange(self.embed(tokens, labels, context), "b h w d -> b (h w) d")
        if self.positions is not None:
            x = x + self.positions
        rotary = self.rotary(h, w, x.device, x.dtype) if self.rotary is not None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rotary=rotary, causal=causal)
        logits = self.head(self.norm(x))
        return rearrange(logits, "b (h w) v -> b h w v", h=h, w=w)

    # --- incremental decoding ------------------------------------------------------------

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """An empty cache for the ``h * w`` positions of the training grid."""
        h, w = self.grid
        return KVCache.empty(len(self.blocks), batch_size, self.params.heads, h * w, self.head_dim, device, dtype)

    def decode_step(self, token: torch.Tensor, position: int, cache: KVCache,
                    labels: torch.Tensor | None = None, context: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Feed ``token [b]`` at raster ``position``; logits ``[b, out_size]`` = forward(causal=True) there."""
        h, w = self.grid
        if not 0 <= position < cache.capacity:
            raise ValueError(f"position {position} outside the cache's {cache.capacity} positions")
        row, col = divmod(position, w)
        x = self.embed.at(token, row, col, (h, w), labels, context)[:, None, :]  # b 1 d
        if self.positions is not None:
            x = x + self.positions[position]
        x = self.drop(x)
        rotary = self.rotary(h, w, x.device, x.dtype).at(position) if self.rotary is not None else None
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block(x, rotary=rotary, cache=layer_cache, position=position)
        cache.length = position + 1
        return self.head(self.norm(x[:, 0]))
