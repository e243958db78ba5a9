"""What every metric shares: images quantised as a PNG stores them, and a module measured in eval mode.

Images are float tensors ``[N, C, H, W]`` in [-1, 1]; for the feature extractors they are
quantised to uint8 (:func:`to_uint8`). No metric lives here: each is in its own module of
:mod:`genfw.metrics`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, C, H, W], rounded as a saved PNG would be."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
