"""Input embedding of a code grid: token + class + hierarchical context (public building blocks).

:class:`ClassEmbedding`, :class:`ContextEmbedding` and :class:`GridEmbedding` (both plus the
token embedding) are what a backbone plugin uses to honour ``labels`` and ``context``; see
docs/writing-plugins.md.

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


class ClassEmbedding(nn.Embedding):
    """labels ``[b]`` -> ``[b, d]``: one learned vector per class, added to every position.

    Args:
        num_classes: label classes (> 0; a backbone built with ``num_classes=0`` has none).
        dim: embedding width.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__(int(num_classes), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim != 1:
            raise ValueError(f"labels must be a LongTensor [b], got shape {tuple(labels.shape)}")
        return super().forward(labels)


class ContextEmbedding(nn.ModuleList):
    """Coarser code grids -> ``[b, h, w, d]``: each grid embedded, resized (nearest) to this grid, summed.

    Args:
        context: ``[vocab, h, w]`` (or :class:`genfw.interfaces.ContextSpec`) per coarser level,
            coarsest first, as a backbone receives them.
        dim: embedding width.
    """

    def __init__(self, context: Sequence[Sequence[int]], dim: int) -> None:
        super().__init__(nn.Embedding(int(spec[0]), dim) for spec in context)

    def check(self, context: Sequence[torch.Tensor] | None) -> None:
        given = len(context) if context else 0
        if given != len(self):
            raise ValueError(f"this backbone was built for {len(self)} context grid(s), got {given}")

    def forward(self, context: Sequence[torch.Tensor] | None, grid: tuple[int, int],
                add_to: torch.Tensor | int = 0) -> torch.Tensor | int:
        """``add_to`` plus the context embeddings on an ``(h, w)`` grid (``add_to`` when there is none)."""
        self.check(context)
        h, w = grid
        out = add_to
        for table, ctx in zip(self, context or (), strict=True):
            rows = nearest_index(h, ctx.shape[1], ctx.device)
            cols = nearest_index(w, ctx.shape[2], ctx.device)
            out = out + table(ctx[:, rows][:, :, cols])
        return out

    def at(self, context: Sequence[torch.Tensor] | None, row: int, col: int, grid: tuple[int, int],
           add_to: torch.Tensor | int = 0) -> torch.Tensor | int:
        """``add_to`` plus the context embeddings ``[b, d]`` at (row, col) of an ``(h, w)`` grid."""
        self.check(context)
        h, w = grid
        out = add_to
        for table, ctx in zip(self, context or (), strict=True):
            out = out + table(ctx[:, row * ctx.shape[1] // h, col * ctx.shape[2] // w])
        return out


class GridEmbedding(nn.Module):
    """tokens ``[b, h, w]`` (+ labels ``[b]``, context grids) -> embeddings ``[b, h, w, d]``.

    Token embedding + :class:`ClassEmbedding` + :class:`ContextEmbedding`: the whole input
    conditioning of a backbone in one module. ``labels=None`` means no class embedding.

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
        self.classes = ClassEmbedding(num_classes, dim) if num_classes else None
        self.context = ContextEmbedding(context, dim)

    def _check_labels(self, labels: torch.Tensor | None) -> None:
        if labels is not None and self.classes is None:
            raise ValueError("labels were given but this backbone was built with num_classes=0")

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                context: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens ``[b, h, w]`` -> ``[b, h, w, d]``."""
        self._check_labels(labels)
        self.context.check(context)  # before any work
        x = self.tokens(tokens)
        if labels is not None:
            x = x + self.classes(labels)[:, None, None, :]
        return self.context(context, tuple(tokens.shape[1:]), add_to=x)

    def at(self, token: torch.Tensor, row: int, col: int, grid: tuple[int, int],
           labels: torch.Tensor | None = None, context: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The embedding ``[b, d]`` of ``token [b]`` at (row, col) of an ``grid = (h, w)`` grid."""
        self._check_labels(labels)
        x = self.tokens(token)
        if labels is not None:
            x = x + self.classes(labels)
        return self.context.at(context, row, col, grid, add_to=x)
