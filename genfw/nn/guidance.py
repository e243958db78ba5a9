"""Classifier-free guidance (Ho & Salimans 2022, *Classifier-Free Diffusion Guidance*) for the
priors: train with the label replaced by a learned null class with probability ``label_drop``;
at sampling mix the conditional and unconditional logits,
``uncond + s * (cond - uncond)`` (s = 1: plain conditional sampling), both in one doubled batch.

The scale may follow a schedule over the sampling steps (Muse, Chang et al. 2023,
raises it linearly): ``constant`` (s at every step), ``linear`` (1 at the start -> s at the last
step) or ``cosine`` (the same ends, half a cosine between them).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

GuidanceSchedule = Literal["constant", "linear", "cosine"]
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


def null_class_for(num_classes: int, label_drop: float) -> int | None:
    """The learned "no label" class (index ``num_classes``) of a model trained with label
    dropout, or None when it has none (unconditional, or ``label_drop`` 0)."""
    return num_classes if num_classes and label_drop > 0 else None


def labels_or_null(labels: torch.Tensor | None, n: int, null_class: int | None,
                   device: torch.device) -> torch.Tensor | None:
    """``labels`` as longs on ``device``; without labels, a guidance-trained model's proper
    unconditional mode (the null class for all ``n``), else None."""
    if labels is None:
        return None if null_class is None else torch.full((n,), null_class, device=device)
    return labels.to(device).long()


def check_guidance(scale: float, null_class: int | None, labels: torch.Tensor | None) -> None:
    """Guidance (scale != 1) needs labels to guide towards and a model trained with label dropout."""
    if scale != 1.0 and (null_class is None or labels is None):
        raise ValueError("guidance_scale != 1 needs labels and a model trained with label_drop > 0")


def guidance_at(scale: float, schedule: str, progress: float) -> float:
    """The guidance scale at ``progress`` in [0, 1] of the sampling (1 = the last step)."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * progress
    if schedule == "cosine":
        return 1.0 + (scale - 1.0) * (1 - math.cos(math.pi * progress)) / 2
    raise ValueError(f"unknown guidance schedule {schedule!r}; expected one of {', '.join(GUIDANCE_SCHEDULES)}")


def drop_labels(labels: torch.Tensor | None, null_class: int | None, p: float) -> torch.Tensor | None:
    """``labels`` with each replaced by ``null_class`` with probability ``p`` (training)."""
    if labels is None or null_class is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def guided_logits(backbone: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                  context: list[torch.Tensor] | None, scale: float, null_class: int | None) -> torch.Tensor:
    """Backbone logits (float) for ``x``; with ``scale != 1`` the guided mix of one doubled batch."""
    if scale == 1.0:
        return backbone(x, labels=labels, context=context).float()
    if labels is None or null_class is None:
        raise ValueError("guidance_scale != 1 needs labels and a model trained with label_drop > 0")
    null = torch.full_like(labels, null_class)
    ctx = [torch.cat([c, c]) for c in context] if context else None
    both = backbone(torch.cat([x, x]), labels=torch.cat([labels, null]), context=ctx).float()
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)
