"""Datasets: image folders over fsspec, image preprocessing, and sharded latent datasets.

Image datasets are components of kind ``dataset`` (see :class:`genfw.interfaces.ImageDataset`);
built-in ones (``folder``, ``mnist``, ``synthetic``) are registered by the ``genfw_data`` plugin.
Their constructors are cheap (nothing is read until first access) so that recipe validation
can ask for ``channels`` and ``resolution`` without touching the data.
"""

from __future__ import annotations

import io as _io
import os
import struct
import tarfile
import warnings
import zipfile
from functools import cached_property
from typing import Any, Literal

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator

from genfw import checkpoint, io, limits
from genfw.errors import DataError
from genfw.images import make_grid, to_pil  # noqa: F401 - re-exported: their home was this module
from genfw.interfaces import ImageDataset, Params

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_tensor(img: Image.Image, resolution: tuple[int, int], channels: int) -> torch.Tensor:
    """PIL image -> [C, H, W] in [-1, 1]: mode conversion, resize of the short side, centre crop."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale -> 8-bit
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / hi * 255).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)  # alpha over white, not black garbage
    img = img.convert("L" if channels == 1 else "RGB")
    h, w = resolution
    scale = max(h / img.height, w / img.width)
    if scale != 1:
        size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
        img = img.resize(size, Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1


def decode_image(data: bytes, name: str) -> Image.Image:
    """The bytes of an image file -> a decoded PIL image; every way to fail is one :class:`DataError`.

    The size is read from the header and bounded (``GENFW_MAX_IMAGE_PIXELS``) before any pixel is
    decoded, so a decompression bomb (a small file declaring a huge image) costs nothing.
    """
    if not data:
        raise DataError(f"empty (zero-byte) image file: {name}: remove or replace it")
    bound = limits.limit("image_pixels")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < bound:
        Image.MAX_IMAGE_PIXELS = bound  # PIL's own check (an error at twice this) must not be the stricter one

    def bomb(size: str) -> DataError:
        return DataError(f"image {name} {size}, beyond genfw's limit of {bound:,} pixels (a decompression bomb, "
                         "or far too large): remove or downscale it, or raise the limit with GENFW_MAX_IMAGE_PIXELS=N")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(_io.BytesIO(data))
            w, h = img.size
            if w * h > bound:
                raise bomb(f"is {w}x{h} ({w * h:,} pixels)")
            img.load()
        return img
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise bomb(f"declares more than {2 * bound:,} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
            TypeError, MemoryError) as e:
        raise DataError(f"corrupt or unreadable image {name}: {e}: remove or replace it") from None


# --------------------------------------------------------------------------------------------
# image folders


def _as_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


def walk_local(root: str) -> list[str]:
    """Files under a local folder, following symlinked folders (class folders often are); a loop is an error."""
    out: list[str] = []

    def visit(folder: str, ancestors: frozenset) -> None:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            raise DataError(f"symlink loop in the dataset: {folder} leads back to a folder above it: remove the link")
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_dir(follow_symlinks=True):
                visit(e.path, ancestors | {key})
            elif e.is_file(follow_symlinks=True):
                out.append(e.path)

    visit(root, frozenset())
    return out


class ImageFolder(ImageDataset):
    """PNG/JPEG images found recursively under a local path or fsspec URL (``zip://``, ``memory://``...).

    Labels come from the first sub-folder name when ``labels_from_folders`` is set.
    """

    class Params(Params):
        path: str = Field(description="folder or fsspec URL holding the images")
        resolution: int | tuple[int, int] = Field(256, description="output size (square or [H, W])")
        channels: Literal[1, 3] = 3
        labels_from_folders: bool = False
        limit: int | None = Field(None, ge=1, description="use at most this many images")
        storage_options: dict[str, Any] = Field(default_factory=dict)

        @field_validator("resolution")
        @classmethod
        def _positive(cls, v):
            if any(int(x) < 1 for x in _as_pair(v)):
                raise ValueError("resolution must be positive")
            return v

    @property
    def channels(self) -> int:
        return self.params.channels

    @property
    def resolution(self) -> tuple[int, int]:
        return _as_pair(self.params.resolution)

    @cached_property
    def _index(self) -> tuple[Any, list[str], list[int], list[str]]:
        path = self.params.path
        try:
            fs, root = fsspec.core.url_to_fs(path, **self.params.storage_options)
        except (ImportError, ValueError) as e:
            raise DataError(f"cannot open dataset location {path}: {e} (is its fsspec backend installed?)") from None
        except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:  # e.g. zip:// of a corrupt archive
            raise DataError(f"cannot open dataset location {path}: {type(e).__name__}: {e} "
                            "(is the archive complete and of the format its URL says?)") from None
        try:
            if not fs.exists(root):
                raise DataError(f"dataset path does not exist: {path}")
            if not fs.isdir(root):
                raise DataError(f"dataset path is not a folder: {path}")
            if io.is_local(path) and not os.access(root, os.R_OK | os.X_OK):
                raise PermissionError(root)  # a local walk would skip the folder silently
            found = walk_local(root) if io.is_local(path) else fs.find(root)
            files = sorted(f for f in found if f.lower().endswith(IMAGE_SUFFIXES))
        except PermissionError:
            raise DataError(f"dataset path is not readable (permission denied): {path}: fix its permissions "
                            "(chmod -R a+rX) or run as a user who can read it") from None
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {path}")
        if self.params.limit:
            files = files[: self.params.limit]
        names: list[str] = []
        labels = [-1] * len(files)
        if self.params.labels_from_folders:
            rel = [f[len(root.rstrip("/")) + 1 :] for f in files]
            tops = [r.split("/")[0] if "/" in r else "" for r in rel]
            names = sorted({t for t in tops if t})
            if not names:
                raise DataError(f"labels_from_folders is set but {path} has no sub-folders")
            lookup = {n: i for i, n in enumerate(names)}
            labels = [lookup.get(t, -1) for t in tops]
        return fs, files, labels, names

    @property
    def class_names(self) -> list[str]:
        return self._index[3]

    def __len__(self) -> int:
        return len(self._index[1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        fs, files, labels, _ = self._index
        name = files[index]
        try:
            with fs.open(name, "rb") as f:
                data = f.read()
        except PermissionError:
            raise DataError(f"image file is not readable (permission denied): {name}: fix its permissions "
                            "(chmod a+r) or remove it") from None
        except (OSError, ValueError, RuntimeError) as e:  # zip members, remote backends
            raise DataError(f"cannot read image {name}: {e}: check the file or the dataset location") from None
        with decode_image(data, name) as img:
            try:
                if img.mode == "CMYK":
                    img = img.convert("RGB")
                tensor = to_tensor(img, self.resolution, self.channels)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"corrupt or unreadable image {name}: {e}: remove or replace it") from None
        return tensor, labels[index]


class FlipDoubled(torch.utils.data.Dataset):
    """Every item twice: as it is, then flipped horizontally (index >= len is the flip)."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return 2 * len(self.base)

    def __getitem__(self, index: int):
        n = len(self.base)
        image, label = self.base[index % n]
        return (image.flip(-1) if index >= n else image), label


class AsTorchDataset(torch.utils.data.Dataset):
    """Adapter so any :class:`ImageDataset` works with a ``DataLoader``."""

    def __init__(self, base: ImageDataset, indices: list[int] | None = None) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i] if self.indices is not None else i]
        return image, torch.tensor(label, dtype=torch.long)


def split_indices(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed random split into (train, held-out) indices."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    k = int(round(n * holdout)) if holdout > 0 else 0
    k = min(k, n - 1) if n > 1 else 0
    return sorted(perm[k:]), sorted(perm[:k])


def split_halves(indices: list[int], seed: int) -> tuple[list[int], list[int]]:
    """Held-out indices in two disjoint halves (validation, test), fixed by the seed.

    The validation half is for choosing settings (e.g. a sampler's temperature), the test half
    for reporting; with an odd count the test half gets the extra index.
    """
    # a generator of its own, offset from split_indices', so the halves do not mirror that split
    g = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(len(indices), generator=g).tolist()
    half = len(indices) // 2
    return sorted(indices[i] for i in order[:half]), sorted(indices[i] for i in order[half:])


# --------------------------------------------------------------------------------------------
# latent datasets (codes stored as sharded safetensors)


class LatentWriter:
    """Accumulates code grids (+ labels) and writes shards ``shard-00000.safetensors``..."""

    def __init__(self, folder: str | os.PathLike, shard_size: int, meta: dict[str, Any]) -> None:
        self.folder, self.shard_size, self.meta = os.fspath(folder), shard_size, meta
        self._codes: list[list[torch.Tensor]] = []
        self._labels: list[torch.Tensor] = []
        self._count = 0
        self.shards: list[str] = []

    def add(self, codes: list[torch.Tensor], labels: torch.Tensor) -> None:
        self._codes.append([c.to("cpu", torch.int32) for c in codes])
        self._labels.append(labels.to("cpu", torch.int64))
        self._count += labels.shape[0]
        if self._count >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._labels:
            return
        levels = len(self._codes[0])
        tensors = {f"codes.{i}": torch.cat([c[i] for c in self._codes]) for i in range(levels)}
        tensors["labels"] = torch.cat(self._labels)
        name = f"shard-{len(self.shards):05d}.safetensors"
        checkpoint.save_tensors(os.path.join(self.folder, name), tensors, {"type": "latents", **self.meta})
        self.shards.append(name)
        self._codes, self._labels, self._count = [], [], 0

    def close(self) -> list[str]:
        self._flush()
        io.write_json(os.path.join(self.folder, "index.json"), {"shards": self.shards, **self.meta})
        return self.shards


_RE_EXTRACT = "delete its latents/stage.json and run again to extract the latents anew"


class LatentDataset(torch.utils.data.Dataset):
    """Code grids read back from shards: items are ``(codes list, label)``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = os.fspath(folder)
        try:
            index = io.read_json(os.path.join(folder, "index.json"))
        except FileNotFoundError:
            raise DataError(f"no latent dataset in {folder} (index.json missing): run the latents stage") from None
        except ValueError as e:
            raise DataError(f"latent dataset in {folder} is corrupt (index.json: {e}): {_RE_EXTRACT}") from None
        self.meta = index
        try:
            self._read(folder, index)
        except (DataError, checkpoint.CheckpointError) as e:
            raise DataError(f"latent dataset in {folder}: {e}: {_RE_EXTRACT}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise DataError(f"latent dataset in {folder} is corrupt ({type(e).__name__}: {e}): {_RE_EXTRACT}") from None

    def _read(self, folder: str, index: dict[str, Any]) -> None:
        levels_meta = [[int(v) for v in lv] for lv in index["levels"]]
        num_classes = int(index.get("num_classes") or 0)
        codes: list[list[torch.Tensor]] = []
        labels = []
        for shard in index["shards"]:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise DataError(f"invalid shard name {shard!r} in index.json")
            tensors, _ = checkpoint.read(os.path.join(folder, shard))
            level_codes = [tensors[f"codes.{i}"] for i in range(len(levels_meta))]
            n = tensors["labels"].shape[0]
            for i, ((k, h, w), c) in enumerate(zip(levels_meta, level_codes)):
                if tuple(c.shape) != (n, h, w) or c.is_floating_point():
                    raise DataError(f"{shard}: codes.{i} has shape {tuple(c.shape)} ({c.dtype}), expected ({n}, {h}, {w})")
                if c.numel() and (int(c.min()) < 0 or int(c.max()) >= k):
                    raise DataError(f"{shard}: codes.{i} holds codes outside 0..{k - 1}")
            lab = tensors["labels"]
            if lab.ndim != 1 or lab.is_floating_point() or (n and (int(lab.min()) < -1 or int(lab.max()) >= max(num_classes, 1))):
                raise DataError(f"{shard}: labels out of range or of the wrong type")
            codes.append([c.long() for c in level_codes])
            labels.append(lab.long())
        if not codes:
            raise DataError("it is empty")
        self.codes = [torch.cat([c[i] for c in codes]) for i in range(len(codes[0]))]
        self.labels = torch.cat(labels)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return [c[i] for c in self.codes], self.labels[i]
