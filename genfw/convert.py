"""What the converters of other projects' checkpoints share (the converters themselves are plugins).

A converter reads the foreign file with :func:`read_torch_file` (``torch.load(weights_only=True)``:
tensors and plain containers only, never code), names every tensor it uses or drops through a
:class:`KeyMap` (a tensor neither used nor dropped is an error; dropped ones are listed in the
output's metadata), and builds the genfw component with :func:`genfw.checkpoint.build_checked`,
which bounds the construction sizes and checks a ``meta``-device build against the tensors' shapes
before allocating anything. Hyper-parameters that the file does not hold come from a small
JSON/TOML/YAML file (:func:`read_config`). See docs/converting.md.

Converters are a registered kind like the others: :func:`run` is the one way to call one (``genfw
convert`` and ``genfw.testing.check_converter`` use it). It checks the options against the
converter's signature and validates ``--set`` values with the converter's ``Params`` (a pydantic
model attached to the function, see :func:`overrides_of`), so a typo fails in one line naming the
key and the allowed ones, and an error the converter then raises names the ``--set`` it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from genfw import checkpoint, limits
from genfw.errors import CheckpointError, ConfigError, GenfwError
from genfw.interfaces import Params
from genfw.registry import get_registry

MAX_CONFIG_BYTES = 1 << 20  # a hyper-parameter file larger than this is not one


# File signatures of what users give converters by mistake (torch.save writes a zip archive,
# or, in its legacy format, a pickle starting with 0x80).
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"\x1f\x8b", "a gzip archive"), (b"%PDF", "a PDF document"), (b"BM", "a BMP image"),
               (b"\x93NUMPY", "a NumPy .npy array"), (b"\x89HDF", "an HDF5 (Keras/h5py) file"))


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, from its first bytes; None if it may be one."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return f"{path} is empty (0 bytes), not a PyTorch checkpoint"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return f"{path} is {what}, not a PyTorch checkpoint (a file written by torch.save)"
    if len(head) > 8 and head[8:9] == b"{":
        return (f"{path} looks like a safetensors file, not a PyTorch checkpoint: a genfw model file needs no "
                "conversion (genfw inspect it)")
    return (f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive or a pickle, and this file "
            f"starts with {head[:8]!r}")


def _safe_load_error(path: Path, e: BaseException) -> CheckpointError:
    """torch's weights_only error without its advice to load unsafely; which global was blocked, if one was."""
    import re

    text = str(e)
    blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if blocked:
        return CheckpointError(
            f"cannot read {path} safely: it holds Python objects besides tensors ({blocked.group(1)} is not allowed "
            "in a safe load): save just its weights where it was written: "
            "torch.save(torch.load(ckpt)['state_dict'], 'weights.pt'), and convert that")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
             and "likely succeed" not in ln and not ln.startswith(("(1)", "(2)", "Please", "Check the"))]
    first = lines[0] if lines else type(e).__name__
    return CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({first}): is it complete, and a file "
                           "torch.save wrote?")


def read_torch_file(path: str | os.PathLike) -> Any:
    """Load a user's own ``.pt``/``.th``/``.ckpt`` safely: tensors and plain containers only.

    Memory-mapped when the file is in torch's zip format, so tensors are read only when used. A
    file that is not one (an image, text) is named for what it is; genfw never suggests loading
    with ``weights_only=False``, which would run code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    problem = _not_a_torch_file(path)
    if problem:
        raise CheckpointError(problem)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        raise _safe_load_error(path, e) from None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A hyper-parameter file (``.json``, ``.toml``, ``.yaml``/``.yml``) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hyper-parameter file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a hyper-parameter file")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: hyper-parameter files are .json, .toml or .yaml, not '{suffix}'")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not valid {suffix[1:].upper()}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a mapping of hyper-parameters")
    return data


def hyper_parameters(config: str | None, preset: str | None, overrides: dict[str, Any] | None,
                     presets: dict[str, dict[str, Any]], used: set[str], what: str,
                     defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hyper-parameters a file lacks: a named preset, then a config file, then ``--set`` overrides.

    Only the names in ``used`` are read from a config file (the authors' files hold training
    settings too); an override of another name is an error. ``defaults`` are the values the
    authors' code sets for every dataset (a config file written by an older version may lack them).
    """
    h: dict[str, Any] = dict(defaults or {})
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown {what} preset '{preset}'; presets: {', '.join(presets)}")
        h.update(presets[preset])
    if config is not None:
        h.update(read_config(config))  # UT's H holds training fields too; only `used` ones are read
    bad = sorted(set(overrides or {}) - used)
    if bad:
        raise ConfigError(f"--set {bad[0]}: not a hyper-parameter the {what} converter uses ({', '.join(sorted(used))})")
    h.update(overrides or {})
    if config is None and preset is None:
        raise ConfigError(f"the {what} file holds no hyper-parameters: pass --config HPARAMS.json (the H it was "
                          f"trained with) or --preset {'|'.join(presets)}")
    missing = sorted(k for k in used if k not in h and k != "dataset")
    if missing:
        raise ConfigError(f"the {what} hyper-parameters lack {missing[:5]}")
    return h


def tensor_dict(obj: Any, source: str, what: str) -> dict[str, torch.Tensor]:
    """``obj`` as a flat ``{name: tensor}`` state dict (a leading ``module.`` of DataParallel stripped)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} does not hold a {what} state dict (it holds a {type(obj).__name__})")
    if isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{source} is a PyTorch Lightning checkpoint (it holds a state_dict), not a {what} "
                              "state dict (taming-transformers .ckpt files convert with genfw convert taming)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries {bad[:3]} of the {what} state dict are not named tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


class KeyMap:
    """Explicit key mapping from a foreign state dict to a genfw one.

    ``take`` / ``put`` use tensors, ``drop`` names those left out on purpose; ``finish`` fails on
    any tensor neither used nor dropped, so a file of another layout cannot half-convert.
    """

    def __init__(self, state: dict[str, torch.Tensor], source: str, fmt: str) -> None:
        self.state, self.source, self.fmt = state, source, fmt
        self.used: set[str] = set()
        self.dropped: list[str] = []
        self.out: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}  # genfw key -> foreign key(s), for messages

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, ndim: int | None = None) -> torch.Tensor:
        """The tensor ``key``; one-line error when the file lacks it (or it has the wrong rank)."""
        if key not in self.state:
            raise CheckpointError(f"{self.source}: this {self.fmt} file lacks '{key}', which the hyper-parameters "
                                  "imply (a partial file, or hyper-parameters that do not match it?)")
        t = self.state[key]
        if ndim is not None and t.ndim != ndim:
            raise CheckpointError(f"{self.source}: tensor '{key}' has shape {tuple(t.shape)}, expected {ndim} dimensions")
        self.used.add(key)
        return t

    def put(self, ours: str, tensor: torch.Tensor, theirs: str) -> None:
        self.out[ours] = tensor
        self.origin[ours] = theirs

    def copy(self, theirs: str, ours: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``ours`` = ``theirs`` (through ``fn``)."""
        t = self.take(theirs)
        self.put(ours, fn(t) if fn else t, theirs)

    def copy_prefix(self, theirs: str, ours: str, names: Iterable[str] = ("weight", "bias")) -> None:
        for n in names:
            self.copy(f"{theirs}.{n}", f"{ours}.{n}")

    def drop(self, predicate: Callable[[str], bool] | str) -> None:
        """Leave out the tensors whose name starts with ``predicate`` (a prefix) or satisfies it."""
        test = (lambda k: k.startswith(predicate)) if isinstance(predicate, str) else predicate
        for k in self.state:
            if k not in self.used and k not in self.dropped and test(k):
                self.dropped.append(k)

    def finish(self) -> dict[str, torch.Tensor]:
        """The genfw state dict; fails on tensors neither used nor dropped."""
        unknown = [k for k in self.state if k not in self.used and k not in self.dropped]
        if unknown:
            raise CheckpointError(f"{self.source}: tensors with no place in the {self.fmt} model described: "
                                  f"{unknown[:4]}{'...' if len(unknown) > 4 else ''} (another kind of file, or "
                                  "hyper-parameters that do not match it?)")
        return self.out


def build(kind: str, name: str, params: dict[str, Any], construct: dict[str, Any], keys: KeyMap,
          *, fresh: Iterable[str] = ()) -> torch.nn.Module:
    """Build the genfw component from ``keys``' mapped tensors, checked before allocating.

    A shape mismatch names the foreign tensor and the hyper-parameters that predicted another shape.
    """
    state = keys.finish()
    try:
        return checkpoint.build_checked(kind, name, params, construct, state, keys.source, fresh=fresh)
    except CheckpointError as e:
        msg = str(e)
        for ours, theirs in sorted(keys.origin.items(), key=lambda kv: -len(kv[0])):
            if f"'{ours}'" in msg:
                msg = msg.replace(f"'{ours}'", f"'{theirs}' (genfw '{ours}')", 1)
                break
        msg = msg.replace("but the metadata describes", "but the hyper-parameters given describe")
        msg = msg.replace("do not match the metadata of", "do not match the hyper-parameters given for")
        raise CheckpointError(msg) from None


def save(out: str | os.PathLike, module: torch.nn.Module, fmt: str, source: str, keys: KeyMap,
         extra: dict[str, Any] | None = None) -> None:
    """Write the converted component, recording where it came from and what was left out."""
    checkpoint.save(out, module, extra={"converted_from": fmt, "source": os.path.basename(source),
                                        "dropped": keys.dropped, **(extra or {})})


def build_state(kind: str, name: str, params: dict[str, Any], construct: dict[str, Any],
                state: dict[str, torch.Tensor], source: str, *, fresh: Iterable[str] = ()) -> torch.nn.Module:
    """Build a genfw component from ``state`` already in genfw's tensor names, every shape and
    name checked against the component before anything is allocated (a converter whose source
    uses genfw's names needs no :class:`KeyMap`)."""
    return checkpoint.build_checked(kind, name, params, construct, state, source, fresh=fresh)


def write(out: str | os.PathLike, module: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Write a converted component as a genfw checkpoint at ``out``, with ``extra`` metadata."""
    checkpoint.save(out, module, extra=extra)


def probe(kind: str, name: str, params: dict[str, Any], **construct: Any) -> torch.nn.Module:
    """The registered component built on the ``meta`` device (no memory): its tensor names and
    shapes, e.g. to list the weights a source file lacks and that start fresh."""
    with torch.device("meta"):
        return get_registry().build(kind, name, params, **construct)


def load_converter(name: str) -> Callable[..., Any]:
    """Another installed converter, by name (a converter that hands some files on to it)."""
    return get_registry().load("converter", name)


def max_image_side() -> int:
    """The largest image side genfw accepts (``GENFW_MAX_SIDE``), for checking a source's resolution."""
    return limits.limit("side")


# --------------------------------------------------------------------------------------------
# converters as a kind: their Params and the one way to call them

OPTIONS = {"config": "--config", "preset": "--preset", "resolution": "--resolution", "params": "--set",
           "overrides": "--set"}


def overrides_of(model: type, name: str, doc: str = "") -> type:
    """A ``Params`` model whose fields are ``model``'s, each optional (None: from the file).

    Field types, bounds and descriptions are kept; cross-field rules are left to the full model,
    which validates the merged params when the converter builds the component.
    """
    from typing import Annotated

    from pydantic import Field, create_model

    fields: dict[str, Any] = {}
    for key, field in model.model_fields.items():
        annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        fields[key] = (annotation | None, Field(None, description=field.description, alias=field.alias))
    made = create_model(name, __base__=Params, **fields)
    made.__doc__ = doc or f"Overrides of {model.__qualname__}: each optional, None keeps what the file implies."
    return made


def hyper_parameters_model(name: str, examples: dict[str, Any], descriptions: dict[str, str] | None = None,
                           doc: str = "") -> type:
    """A ``Params`` model of the authors' hyper-parameter names a converter reads, each optional.

    Types come from ``examples`` (the values of a preset or the authors' defaults); names with dots
    (``net.dim``, a TOML section) are kept as the ``--set`` keys.
    """
    from pydantic import Field, create_model

    def kind(value: Any) -> Any:
        if isinstance(value, bool):
            return bool
        if isinstance(value, int):
            return int
        if isinstance(value, float):
            return float
        if isinstance(value, str):
            return str
        if isinstance(value, (list, tuple)):
            inner = {kind(v) for v in value}
            return list[inner.pop()] if len(inner) == 1 else list
        return Any

    fields: dict[str, Any] = {}
    for key, example in examples.items():
        described = (descriptions or {}).get(key) or f"their '{key}'"
        shown = f" (e.g. {example!r})" if example is not None else ""
        fields[key.replace(".", "__")] = (kind(example) | None, Field(None, alias=key, description=described + shown))
    made = create_model(name, __base__=Params, **fields)
    made.__doc__ = doc or "The authors' hyper-parameters this converter reads; each optional (None: from --config/--preset)."
    return made


def set_keys(model: type) -> list[str]:
    """The ``--set`` keys a converter's ``Params`` allows (aliases where a field has one)."""
    return [field.alias or key for key, field in model.model_fields.items()]


def validate_set(name: str, model: type, values: dict[str, Any]) -> dict[str, Any]:
    """``--set`` values validated by a converter's ``Params``: only the keys given, coerced."""
    from pydantic import ValidationError

    try:
        validated = model.model_validate(values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"--set {key}: unknown key (allowed keys: {', '.join(set_keys(model))})")
            else:
                problems.append(f"--set {key}={values.get(key)!r}: {err['msg']}")
        raise ConfigError(f"converter '{name}': " + "; ".join(problems)) from None
    return validated.model_dump(by_alias=True, exclude_unset=True)


def accepted_options(fn: Callable[..., Any]) -> set[str] | None:
    """The options (``config``, ``preset``, ``resolution``, ``params``/``overrides``) ``fn`` takes; None if unknown."""
    import inspect

    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature (a builtin): let the call decide
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return set(OPTIONS)
    return {k for k in parameters if k in OPTIONS}


def run(name: str, source: str | os.PathLike, output: str | os.PathLike, *, config: str | None = None,
        preset: str | None = None, resolution: int | None = None, set_values: dict[str, Any] | None = None,
        registry: Any = None) -> torch.nn.Module:
    """Call converter ``name`` as ``genfw convert`` does: options checked, ``--set`` validated, errors attributed.

    ``set_values`` go to the converter's ``params`` argument, or to ``overrides`` for one that takes
    those (the papers' converters take the authors' hyper-parameter names).
    """
    registry = registry or get_registry()
    fn = registry.load("converter", name)
    accepted = accepted_options(fn)
    options: dict[str, Any] = {k: v for k, v in (("config", config), ("preset", preset), ("resolution", resolution))
                               if v is not None}
    given = dict(set_values or {})
    if given:
        model = getattr(fn, "Params", None)
        if model is not None:
            given = validate_set(name, model, given)
        options["params" if accepted is None or "params" in accepted else "overrides"] = given
    if accepted is not None:
        extra = [OPTIONS[k] for k in options if k not in accepted]
        if extra:
            takes = sorted({OPTIONS[k] for k in accepted}) or ["no options"]
            raise ConfigError(f"converter '{name}' takes no {', '.join(extra)} (it takes {', '.join(takes)})")
    try:
        return fn(source, output, **options)
    except GenfwError as e:
        if not given:
            raise
        items = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in (set_values or {}).items())
        msg = str(e).replace("but the metadata describes", "but the hyper-parameters given describe")
        msg = msg.replace("do not match the metadata of", "do not match the hyper-parameters given for")
        if "hyper-parameters given" in msg:
            msg = msg.replace("hyper-parameters given", f"hyper-parameters given (your --set {items})", 1)
        else:
            msg += f" (with your --set {items})"
        raise type(e)(msg) from None


def describe(fn: Callable[..., Any]) -> str:
    """The ``genfw convert`` options a converter takes, for listings."""
    accepted = accepted_options(fn)
    if accepted is None:
        return "options: unknown (no signature)"
    return "options: " + (", ".join(sorted({OPTIONS[k] for k in accepted})) or "none")
