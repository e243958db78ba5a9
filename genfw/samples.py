"""Writing sampled images: one PNG per image (label in the name), a grid, the codes."""

from __future__ import annotations

import io as _io
import os
import re

import torch

from genfw import checkpoint, io
from genfw.images import make_grid, to_pil


def safe_name(name: str) -> str:
    """A class name fit for a file name: no separators or odd characters (names come from files)."""
    return re.sub(r"[^\w.-]", "_", str(name)).lstrip(".")[:64] or "_"


def image_name(index: int, label: int | None, class_names: list[str]) -> str:
    suffix = ""
    if label is not None:
        suffix = f"_class-{safe_name(class_names[label]) if label < len(class_names) else label}"
    return f"{index:05d}{suffix}.png"


def write_images(folder: str, images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str],
                 start: int = 0) -> list[str]:
    """Write ``images`` as ``{start + i:05d}[_class-NAME].png``; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        buf = _io.BytesIO()
        to_pil(image).save(buf, format="PNG")
        path = os.path.join(folder, image_name(start + i, int(labels[i]) if labels is not None else None, class_names))
        io.write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def write_grid(path: str, images: torch.Tensor, columns: int | None = None) -> None:
    buf = _io.BytesIO()
    make_grid(images, columns).save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())


def write_samples(folder: str, images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str],
                  columns: int | None = None, codes: list[torch.Tensor] | None = None, pngs: bool = True) -> None:
    """One PNG per image (label in the name when conditional), ``grid.png`` and the codes.

    ``pngs=False``: the per-image PNGs were written already (as they were made, by the rank
    that made them under ``torchrun``).
    """
    if pngs:
        write_images(folder, images, labels, class_names)
    if columns is None and labels is not None:
        columns = len(set(labels.tolist())) if len(set(labels.tolist())) > 1 else None
    write_grid(os.path.join(folder, "grid.png"), images, columns)
    if codes is not None:
        tensors = {f"codes.{i}": c for i, c in enumerate(codes)}
        if labels is not None:
            tensors["labels"] = labels
        checkpoint.save_tensors(os.path.join(folder, "codes.safetensors"), tensors, {"type": "samples"})
