"""MaskGIT's mask schedule and the choice of which predictions to keep at a decoding step
(Chang et al. 2022, *MaskGIT: Masked Generative Image Transformer*, sec. 3.2-3.3).

The schedule gamma(r), r in [0, 1], is the fraction of tokens still masked: in training r is
uniform and ceil(gamma(r) N) tokens are masked; in decoding, after step t of T, the
``floor(gamma(t/T) * M)`` least confident of the M tokens unknown at the start are masked again.
Confidence is the probability of the sampled token plus Gumbel noise scaled by
``choice_temperature * (1 - t/T)`` (the randomness annealing of the authors' decoder,
``maskgit/libml/parallel_decode.py`` of google-research/maskgit); tokens known before the
step are never masked again. At least one token is revealed per step and (before the last
step) at least one stays masked.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MaskSchedule = Literal["cosine", "linear", "sqrt", "square"]
MIN_RATIO = 1e-6  # the authors clip gamma into [1e-6, 1]


def mask_ratio(r: float | torch.Tensor, schedule: str) -> float | torch.Tensor:
    """gamma(r): the fraction still masked at progress ``r`` in [0, 1].

    ``cosine`` cos(pi r / 2) (the paper's choice), ``linear`` 1 - r, ``sqrt`` 1 - r^(1/2),
    ``square`` 1 - r^2 (the authors' ``pow0.5`` and ``pow2``).
    """
    tensor = torch.is_tensor(r)
    t = r if tensor else torch.tensor(float(r), dtype=torch.float64)
    if schedule == "cosine":
        g = torch.cos(math.pi / 2 * t)
    elif schedule == "linear":
        g = 1 - t
    elif schedule == "sqrt":
        g = 1 - t ** 0.5
    elif schedule == "square":
        g = 1 - t ** 2
    else:
        raise ValueError(f"unknown mask schedule {schedule!r}; expected cosine, linear, sqrt or square")
    g = g.clamp(MIN_RATIO, 1.0)
    return g if tensor else float(g)


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from U(0, 1) draws."""
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))


def remask(selected_probs: torch.Tensor, unknown: torch.Tensor, unknown_at_start: torch.Tensor,
           ratio: float, schedule: str, choice_temperature: float, noise: torch.Tensor) -> torch.Tensor:
    """Which positions to mask again after a step: bool ``[B, N]``.

    ``selected_probs [B, N]`` the probability of each position's sampled token, ``unknown [B, N]``
    the positions that were masked before the step, ``unknown_at_start [B]`` M per sample,
    ``ratio`` = t/T of this step, ``noise [B, N]`` standard Gumbel draws.
    """
    keep_masked = torch.floor(unknown_at_start.double() * mask_ratio(ratio, schedule)).long()
    # Reveal at least one, and keep at least one masked for the next step.
    keep_masked = torch.clamp(torch.minimum(unknown.sum(1) - 1, keep_masked), min=1)
    confidence = selected_probs.double().clamp_min(1e-30).log() + choice_temperature * (1 - ratio) * noise.double()
    confidence = confidence.masked_fill(~unknown, math.inf)  # known tokens are kept
    rank = confidence.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = least confident
    return unknown & (rank < keep_masked[:, None])
