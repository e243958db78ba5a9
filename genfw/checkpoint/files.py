"""Checkpoint files: describing a module, writing a safetensors file, reading its header and tensors.

The header is checked against the file and genfw's bounds before a tensor is read; nothing here
builds a component (that is :mod:`genfw.checkpoint.rebuild`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from genfw import __version__, io
from genfw.errors import CheckpointError
from genfw.registry import component_name

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a header larger than this is not one of ours
# Sizes a header may claim (genfw.limits: grid_tokens, side, count, extra_bytes). Far beyond any
# real model; they stop a hostile file from making a component that holds no tensor of that size
# (e.g. a grid for a backbone without learned positions) allocate it later, and bound what
# construction may add beyond the file's tensors.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


# --------------------------------------------------------------------------------------------
# describing modules


def describe(module: nn.Module, role: str = "model") -> dict[str, Any]:
    """The metadata entry of a component built through the registry."""
    params = getattr(module, "params", None)
    return {
        "role": role,
        "kind": getattr(module, "kind", "?"),
        "name": component_name(module),
        "params": params.model_dump(mode="json") if params is not None else {},
        "construct": json.loads(json.dumps(getattr(module, "construct", {}))),
        "dist": getattr(module, "_genfw_dist", "genfw"),
        "version": getattr(module, "_genfw_version", __version__),
        "prefix": f"{role}.",
        "nested": _nested(module),
    }


def _nested(module: nn.Module) -> list[dict[str, Any]]:
    """Components built through the registry inside ``module`` (a prior's backbone...), with provenance."""
    out = []
    for path, sub in module.named_modules():
        if not path or getattr(sub, "_genfw_name", None) is None:
            continue
        params = getattr(sub, "params", None)
        out.append({"path": path, "kind": getattr(sub, "kind", "?"), "name": sub._genfw_name,
                    "dist": getattr(sub, "_genfw_dist", "genfw"), "version": getattr(sub, "_genfw_version", __version__),
                    "params": params.model_dump(mode="json") if params is not None else {}})
    return out


def _state_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        # safetensors refuses shared or non-contiguous storage; a clone per tensor is cheap here.
        out[prefix + k] = v.detach().to("cpu").contiguous().clone()
    return out


# --------------------------------------------------------------------------------------------
# saving


def save(
    target: str | os.PathLike,
    modules: nn.Module | dict[str, nn.Module],
    extra: dict[str, Any] | None = None,
) -> None:
    """Save one component, or a bundle ``{role: module}``, to a safetensors file (atomically)."""
    if isinstance(modules, nn.Module):
        modules, kind = {"model": modules}, "model"
    else:
        kind = "bundle"
    components, tensors = [], {}
    for role, module in modules.items():
        entry = describe(module, role)
        components.append(entry)
        tensors.update(_state_tensors(module, entry["prefix"]))
    meta = {
        "format_version": FORMAT_VERSION,
        "genfw_version": __version__,
        "type": kind,
        "components": components,
        "extra": extra or {},
    }
    io.write_bytes(target, st_save(tensors, metadata={"genfw": json.dumps(meta)}))


def save_tensors(target: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save plain tensors (latent shards, training state) with genfw metadata, atomically."""
    full = {"format_version": FORMAT_VERSION, "genfw_version": __version__, **meta}
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    io.write_bytes(target, st_save(data, metadata={"genfw": json.dumps(full)}))


# --------------------------------------------------------------------------------------------
# reading


def read_header(data: bytes, source: str = "file", file_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse and sanity-check a safetensors header: (tensor table, genfw metadata).

    ``data`` is the whole file, or only its first bytes (at least the header) with ``file_size``
    giving the length of the whole file: the checks then need no tensor bytes.
    """
    size = len(data) if file_size is None else file_size
    if size < 8 or len(data) < 8:
        raise CheckpointError(f"{source} is not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise CheckpointError(
            f"{source} is not a valid safetensors file (header length {n} exceeds the file): "
            "it is truncated, corrupt or another format"
        )
    if len(data) < 8 + n:
        raise CheckpointError(f"{source} is truncated inside its header (copy or download it again)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        assert isinstance(header, dict)
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{source} has a corrupt safetensors header (not JSON)") from None
    raw_meta = (header.pop("__metadata__", None) or {}).get("genfw")
    if raw_meta is None:
        raise CheckpointError(f"{source} is a safetensors file but not a genfw checkpoint (no genfw metadata)")
    try:
        meta = json.loads(raw_meta)
        assert isinstance(meta, dict)
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{source} has corrupt genfw metadata (not a JSON object)") from None
    fmt = meta.get("format_version")
    if not isinstance(fmt, int):
        raise CheckpointError(f"{source} has no valid format_version in its metadata")
    if fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} uses checkpoint format {fmt}, newer than this genfw's {FORMAT_VERSION} "
            f"(written by genfw {meta.get('genfw_version', '?')}): upgrade genfw"
        )
    body = size - 8 - n
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
            assert _is_ints([start, end, *shape]) and min([start, end, *shape], default=0) >= 0
            assert isinstance(dtype, str) and isinstance(shape, list)
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"{source}: corrupt header entry for tensor '{key}'") from None
        if end > body or start > end:
            raise CheckpointError(f"{source} is truncated: tensor '{key}' lies beyond the end of the file "
                                  "(copy or download it again)")
        if dtype not in _DTYPES:
            raise CheckpointError(f"{source}: tensor '{key}' has unsupported dtype {dtype}")
        numel = 1
        for s in shape:
            numel *= int(s)
        if numel * torch.tensor([], dtype=_DTYPES[dtype]).element_size() != end - start:
            raise CheckpointError(f"{source}: tensor '{key}' size does not match its shape {shape}")
    return header, meta


def _is_ints(values: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


class Reader:
    """An open checkpoint: the checked header at once, each tensor read only when asked for.

    Local files and fsspec URLs alike are read tensor by tensor with ranged reads straight into
    each tensor's own memory (``readinto``). Loading a model therefore holds the model plus one
    tensor, never a second copy of the file; a memory map (``safetensors.safe_open``) would keep
    every page it touched resident beside the model until closed (measured: 2.0x the model's size
    in peak RSS, against 1.02x this way; tests/test_inspect_memory.py). Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.source = os.fspath(path)
        self._file = None
        try:
            if io.is_local(path):
                local = io.local_path(path)
                self._file = open(local, "rb")  # noqa: SIM115 - closed by close()
                size = os.fstat(self._file.fileno()).st_size
            else:
                try:
                    fs, remote = io.fsspec.core.url_to_fs(self.source)
                    size = fs.size(remote)
                    self._file = fs.open(remote, "rb")
                except (FileNotFoundError, IsADirectoryError):
                    raise
                except io.url_errors() as e:  # no backend, a corrupt zip:// archive...: one line
                    raise CheckpointError(str(io.open_error(self.source, e))) from None
            head = self._file.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and n <= size - 8:
                    head += self._file.read(n)
        except FileNotFoundError:
            self.close()
            raise CheckpointError(f"checkpoint not found: {self.source}") from None
        except IsADirectoryError:
            self.close()
            raise CheckpointError(f"{self.source} is a folder, not a checkpoint file") from None
        except OSError as e:
            self.close()
            raise CheckpointError(f"cannot read checkpoint {self.source}: {e}") from None
        try:
            self.header, self.meta = read_header(head, self.source, file_size=size)
        except CheckpointError:
            self.close()
            raise
        self._body = len(head)  # tensors start after the 8-byte length and the header

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, key: str) -> bool:
        return key in self.header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self.header[key]["dtype"]]

    def meta_tensor(self, key: str) -> torch.Tensor:
        """A tensor on the meta device with the stored shape and dtype (for checks; no memory)."""
        return torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor into memory (straight into its own buffer: one copy, no page cache held)."""
        start, end = self.header[key]["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        self._file.seek(self._body + start)
        view = memoryview(buffer.numpy())
        got = 0
        while got < end - start:  # readinto may return less than asked (remote files, pipes)
            n = self._file.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.source} is truncated: tensor '{key}' (copy or download it again)")
            got += n
        return buffer.view(self.dtype(key)).reshape(self.shape(key))

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, read into memory."""
        return {k: self.get(k) for k in self.header if k.startswith(prefix)}


def read_meta(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor table, genfw metadata) from the header alone: no tensor is read."""
    with Reader(path) as reader:
        return reader.header, reader.meta


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and genfw metadata from a local path or fsspec URL."""
    with Reader(path) as reader:
        return reader.tensors(), reader.meta
