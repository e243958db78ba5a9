"""Nested training state (optimizers, schedulers, RNG) as flat tensors plus a JSON tree: no pickle."""

from __future__ import annotations

from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# nested state (optimizers, schedulers, RNG) without pickle


def pack(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into JSON and tensors (dict keys keep their int/str type)."""
    tensors: dict[str, torch.Tensor] = {}

    def go(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = prefix + path
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {"__dict__": [[_key(k), go(v, f"{path}/{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [go(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [go(v, f"{path}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path} without pickle")

    return go(tree, ""), tensors


def _key(k: Any) -> Any:
    if isinstance(k, (bool, int, str)):
        return k
    raise TypeError(f"unsupported dict key {k!r}")


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {k: unpack(v, tensors) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(unpack(v, tensors) for v in tree["__tuple__"])
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree
