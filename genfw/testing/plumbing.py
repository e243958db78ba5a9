"""Conformance checks of the kinds that move data in and out: logger, dataset, converter."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from genfw import checkpoint
from genfw import convert as converters
from genfw.errors import ConfigError, GenfwError
from genfw.interfaces import ImageDataset, Logger, Prior, Tokenizer
from genfw.loggers import image_to_uint8
from genfw.registry import get_registry
from genfw.testing.common import (
    _check_params_reject_typos,
    _registered,
)

# --------------------------------------------------------------------------------------------
# loggers


def check_logger(component: str | type, params: dict[str, Any] | None = None, *,
                 read_back: Any = None) -> None:
    """Build, log scalars and images, close, and resume on the same folder the way the trainer does.

    Three sessions, as a stage lives them: steps 1-3 from scratch (``start_step=1``, state saved
    at step 3); a continue from that state (``start_step=4``) logging steps 4-5 and then killed
    with its last state at step 4; a resume from it (``start_step=5``) logging step 5 again with
    new values, and step 6. ``read_back(directory) -> {tag: {step: value}}``, when given, must
    return every step 1-6 with its latest value: a logger that loses a step at a resume or a
    continue, or keeps a value logged after the saved state, fails here.
    """
    with _registered("logger", component) as name, tempfile.TemporaryDirectory() as tmp:
        registry = get_registry()
        cls = registry.load("logger", name)
        assert issubclass(cls, Logger), "a logger must subclass genfw.loggers.Logger"
        _check_params_reject_typos(cls)
        cls.check_available()
        directory = os.path.join(tmp, "prior0")
        expected: dict[str, dict[int, float]] = {}
        grey = image_to_uint8(torch.linspace(-1, 1, 8 * 8).view(1, 8, 8))
        colour = image_to_uint8(torch.zeros(3, 8, 8, dtype=torch.uint8) + 200)
        sessions = [  # (start_step, {step: scalars}, image steps), as Trainer.fit opens its loggers
            (1, {1: {"loss/main": 2.5, "lr": 1e-3}, 2: {"loss/main": 2.25, "lr": 1e-3, "level0/usage": 0.5},
                 3: {"loss/main": 2.0, "lr": 5e-4}}, (2, 3)),
            (4, {4: {"loss/main": 1.75, "lr": 5e-4}, 5: {"loss/main": 9.0, "lr": 9.0}}, (4, 5)),
            (5, {5: {"loss/main": 1.5, "lr": 2.5e-4}, 6: {"loss/main": 1.25, "lr": 2.5e-4}}, (5,)),
        ]
        for start_step, records, image_steps in sessions:
            logger = registry.build("logger", name, params or {}, directory=directory, stage="prior0",
                                    start_step=start_step)
            for step, scalars in records.items():
                logger.log_scalars(step, scalars)
                for tag, value in scalars.items():
                    expected.setdefault(tag, {})[step] = value
                if step in image_steps:
                    logger.log_image(step, "samples", grey if step % 2 else colour)
            logger.close()
        if read_back is not None:
            got = read_back(directory)
            for tag, by_step in expected.items():
                assert tag in got, f"tag '{tag}' not read back (got {sorted(got)})"
                for step, value in by_step.items():
                    assert step in got[tag], (f"tag '{tag}' step {step} not read back (got steps {sorted(got[tag])}): "
                                              "records before start_step must be kept")
                    assert abs(got[tag][step] - value) <= 1e-6 * max(1.0, abs(value)), \
                        (f"tag '{tag}' step {step}: read back {got[tag][step]}, logged {value} last: records at or "
                         "after start_step come again and replace the earlier ones")


# --------------------------------------------------------------------------------------------
# datasets


def check_dataset(component: str | type, params: dict[str, Any] | None = None, *, items: int = 4) -> ImageDataset:
    """Description (channels, resolution, class names), item format and range, labels, determinism.

    Reads the first and last ``items`` items: each must be ``(float32 [C, H, W] in [-1, 1], int
    label)`` with label -1 (unlabelled) or in ``range(num_classes)``, the same on a second read;
    an index past the end raises ``IndexError``.
    """
    with _registered("dataset", component) as name:
        data = get_registry().build("dataset", name, params or {})
        assert isinstance(data, ImageDataset), "a dataset must subclass genfw.interfaces.ImageDataset"
        _check_params_reject_typos(type(data))
        channels, resolution = data.channels, tuple(data.resolution)
        assert isinstance(channels, int) and channels in (1, 3), f"channels must be 1 or 3, got {channels!r}"
        assert len(resolution) == 2 and all(isinstance(v, int) and v > 0 for v in resolution), \
            f"resolution must be (H, W) of positive ints, got {resolution!r}"
        names = data.class_names
        assert isinstance(names, list) and all(isinstance(n, str) for n in names), "class_names must be a list of str"
        assert len(set(names)) == len(names), "class_names must be unique"
        assert data.num_classes == len(names), "num_classes must equal len(class_names)"
        n = len(data)
        assert isinstance(n, int) and n > 0, f"a dataset must not be empty (len {n!r})"
        for index in sorted({*range(min(items, n)), *range(max(0, n - items), n)}):
            image, label = data[index]
            where = f"item {index}"
            assert isinstance(image, torch.Tensor) and image.dtype == torch.float32, f"{where}: image must be float32"
            assert tuple(image.shape) == (channels, *resolution), \
                f"{where}: image shape {tuple(image.shape)} != (channels, *resolution) {(channels, *resolution)}"
            assert torch.isfinite(image).all() and -1 <= float(image.min()) and float(image.max()) <= 1, \
                f"{where}: image values must lie in [-1, 1]"
            assert isinstance(label, int) and not isinstance(label, bool), f"{where}: label must be an int, got {label!r}"
            assert label == -1 or 0 <= label < data.num_classes, \
                f"{where}: label {label} is neither -1 (unlabelled) nor in range({data.num_classes})"
            again, label_again = data[index]
            assert torch.equal(image, again) and label == label_again, f"{where}: a second read differs"
        try:
            data[n]
        except IndexError:
            pass
        else:
            raise AssertionError(f"data[{n}] (past the end) must raise IndexError")
        return data


# --------------------------------------------------------------------------------------------
# converters


def _run_default(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(model, Tokenizer):
        codes = model.encode(inputs)
        return {"codes": codes, "images": model.decode(codes)}
    if isinstance(model, Prior):
        return model.backbone(inputs)
    return model(inputs)


def _compare(ours: Any, theirs: Any, where: str, atol: float, rtol: float) -> None:
    """Integer tensors equal, float tensors close, containers element by element."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) >= set(theirs), f"{where}: keys {sorted(theirs)} expected"
        for k in theirs:
            _compare(ours[k], theirs[k], f"{where}[{k!r}]", atol, rtol)
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), f"{where}: {len(theirs)} items expected"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _compare(a, b, f"{where}[{i}]", atol, rtol)
    else:
        theirs = torch.as_tensor(theirs)
        assert isinstance(ours, torch.Tensor), f"{where}: a tensor expected, got {type(ours).__name__}"
        assert tuple(ours.shape) == tuple(theirs.shape), f"{where}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
        if theirs.is_floating_point() or ours.is_floating_point():
            worst = float((ours.double() - theirs.double()).abs().max()) if ours.numel() else 0.0
            assert torch.allclose(ours.double(), theirs.double(), atol=atol, rtol=rtol), \
                f"{where}: differs from the reference by up to {worst:.3g} (atol {atol}, rtol {rtol})"
        else:
            assert torch.equal(ours.long(), theirs.long()), \
                f"{where}: {int((ours.long() != theirs.long()).sum())} values differ from the reference"


def check_converter(component: str | Callable[..., Any], src: str | os.PathLike, *, inputs: Any = None,
                    reference: Any = None, run: Callable[[torch.nn.Module, Any], Any] | None = None,
                    options: dict[str, Any] | None = None, atol: float = 1e-4, rtol: float = 1e-4,
                    wrong_file: bool = True) -> torch.nn.Module:
    """Convert ``src`` as ``genfw convert`` does, load the file written, compare with a reference.

    ``options``: what ``genfw convert`` would pass (``config``, ``preset``, ``resolution``, and
    ``set`` for ``--set`` values). ``reference``: the outputs of the authors' code on ``inputs``
    (tensors, or lists/dicts of them; or a callable ``reference(inputs)``), compared with
    ``run(model, inputs)`` — by default a tokenizer's ``{"codes": encode(x), "images": decode(codes)}``,
    a prior's ``backbone(tokens)``, any other module's ``forward(inputs)``. Also checked: the file
    loads with ``genfw.load`` into the same weights and outputs; a declared ``Params`` rejects an
    unknown ``--set`` key; with ``wrong_file``, a file of another layout fails with a one-line
    ``GenfwError`` and writes nothing.
    """
    opts = dict(options or {})
    set_values = opts.pop("set", None)
    unknown = set(opts) - {"config", "preset", "resolution"}
    assert not unknown, f"options {sorted(unknown)}: check_converter takes config, preset, resolution and set"
    with _registered("converter", component) as name, tempfile.TemporaryDirectory() as tmp:
        registry = get_registry()
        fn = registry.load("converter", name)
        assert callable(fn), "a converter must be callable"
        model = getattr(fn, "Params", None)
        if model is not None:
            from pydantic import BaseModel

            assert isinstance(model, type) and issubclass(model, BaseModel), "a converter's Params must be pydantic"
            try:
                converters.validate_set(name, model, {"surely_not_a_param": 1})
            except ConfigError as e:
                assert "--set surely_not_a_param: unknown key (allowed keys:" in str(e), f"typo message: {e}"
            else:
                raise AssertionError(f"converter '{name}': its Params accepted an unknown --set key")
        out = os.path.join(tmp, "converted.safetensors")
        converted = converters.run(name, src, out, set_values=set_values, registry=registry, **opts)
        assert isinstance(converted, torch.nn.Module), f"a converter must return the module, got {type(converted)!r}"
        assert os.path.isfile(out), "the converter returned without writing the output file"
        loaded = checkpoint.load(out)
        assert type(loaded) is type(converted), f"the file loads as {type(loaded).__name__}, not {type(converted).__name__}"
        ours, theirs = converted.state_dict(), loaded.state_dict()
        assert set(ours) == set(theirs), "the file's tensors differ from the returned module's"
        for k in ours:
            assert torch.equal(ours[k].cpu(), theirs[k].cpu()), f"tensor '{k}' differs between the file and the module"
        loaded.eval()
        converted.eval()
        if inputs is not None:
            run = run or _run_default
            with torch.no_grad():
                got = run(loaded, inputs)
                _compare(run(converted, inputs), got, "the returned module vs the loaded file", 0.0, 0.0)
                if reference is not None:
                    expected = reference(inputs) if callable(reference) else reference
                    _compare(got, expected, "converted output", atol, rtol)
        else:
            assert reference is None, "a reference needs the inputs it was computed on"
        if wrong_file:
            other = os.path.join(tmp, "other.pt")
            torch.save({"surely_not_a_weight": torch.zeros(3, 3)}, other)
            bad_out = os.path.join(tmp, "bad.safetensors")
            try:
                converters.run(name, other, bad_out, set_values=set_values, registry=registry, **opts)
            except GenfwError as e:
                assert "\n" not in str(e).strip(), f"a wrong file must fail in one line, got: {e}"
            except Exception as e:  # noqa: BLE001 - named in the assertion
                raise AssertionError(f"a file of another layout raised {type(e).__name__}: {e} "
                                     "(raise genfw.errors.CheckpointError with one line)") from e
            else:
                raise AssertionError("a file of another layout converted without an error")
            assert not os.path.exists(bad_out), "a failed conversion left an output file"
        return loaded
