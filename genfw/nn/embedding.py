"""Input embedding of a code grid: token + class + hierarchical context.

The class embedding is added to every token's embedding (the conditioning of the megapixel-SUNDAE
paper, after Parmar et al., 2018). For a lower level of a hierarchical tokenizer (VQ-VAE-2,
Razavi et al., 2019) each coarser code grid gets its own embedding table, is resized to this
grid by nearest neighbour and added. The nearest-neighbour index is computed with integers
(``src = dst * in // out``), so a single position (autoregressive decoding) gets exactly what the
whole grid gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def nearest_index(size_out: int, size_in: int, device: torch.device | str) -> torch.Tensor:
    """Source index along one axis for nearest-neighbour resizing ``size_in -> size_out``."""
    return torch.arange(size_out, device=device) * size_in // size_out


class GridEmbedding(nn.Module):
    """tokens ``[b, h, w]`` (+ labels ``[b]``, context grids) -> embeddings ``[b, h, w, d]``.

    Args:
        vocab_size: input vocabulary (codebook plus special tokens).
        dim: embedding width.
        num_classes: label classes (0: no class embedding).
        context: ``[vocab, h, w]`` per coarser level this grid is conditioned on.
    """

    def __init__(self, vocab_size: int, dim: int, num_classes: int = 0,
                 context: Sequence[Sequence[int]] = ()) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.classes = nn.Embedding(num_classes, dim) if num_classes else None
        self.context = nn.ModuleList(nn.Embedding(int(spec[0]), dim) for spec in context)

    def _check(self, labels: torch.Tensor | None, context: Sequence[torch.Tensor] | None) -> None:
        if labels is not None and self.classes is None:
            raise ValueError("labels were given but this backbone was built with num_classes=0")
        given = len(context) if context else 0
        if given != len(self.context):
            raise ValueError(f"this backbone was built for {len(self.context)} context grid(s), got {given}")

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                context: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens ``[b, h, w]`` -> ``[b, h, w, d]``; labels None means no class embedding."""
        self._check(labels, context)
        x = self.tokens(tokens)
        if labels is not None:
            x = x + self.classes(labels)[:, None, None, :]
        _, h, w = tokens.shape
        for table, grid in zip(self.context, context or (), strict=True):
            rows = nearest_index(h, grid.shape[1], grid.device)
            cols = nearest_index(w, grid.shape[2], grid.device)
            x = x + table(grid[:, rows][:, :, cols])
        return x

    def at(self, token: torch.Tensor, row: int, col: int, grid: tuple[int, int],
           labels: torch.Tensor | None = None, context: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The embedding ``[b, d]`` of ``token [b]`` at (row, col) of an ``grid = (h, w)`` grid."""
        self._check(labels, context)
        x = self.tokens(token)
        if labels is not None:
            x = x + self.classes(labels)
        h, w = grid
        for table, ctx in zip(self.context, context or (), strict=True):
            x = x + table(ctx[:, row * ctx.shape[1] // h, col * ctx.shape[2] // w])
        return x
