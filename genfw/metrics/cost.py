"""Cost: wall time of a call (:func:`timed`, for sampling time per image) and the FLOPs of one
training step (:func:`training_step_flops`, for training cost)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def training_step_flops(model: nn.Module, batch: dict[str, Any]) -> int:
    """FLOPs of one training step's forward and backward (``model.loss(**batch)``'s main loss),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; the
    optimizer step and elementwise work are not counted). Gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            loss = model.loss(**batch).losses["main"]
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return int(counter.get_total_flops())


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Call ``fn(*args, **kwargs)``; return (its result, wall seconds), waiting for CUDA work.

    Divide by the number of images for sampling time per image.
    """
    _synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    _synchronize()
    return result, time.perf_counter() - start
