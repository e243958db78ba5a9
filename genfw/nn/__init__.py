"""Shared building blocks: attention, rotary embeddings, vector quantizers, residual blocks."""
