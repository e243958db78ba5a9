"""Lookup-free quantization (Yu et al. 2023, *Language Model Beats Diffusion: Tokenizer is Key
to Visual Generation* (MAGVIT-v2), arXiv:2310.05737, sec. 3.1, eqs. 3-5).

Each of the d channels is quantized to its sign, ``-s`` or ``+s`` (s = ``codebook_scale``), so
the implicit codebook is {-s, s}^d with K = 2^d codes and no lookup. Index: the channels are
bits, the *first* channel the most significant (index = sum_i [z_i > 0] 2^(d-1-i)). Gradients
pass straight through the sign.

Training adds the entropy penalty of eq. 5, with the code distribution of a token taken as
``softmax(-||z - c||^2 * inv_temperature)`` over all K codes (equivalently ``2 z.c``):
``entropy_weight * (E[H(q(z))] - diversity_gamma * H(E[q(z)]))`` (confident per-token
assignments, a used codebook), plus ``commitment_weight * ||z - sg[q]||^2``. Entropies use
``log(max(p, 1e-5))``. Outside training the loss is zero. Memory: the distribution has K
entries per token, so keep d moderate (d <= 14 or so) when training.

Checked against lucidrains/vector-quantize-pytorch ``lookup_free_quantization.py``
(tests/test_fsq_lfq.py): same codes, indices and auxiliary loss on fixed inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genfw.nn.quantizer import CodeUsage, QuantizerOutput

LOG_EPS = 1e-5  # clamp inside the entropies


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(LOG_EPS).log()).sum(-1)


class LookupFreeQuantizer(nn.Module):
    """LFQ over the channel axis of ``[B, d, *spatial]`` inputs; K = 2 ** d codes."""

    def __init__(self, dim: int, *,
                 entropy_weight: float = 0.1,  # weight of the entropy penalty (eq. 5)
                 commitment_weight: float = 0.25,  # weight of ||z - sg[q]||^2
                 diversity_gamma: float = 1.0,  # weight of the codebook entropy inside the penalty
                 inv_temperature: float = 100.0,  # sharpness of the soft code assignment
                 codebook_scale: float = 1.0) -> None:  # s: codes are -s or +s per channel
        super().__init__()
        self.dim, self.codebook_size = dim, 2 ** dim
        self.entropy_weight, self.commitment_weight = entropy_weight, commitment_weight
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature
        self.codebook_scale = codebook_scale
        self.register_buffer("bit_values", 2 ** torch.arange(dim - 1, -1, -1), persistent=False)
        self.usage = CodeUsage(self.codebook_size)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[...]`` -> codes ``[..., d]`` in {-s, s}."""
        bits = (indices[..., None] & self.bit_values) != 0
        return (bits.float() * 2 - 1) * self.codebook_scale

    def codebook(self) -> torch.Tensor:
        """Every code, [K, d], in index order."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self.bit_values.device))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Indices [B, *spatial] -> code vectors [B, d, *spatial]."""
        return torch.movedim(self.indices_to_codes(codes), -1, 1)

    def entropy_terms(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean per-token entropy, entropy of the mean distribution) of rows of ``flat [N, d]``."""
        # -||z - c||^2 equals 2 z.c up to terms constant in c, which the softmax ignores.
        logits = 2 * flat @ self.codebook().t() * self.inv_temperature
        prob = logits.softmax(-1)
        return _entropy(prob).mean(), _entropy(prob.mean(0))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` [B, d, *spatial] (in fp32, even under autocast)."""
        b, d, *spatial = z.shape
        if d != self.dim:
            raise ValueError(f"LFQ with {self.dim} bits got {d} channels")
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z.float(), "b d ... -> (b ...) d")
            hard = torch.where(flat > 0, self.codebook_scale, -self.codebook_scale)
            codes_vec = flat + (hard - flat).detach()  # straight-through
            indices = ((flat > 0).long() * self.bit_values).sum(-1)
            stats = self.usage.usage_stats(indices)
            loss = flat.new_zeros(())
            if self.training:
                per_token, codebook_entropy = self.entropy_terms(flat)
                commitment = F.mse_loss(flat, hard.detach())
                loss = (self.entropy_weight * (per_token - self.diversity_gamma * codebook_entropy)
                        + self.commitment_weight * commitment)
                stats.update(per_token_entropy=per_token.detach(), codebook_entropy=codebook_entropy.detach(),
                             commitment=commitment.detach())
        quantized = torch.movedim(codes_vec.to(z.dtype).reshape(b, *spatial, d), -1, 1)
        return QuantizerOutput(quantized, indices.reshape(b, *spatial), loss, stats)

    def health(self) -> dict[str, float]:
        return self.usage.health()
