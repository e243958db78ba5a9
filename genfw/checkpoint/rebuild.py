"""Rebuilding components from checkpoint files: registry -> params -> ``meta`` build -> checked tensors.

Every shape, dtype, size and value a file claims is checked against the component the registry
builds (first on the ``meta`` device) before memory is allocated or a weight is loaded; bundles
are checked for their structure. Reading the file itself is :mod:`genfw.checkpoint.files`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from genfw import limits
from genfw.checkpoint.files import Reader
from genfw.errors import CheckpointError, PluginError
from genfw.limits import BudgetExceeded
from genfw.params import format_validation_error
from genfw.registry import ComponentClash, Registry, UnknownComponent, get_registry

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
