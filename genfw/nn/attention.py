"""Multi-head attention and pre-norm transformer blocks (Vaswani et al., 2017; pre-norm as in GPT-2).

All attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels,
``is_causal`` instead of a materialised mask). Self-attention projects q, k, v with one fused
linear layer; rotary tables (``genfw.nn.rotary``) rotate the queries and keys of every head.
A key/value cache gives one-token-at-a-time causal decoding (autoregressive sampling).
Cross-attention (queries from one sequence, keys/values from another) serves the hourglass's
attention resampling (Nawrot et al., 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genfw.nn.rotary import RotaryTables, apply_rotary


@dataclass
class LayerCache:
    """Keys and values of one attention layer, ``[b, heads, capacity, head_dim]`` each."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class KVCache:
    """Per-layer key/value caches of a causal transformer; ``length`` tokens are filled."""

    layers: list[LayerCache]
    length: int = 0

    @classmethod
    def empty(cls, layers: int, batch_size: int, heads: int, capacity: int, head_dim: int,
              device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """Preallocated zeros for ``capacity`` positions."""
        shape = (batch_size, heads, capacity, head_dim)
        return cls([LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype)) for _ in range(layers)])

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2] if self.layers else 0


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused qkv, optional rotary positions and KV cache."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0, qkv_bias: bool = False,
                 rotary_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        # None: rotary positions on every head; n: on the first n heads only (the megapixel-SUNDAE
        # code rotates the first head_dim features before splitting heads, i.e. head 0 alone)
        self.rotary_heads = rotary_heads
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, rotary: RotaryTables | None = None, causal: bool = False,
                cache: LayerCache | None = None, position: int = 0) -> torch.Tensor:
        """x ``[b, n, d]`` -> ``[b, n, d]``.

        With ``cache`` (one token, n = 1, at raster ``position``) the token's key/value are
        written there and the query attends to positions ``0..position``; ``rotary`` then holds
        that position's tables only.
        """
        # q, k, v stay in their [b, n, h, e] memory layout (transposed views): rotary then runs
        # on contiguous memory and SDPA writes its output so that merging heads is a view.
        qkv = rearrange(self.qkv(x), "b n (three h e) -> b n three h e", three=3, h=self.heads)
        if rotary is not None:
            if self.rotary_heads is None:
                qk = apply_rotary(qkv[:, :, :2], rotary.broadcast(1, 1))  # q and k of every head at once
            else:
                r = self.rotary_heads
                qk = torch.cat((apply_rotary(qkv[:, :, :2, :r], rotary.broadcast(1, 1)), qkv[:, :, :2, r:]), dim=3)
            q, k = qk.unbind(2)
            v = qkv[:, :, 2]
        else:
            q, k, v = qkv.unbind(2)
        q, k, v = (rearrange(t, "b n h e -> b h n e") for t in (q, k, v))
        if cache is not None:
            if x.shape[1] != 1:
                raise ValueError("cached attention takes one token at a time")
            cache.keys[:, :, position] = k[:, :, 0]
            cache.values[:, :, position] = v[:, :, 0]
            k, v = cache.keys[:, :, : position + 1], cache.values[:, :, : position + 1]
            causal = False  # a single query may see every cached (earlier) position
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over keys/values ``context`` (same width)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.q = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x ``[b, n, d]``, context ``[b, m, d]`` -> ``[b, n, d]``."""
        q = rearrange(self.q(x), "b n (h e) -> b h n e", h=self.heads)
        k, v = rearrange(self.kv(context), "b m (two h e) -> two b h m e", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, dropout on both branches."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 qkv_bias: bool = False, norm_eps: float = 1e-5, rotary_heads: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, heads, head_dim, dropout=dropout, qkv_bias=qkv_bias, rotary_heads=rotary_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rotary: RotaryTables | None = None, causal: bool = False,
                cache: LayerCache | None = None, position: int = 0) -> torch.Tensor:
        """x ``[b, n, d]`` -> ``[b, n, d]``; see :meth:`SelfAttention.forward` for the cache."""
        x = x + self.drop(self.attn(self.norm1(x), rotary=rotary, causal=causal, cache=cache, position=position))
        return x + self.drop(self.mlp(self.norm2(x)))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: ``x + attn(norm(x), norm(context))``, then the MLP.

    ``context_norm=False`` attends to the raw context (the megapixel-SUNDAE code's resampling layers).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 qkv_bias: bool = False, norm_eps: float = 1e-5, context_norm: bool = True) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = nn.LayerNorm(dim, eps=norm_eps) if context_norm else nn.Identity()
        self.attn = CrossAttention(dim, heads, head_dim, dropout=dropout, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x ``[b, n, d]``, context ``[b, m, d]`` -> ``[b, n, d]``."""
        x = x + self.drop(self.attn(self.norm_q(x), self.norm_context(context)))
        return x + self.drop(self.mlp(self.norm2(x)))


def init_transformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style initialisation: N(0, std) linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
