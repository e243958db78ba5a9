"""Shared building blocks: attention, rotary embeddings, vector quantizers, residual blocks.

Conditioning blocks for backbone plugins (documented in docs/writing-plugins.md):
:class:`GridEmbedding` (tokens + class + context), :class:`ClassEmbedding`, :class:`ContextEmbedding`.
"""

from genfw.nn.embedding import ClassEmbedding, ContextEmbedding, GridEmbedding

__all__ = ["ClassEmbedding", "ContextEmbedding", "GridEmbedding"]
