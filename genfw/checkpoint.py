"""Self-describing safetensors checkpoints: models, bundles and training state, without pickle.

Every file is an ordinary ``.safetensors`` file whose header metadata holds one key, ``genfw``,
a JSON document::

    {"format_version": 1, "genfw_version": "0.1.0", "type": "model" | "bundle" | "train_state",
     "components": [{"role": "model", "kind": "prior", "name": "sundae",
                     "params": {...}, "construct": {...},
                     "dist": "genfw", "version": "0.1.0", "prefix": "model."}],
     "extra": {...}}

Loading goes registry -> pydantic params -> constructor (first on the ``meta`` device, so that a
hostile header cannot make us allocate memory before its shapes are checked against the tensors
actually in the file) -> ``load_state_dict(strict=True)``. Metadata can only name registered
components, never an import path. See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from genfw import __version__, io, limits
from genfw.errors import CheckpointError, PluginError
from genfw.limits import BudgetExceeded
from genfw.registry import ComponentClash, Registry, UnknownComponent, component_name, get_registry

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


# --------------------------------------------------------------------------------------------
# rebuilding modules


@dataclass
class Bundle:
    """A whole pipeline in one file: modules by role (``tokenizer``, ``prior.0``...) and extras."""

    modules: dict[str, nn.Module]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> nn.Module:
        return self.modules["tokenizer"]

    @property
    def priors(self) -> list[nn.Module]:
        keys = sorted((k for k in self.modules if k.startswith("prior.")), key=lambda k: int(k.split(".")[1]))
        return [self.modules[k] for k in keys]


def _entry_or_error(registry: Registry, comp: dict[str, Any], source: str):
    """The registry entry a described component needs, or an error naming its distribution."""
    try:
        return registry.get(comp["kind"], comp["name"])
    except ComponentClash as e:
        raise PluginError(f"{source} needs {comp['kind']} '{comp['name']}', but {e}") from None
    except UnknownComponent:
        dist, version = comp.get("dist"), comp.get("version", "?")
        what = f"{source} needs {comp['kind']} '{comp['name']}'"
        if not dist:
            raise PluginError(f"{what}, which no installed plugin registers (the file does not say which "
                              f"distribution provided it){registry.broken_hint()}") from None
        broken = registry.broken_hint(dist)
        if broken:
            raise PluginError(f"{what} from the distribution '{dist}' (version {version}), which is installed "
                              f"but failed to load{broken}") from None
        raise PluginError(f"{what} from the distribution '{dist}' (version {version}), which is not installed: "
                          f"pip install {dist}") from None


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


class _Tensors:
    """A dict of tensors seen through the :class:`Reader` interface (for :func:`build_component`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def meta_tensor(self, key: str) -> torch.Tensor:
        return torch.empty(self._t[key].shape, dtype=self._t[key].dtype, device="meta")

    def get(self, key: str) -> torch.Tensor:
        return self._t[key]


def build_component(comp: dict[str, Any], tensors: dict[str, torch.Tensor] | Reader, source: str,
                    registry: Registry | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild one described component and load its tensors strictly.

    ``tensors`` is a dict or an open :class:`Reader`; with a reader, shapes are checked from
    the header and each tensor is read and copied into the module one at a time.
    """
    registry = registry or get_registry()
    store = tensors if isinstance(tensors, Reader) else _Tensors(tensors)
    for key in ("kind", "name", "params", "construct", "prefix"):
        if key not in comp:
            raise CheckpointError(f"{source}: component metadata lacks '{key}'")
    entry = _entry_or_error(registry, comp, source)
    nested = comp.get("nested") or []
    if not isinstance(nested, list) or not all(
            isinstance(n, dict) and isinstance(n.get("kind"), str) and isinstance(n.get("name"), str) for n in nested):
        raise CheckpointError(f"{source}: corrupt 'nested' metadata of {comp['kind']} '{comp['name']}'")
    for inner in nested:
        _entry_or_error(registry, inner, source)
    prefix = comp["prefix"]
    names = {k[len(prefix):]: k for k in store.keys() if k.startswith(prefix)}
    state = {k: store.meta_tensor(full) for k, full in names.items()}  # shapes and dtypes only
    module = build_checked(comp["kind"], comp["name"], comp["params"], comp["construct"], state, source,
                           registry=registry, entry=entry, exact_dtypes=True, read=lambda k: store.get(names[k]))
    return module.to(device)


def build_checked(kind: str, name: str, params: Any, construct: dict[str, Any], state: dict[str, torch.Tensor],
                  source: str, *, fresh: Any = (), registry: Registry | None = None, entry: Any = None,
                  exact_dtypes: bool = False, read: Callable[[str], torch.Tensor] | None = None) -> nn.Module:
    """Build a registered component whose weights come from a file, checking before allocating.

    The one path for ``genfw.load`` and converters: params validated -> construction sizes bounded ->
    a build on the ``meta`` device whose tensor names and shapes must match ``state`` and whose
    size must be in proportion to it -> the real build -> ``load_state_dict(strict=True)``.
    Only shapes of ``state`` are looked at before the checks pass (memory-mapped tensors stay
    unread). Names in ``fresh`` may be absent from ``state``: they keep their freshly built values.
    Every floating tensor must be finite; with ``exact_dtypes`` (genfw's own files) stored dtypes
    must be the ones the model holds, where a converter's foreign file may be cast.
    With ``read`` (name -> tensor), ``state`` may hold meta tensors (shapes and dtypes only) and
    each tensor is read, checked finite and copied in one at a time: the module plus one tensor in
    memory, not two models.
    """
    registry = registry or get_registry()
    entry = entry or registry.get(kind, name)
    cls = entry.load()
    comp = {"kind": kind, "name": name, "construct": construct}
    try:
        params = cls.Params.model_validate(params.model_dump() if hasattr(params, "model_dump") else params)
    except Exception as e:  # noqa: BLE001
        from pydantic import ValidationError

        from genfw.config import format_validation_error

        msg = format_validation_error(e, "params") if isinstance(e, ValidationError) else " ".join(str(e).splitlines()[:3])
        raise CheckpointError(f"{source}: params of {kind} '{name}' are invalid: {msg}") from None
    _check_sizes(comp, source)
    if read is None:  # with read, each tensor is checked as it is read
        _check_finite(state, comp, source)
    fresh = set(fresh)
    # A first build on the meta device checks shapes against the file without allocating; the
    # budget stops it as soon as it creates far more tensors or modules than the file holds.
    try:
        with _file_budget(comp, state, source, extra=len(fresh)), torch.device("meta"):
            probe = cls(params, **construct)
        expected = probe.state_dict()
        _check_state(expected, {**{k: expected[k] for k in fresh if k in expected}, **state}, comp, source)
        if exact_dtypes:
            _check_dtypes(expected, state, comp, source)
        _check_bytes(probe, state, comp, source)
        del probe, expected
    except (CheckpointError, BudgetExceeded) as e:
        raise CheckpointError(str(e)) from None
    except PluginError:
        raise
    except Exception:  # noqa: BLE001 - some modules cannot be built on meta; the strict load still checks
        pass
    try:
        with _file_budget(comp, state, source, extra=len(fresh), bound_bytes=True):
            module = cls(params, **construct)
    except BudgetExceeded as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{source}: cannot build {kind} '{name}' from its metadata: "
                              f"{type(e).__name__}: {e}") from None
    module._genfw_name = entry.name
    module._genfw_dist, module._genfw_version = entry.dist, entry.version
    own = module.state_dict()
    full = {**{k: own[k] for k in fresh if k in own}, **state}
    _check_state(own, full, comp, source)
    if exact_dtypes:
        _check_dtypes(own, state, comp, source)
    if read is None:
        module.load_state_dict(full, strict=True)
    else:
        with torch.no_grad():
            for key, dest in own.items():  # names and shapes were checked: a strict load
                if key in state:
                    value = read(key)
                    _check_finite({key: value}, comp, source)
                    dest.copy_(value)
    module.eval()
    return module


def _check_sizes(comp: dict[str, Any], source: str) -> None:
    """Bound the standard construction sizes (grid, resolution, codebook...) before any build."""
    construct = comp["construct"]
    if not isinstance(construct, dict):
        raise CheckpointError(f"{source}: construct of {comp['kind']} '{comp['name']}' is not a mapping")

    def ints(key: str, value: Any, limit: int) -> list[int]:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{source}: {comp['kind']} '{comp['name']}' has an invalid {key} {value!r}")
        if any(v < 0 or v > limit for v in values):
            raise CheckpointError(f"{source}: {comp['kind']} '{comp['name']}' claims {key} {value}, beyond genfw's "
                                  f"limit of {limit}: the file is corrupt or hostile")
        return values

    def grid(key: str, value: Any) -> None:
        h, w = (ints(key, value, limits.limit("grid_tokens")) + [1])[:2]
        if h * w > limits.limit("grid_tokens"):
            raise CheckpointError(f"{source}: {comp['kind']} '{comp['name']}' claims a {key} of shape {h}x{w} ({h * w} "
                                  f"tokens), beyond genfw's limit of {limits.limit('grid_tokens')} tokens (GENFW_MAX_GRID_TOKENS): the file is corrupt or hostile")

    for key in ("codebook_size", "num_classes", "channels"):
        if construct.get(key) is not None:
            ints(key, construct[key], limits.limit("count"))
    if construct.get("resolution") is not None:
        ints("resolution", construct["resolution"], limits.limit("side"))
    if construct.get("grid") is not None:
        grid("grid", construct["grid"])
    if not isinstance(construct.get("context") or [], list):
        raise CheckpointError(f"{source}: {comp['kind']} '{comp['name']}' has an invalid context {construct['context']!r}")
    for item in construct.get("context") or []:
        if not isinstance(item, list) or len(item) != 3:
            raise CheckpointError(f"{source}: {comp['kind']} '{comp['name']}' has an invalid context entry {item!r}")
        ints("context codebook_size", item[0], limits.limit("count"))
        grid("context grid", item[1:])


def _file_budget(comp: dict[str, Any], state: dict[str, torch.Tensor], source: str, extra: int = 0,
                 bound_bytes: bool = False):
    """What building a component from a file may create: in proportion to the tensors in the file.

    Every parameter is in the file (loading is strict); non-persistent buffers and modules
    without tensors get generous slack. A header asking for a depth-20000 backbone next to the
    tensors of a depth-1 one is stopped after a few layers, not after minutes of building.
    """
    n = len(state) + extra
    return limits.construction_budget(
        f"{source}: {comp['kind']} '{comp['name']}'", max_tensors=2 * n + 64, max_modules=8 * n + 256,
        max_bytes=2 * limits.tensor_bytes(state.values()) + limits.limit("extra_bytes") if bound_bytes else None,
        reason=f" for the {n} tensors in the file: the file is corrupt or hostile")


def _check_finite(state: dict[str, torch.Tensor], comp: dict[str, Any], source: str) -> None:
    """Refuse NaN or inf in any floating tensor: a model with them samples garbage without a word."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor '{key}' of {comp['kind']} '{comp['name']}' holds {bad} NaN/inf "
                                  "value(s): the file is corrupt (or was saved after training diverged); "
                                  "use an earlier checkpoint")


def _check_dtypes(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], comp, source) -> None:
    """Stored dtypes must be the ones the described model holds (no silent conversion)."""
    for k, v in expected.items():
        if k in got and got[k].dtype != v.dtype:
            raise CheckpointError(
                f"{source}: tensor '{k}' of {comp['kind']} '{comp['name']}' is stored as "
                f"{str(got[k].dtype).removeprefix('torch.')} but the model it describes holds "
                f"{str(v.dtype).removeprefix('torch.')}: the file was altered or written by another tool"
            )


def _check_bytes(probe: nn.Module, state: dict[str, torch.Tensor], comp, source) -> None:
    """What the real build would allocate (known from the meta build) must be in proportion to the file."""
    tensors = {id(t): t for t in [*probe.parameters(), *probe.buffers()]}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    have = sum(t.numel() * t.element_size() for t in state.values())
    if need > 2 * have + limits.limit("extra_bytes"):
        raise CheckpointError(
            f"{source}: building {comp['kind']} '{comp['name']}' from its metadata would allocate {need / 2**30:.1f} GiB "
            f"for {have / 2**20:.1f} MiB of tensors in the file: the file is corrupt or hostile"
        )


def _check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], comp, source) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match the metadata of {comp['kind']} '{comp['name']}' "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for k, v in expected.items():
        if tuple(v.shape) != tuple(got[k].shape):
            raise CheckpointError(
                f"{source}: tensor '{k}' of {comp['kind']} '{comp['name']}' has shape "
                f"{tuple(got[k].shape)} but the metadata describes {tuple(v.shape)}"
            )


def load(path: str | os.PathLike, registry: Registry | None = None, device: str | torch.device = "cpu"):
    """Rebuild the module (or :class:`Bundle`) saved at ``path`` — a local path or fsspec URL.

    The file is read tensor by tensor into the module (:class:`Reader`): loading needs about the
    model's size in memory, not twice it.
    """
    source = os.fspath(path)
    with Reader(path) as reader:
        meta = reader.meta
        kind = meta.get("type")
        comps = meta.get("components")
        if kind not in ("model", "bundle") or not isinstance(comps, list) or not comps:
            raise CheckpointError(f"{source} holds genfw data of type '{kind}', not a model or bundle")
        _check_structure(kind, comps, meta.get("extra", {}), source)
        modules = {c.get("role", "model"): build_component(c, reader, source, registry, device) for c in comps}
    if kind == "model":
        return modules["model"]
    return Bundle(modules, meta.get("extra", {}))


def _check_structure(kind: str, comps: list[Any], extra: Any, source: str) -> None:
    """Roles, kinds and field types of a model or bundle, before anything is built."""
    for c in comps:
        if not isinstance(c, dict):
            raise CheckpointError(f"{source}: a component entry is {type(c).__name__}, not a mapping: the file is corrupt")
        for key in ("role", "kind", "name", "prefix"):
            if not isinstance(c.get(key, "model" if key == "role" else None), str):
                raise CheckpointError(f"{source}: component {key} {c.get(key)!r} is not a string: the file is corrupt")
    roles = [c.get("role", "model") for c in comps]
    if len(set(roles)) != len(roles):
        raise CheckpointError(f"{source}: roles {roles} repeat: the file is corrupt")
    prefixes = sorted(c["prefix"] for c in comps)
    if any(b.startswith(a) for a, b in zip(prefixes, prefixes[1:])):
        raise CheckpointError(f"{source}: tensor prefixes {prefixes} overlap: the file is corrupt")
    if kind == "model":
        if roles != ["model"]:
            raise CheckpointError(f"{source}: a single-model file must hold one component with role 'model', "
                                  f"got roles {roles}")
        return
    kinds = dict(zip(roles, (c["kind"] for c in comps)))
    priors = sorted(r for r in roles if r != "tokenizer")
    expected = [f"prior.{i}" for i in range(len(priors))]
    if kinds.get("tokenizer") != "tokenizer" or sorted(priors, key=lambda r: (len(r), r)) != expected or any(
            kinds[r] != "prior" for r in priors):
        raise CheckpointError(
            f"{source}: a bundle needs a 'tokenizer' (kind tokenizer) and 'prior.0', 'prior.1'... (kind prior); "
            f"it holds {', '.join(f'{r} ({kinds[r]})' for r in roles)}: the file is corrupt or not a genfw bundle")
    if not isinstance(extra, dict):
        raise CheckpointError(f"{source}: bundle extras are {type(extra).__name__}, not a mapping: the file is corrupt")
    if not isinstance(extra.get("sampler") or {}, dict):
        raise CheckpointError(f"{source}: stored sampler params are {type(extra['sampler']).__name__}, not a mapping: "
                              "the file is corrupt")
    names = extra.get("class_names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{source}: stored class_names are not a list of strings: the file is corrupt")


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
