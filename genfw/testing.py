"""Conformance checks every component — built-in or third-party — must pass.

Use them from your plugin's tests::

    from genfw.testing import check_prior
    def test_my_prior():
        check_prior("muse", {"steps": 4}, backbone={"name": "transformer", "params": {...}})

One check per kind: :func:`check_tokenizer`, :func:`check_backbone`, :func:`check_prior`,
:func:`check_dataset`, :func:`check_logger`, :func:`check_converter` (signatures and what each
asserts: docs/writing-plugins.md). A component is named by its registered name, or given as a
class (a converter: a function; it is then registered for the duration of the check). Each check
raises ``AssertionError`` with what is wrong and returns the component.

Stricter rules arrive gently: a rule in :data:`RULES` is a :class:`ConformanceWarning` from the
plugin API version that introduced it and an ``AssertionError`` one minor version later
(``genfw.PLUGIN_API``; CHANGELOG.md says which rule arrived when). Each message names its rule.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from genfw import checkpoint
from genfw import convert as converters
from genfw.errors import ConfigError, GenfwError
from genfw.hookspecs import hookimpl
from genfw.interfaces import NLL_KINDS, Backbone, ImageDataset, Prior, Tokenizer
from genfw.loggers import Logger, image_to_uint8
from genfw.params import validate_params
from genfw.registry import get_registry, plugin_api


class ConformanceWarning(UserWarning):
    """A conformance rule this plugin API only warns about; it becomes an error one minor version later.

    Make it an error today with ``pytest -W error::genfw.testing.ConformanceWarning``.
    """


@dataclass(frozen=True)
class Rule:
    """A conformance rule that arrived after plugin API 1.0: a warning first, then an error."""

    name: str
    warn_from: str  # the plugin API version that introduced it, as a warning
    error_from: str  # one minor version later: an AssertionError

    def enforce(self, message: str) -> None:
        """Warn or fail (depending on ``genfw.PLUGIN_API``) with ``message`` and the rule's name and schedule."""
        from packaging.version import Version

        text = (f"{message} [rule '{self.name}': a warning in plugin API {self.warn_from}, "
                f"an error from {self.error_from}]")
        if Version(plugin_api()) >= Version(self.error_from):
            raise AssertionError(text)
        warnings.warn(text, ConformanceWarning, stacklevel=4)


RULES = {
    # check_backbone: every output position sees every input position without causal=True
    # (SUNDAE, absorbing diffusion and MaskGIT denoise the whole grid at once)
    "global-receptive-field": Rule("global-receptive-field", warn_from="1.1", error_from="1.2"),
}


@contextlib.contextmanager
def _registered(kind: str, component: str | type) -> Iterator[str]:
    """Yield a registry name for ``component``, registering a class temporarily if needed."""
    if isinstance(component, str):
        get_registry().get(kind, component)
        yield component
        return
    name = f"_genfw_testing_{component.__name__.lower()}"

    class _Plugin:
        @hookimpl
        def genfw_register(self, registry):
            registry.register(kind, name, component, description="under test")

    registry = get_registry()
    registry.add_plugin(_Plugin(), name=name, dist="genfw-testing")
    try:
        yield name
    finally:
        registry.remove_plugin(name)


def _roundtrip(module: torch.nn.Module) -> torch.nn.Module:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        checkpoint.save(path, module)
        return checkpoint.load(path)


def _check_params_reject_typos(cls: type) -> None:
    try:
        validate_params(cls.Params, {"surely_not_a_param": 1}, "params")
    except ConfigError as e:
        assert "params.surely_not_a_param" in str(e), f"typo error does not name the key: {e}"
    else:
        raise AssertionError(f"{cls.__name__}.Params accepted an unknown key")


def _cuda_available() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------


def check_tokenizer(component: str | type, params: dict[str, Any] | None = None, *, channels: int = 1,
                    resolution: tuple[int, int] = (16, 16), batch_size: int = 2, train: bool = True) -> Tokenizer:
    """Shapes, dtypes, ranges, training step, params validation, checkpoint round-trip, devices."""
    torch.manual_seed(0)
    with _registered("tokenizer", component) as name:
        registry = get_registry()
        tok = registry.build("tokenizer", name, params or {}, channels=channels, resolution=list(resolution))
        assert isinstance(tok, Tokenizer), "a tokenizer must subclass genfw.interfaces.Tokenizer"
        _check_params_reject_typos(type(tok))
        images = torch.rand(batch_size, channels, *resolution) * 2 - 1
        tok.eval()
        with torch.no_grad():
            codes = tok.encode(images)
        assert isinstance(codes, list) and len(codes) == len(tok.levels), "encode must return one grid per level"
        for c, lv, shape in zip(codes, tok.levels, tok.grid_shapes(*resolution)):
            assert c.dtype == torch.long, f"codes must be int64, got {c.dtype}"
            assert tuple(c.shape) == (batch_size, *shape), f"code grid {tuple(c.shape)} != {(batch_size, *shape)}"
            assert int(c.min()) >= 0 and int(c.max()) < lv.codebook_size, "codes outside the codebook"
        with torch.no_grad():
            out = tok.decode(codes)
        assert tuple(out.shape) == tuple(images.shape), f"decode shape {tuple(out.shape)} != {tuple(images.shape)}"
        assert out.is_floating_point() and torch.isfinite(out).all()
        stats = tok.codebook_stats(codes)
        assert all(v >= 0 for v in stats.values())
        if train and type(tok).trainable:
            tok.train()
            result = tok.training_step(images, step=0)
            groups = tok.param_groups()
            assert set(result.losses) <= set(groups), f"losses {set(result.losses)} not in groups {set(groups)}"
            for group, loss in result.losses.items():
                assert loss.ndim == 0 and torch.isfinite(loss), f"loss '{group}' must be a finite scalar"
                if loss.requires_grad:
                    torch.autograd.backward(loss, inputs=groups[group], retain_graph=True)
            tok.eval()
            # A training forward may update state (EMA codebooks, k-means init, code restarts):
            # the round-trip compares against the model as it is now.
            with torch.no_grad():
                codes = tok.encode(images)
        loaded = _roundtrip(tok)
        with torch.no_grad():
            again = loaded.encode(images)
            assert all(torch.equal(a, b) for a, b in zip(codes, again)), "codes differ after a checkpoint round-trip"
            assert torch.equal(loaded.decode(codes), tok.decode(codes)), "decode differs after a round-trip"
        if _cuda_available():
            moved = loaded.to("cuda")
            with torch.no_grad():
                assert moved.decode([c.cuda() for c in codes]).device.type == "cuda"
        return tok


def check_backbone(component: str | type, params: dict[str, Any] | None = None, *, vocab_size: int = 11,
                   out_size: int = 10, grid: tuple[int, int] = (4, 4), num_classes: int = 3,
                   context: list[list[int]] | None = None, batch_size: int = 2) -> Backbone:
    """Logit shapes, bidirectionality, label/context use, causality and cache, params, round-trip.

    ``context=None`` tests a backbone that declares ``uses_context`` with one coarser grid
    ``[5, 2, 2]`` (pass ``[]`` to test it unconditioned); ``num_classes`` is used only when the
    backbone declares ``uses_labels``.
    """
    torch.manual_seed(0)
    with _registered("backbone", component) as name:
        cls = get_registry().load("backbone", name)
        if context is None:
            context = [[5, 2, 2]] if getattr(cls, "uses_context", True) else []
        if not getattr(cls, "uses_labels", True):
            num_classes = 0
        bb = get_registry().build("backbone", name, params or {}, vocab_size=vocab_size, out_size=out_size,
                                  grid=list(grid), num_classes=num_classes, context=context)
        assert isinstance(bb, Backbone), "a backbone must subclass genfw.interfaces.Backbone"
        assert (bb.vocab_size, bb.out_size, bb.grid) == (vocab_size, out_size, tuple(grid)), \
            "the backbone must pass its construction args to Backbone.__init__ unchanged"
        _check_params_reject_typos(type(bb))
        bb.eval()
        tokens = torch.randint(0, vocab_size, (batch_size, *grid))
        labels = torch.randint(0, num_classes, (batch_size,)) if num_classes else None
        ctx = [torch.randint(0, v, (batch_size, h, w)) for v, h, w in context] or None
        with torch.no_grad():
            logits = bb(tokens, labels=labels, context=ctx)
        assert tuple(logits.shape) == (batch_size, *grid, out_size), f"logits shape {tuple(logits.shape)}"
        assert torch.isfinite(logits).all()
        _check_bidirectional(bb, tokens, labels, ctx, logits, vocab_size)
        if num_classes:
            with torch.no_grad():
                other = bb(tokens, labels=(labels + 1) % num_classes, context=ctx)
            assert _differs(other, logits), "labels do not change the logits (the backbone declares uses_labels)"
        if ctx:
            changed = [(c + 1) % v for c, (v, _, _) in zip(ctx, context)]
            with torch.no_grad():
                other = bb(tokens, labels=labels, context=changed)
            assert _differs(other, logits), "context does not change the logits (the backbone declares uses_context)"
        if bb.supports_causal:
            _check_causal(bb, tokens, labels, ctx, vocab_size)
        loaded = _roundtrip(bb)
        with torch.no_grad():
            assert torch.equal(loaded(tokens, labels=labels, context=ctx), logits), "round-trip changed the logits"
        return bb


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every sample's output changed somewhere."""
    return bool(((a - b).flatten(1).abs().amax(1) > 0).all())


def _check_bidirectional(bb: Backbone, tokens, labels, ctx, logits, vocab_size: int) -> None:
    """Without ``causal``, which output positions see which input tokens.

    An error (since plugin API 1.0): the first position must see some later token and the last
    some earlier one (a causal or position-wise network is not bidirectional). The rule
    ``global-receptive-field`` (plugin API 1.1): every position sees every token of the test grid.
    """
    b, h, w = tokens.shape
    n = h * w
    if n < 2:
        return
    sees = torch.zeros(n, n, dtype=torch.bool)  # [output position, changed input position]
    for changed_at in range(n):
        flat = tokens.clone().view(b, -1)
        flat[:, changed_at] = (flat[:, changed_at] + 1) % vocab_size
        with torch.no_grad():
            other = bb(flat.view(b, h, w), labels=labels, context=ctx)
        diff = (other.view(b, n, -1) - logits.view(b, n, -1)).abs().amax(-1)  # b n
        sees[:, changed_at] = (diff > 0).all(0)

    def at(i: int) -> tuple[int, int]:
        return divmod(i, w)

    assert sees[0, 1:].any() and sees[n - 1, : n - 1].any(), (
        f"position {at(0)} sees no later token or position {at(n - 1)} no earlier one on a {h}x{w} grid: "
        "without causal=True a backbone must be bidirectional (non-autoregressive priors rely on it)"
    )
    if bool(sees.all()):
        return
    # the largest square the receptive field covers: every pair within that Chebyshev distance is seen
    rows, cols = torch.arange(n) // w, torch.arange(n) % w
    dist = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs())
    span = 0
    while span + 1 < max(h, w) and bool(sees[dist <= span + 1].all()):
        span += 1
    manhattan = (rows[:, None] - rows[None]).abs() + (cols[:, None] - cols[None]).abs()
    out_at, in_at = min(((int(i), int(j)) for i, j in (~sees).nonzero()),
                        key=lambda p: (-int(dist[p]), p[0], -int(manhattan[p])))  # the farthest pair not seen
    hint = (f"a grid it spans: check_backbone(..., grid=({span + 1}, {span + 1}))" if span >= 1
            else "a smaller grid: check_backbone(..., grid=(h, w))")
    RULES["global-receptive-field"].enforce(
        f"position {at(out_at)} never sees position {at(in_at)} on a {h}x{w} grid: priors that denoise the whole "
        f"grid need a global receptive field. A backbone whose receptive field grows with depth (convolutions) "
        f"must span the grids it is used on: give it more depth or wider kernels in params, or, if it is only "
        f"used on grids it spans, test it on {hint}"
    )


def _check_causal(bb: Backbone, tokens, labels, ctx, vocab_size: int) -> None:
    b, h, w = tokens.shape
    n = h * w
    with torch.no_grad():
        full = bb(tokens, labels=labels, context=ctx, causal=True)
        pos = n // 2
        changed = tokens.clone().view(b, n)
        changed[:, pos:] = (changed[:, pos:] + 1) % vocab_size
        after = bb(changed.view(b, h, w), labels=labels, context=ctx, causal=True)
    assert torch.allclose(full.view(b, n, -1)[:, :pos], after.view(b, n, -1)[:, :pos], atol=1e-5), \
        "causal output depends on later tokens"
    cache = bb.init_cache(b, tokens.device, torch.float32)
    flat = tokens.view(b, n)
    with torch.no_grad():
        steps = [bb.decode_step(flat[:, i], i, cache, labels=labels, context=ctx) for i in range(n)]
    stepped = torch.stack(steps, 1)
    assert torch.allclose(stepped, full.view(b, n, -1), atol=1e-4), "cached decoding differs from forward(causal=True)"


def check_prior(component: str | type, params: dict[str, Any] | None = None, *, backbone: dict[str, Any],
                codebook_size: int = 8, grid: tuple[int, int] = (4, 4), num_classes: int = 3,
                context: list[list[int]] | None = None, sampler: dict[str, Any] | None = None,
                batch_size: int = 2) -> Prior:
    """Loss and gradients, sample shapes and ranges, seeding, inpainting, NLL, round-trip."""
    torch.manual_seed(0)
    context = context or []
    with _registered("prior", component) as name:
        prior = get_registry().build("prior", name, params or {}, codebook_size=codebook_size, grid=list(grid),
                                     num_classes=num_classes, context=context, backbone=backbone)
        assert isinstance(prior, Prior), "a prior must subclass genfw.interfaces.Prior"
        _check_params_reject_typos(type(prior))
        codes = torch.randint(0, codebook_size, (batch_size, *grid))
        labels = torch.randint(0, num_classes, (batch_size,)) if num_classes else None
        ctx = [torch.randint(0, v, (batch_size, h, w)) for v, h, w in context] or None
        prior.train()
        out = prior.loss(codes, labels, ctx)
        loss = out.losses["main"]
        assert loss.ndim == 0 and torch.isfinite(loss), "loss must be a finite scalar"
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in prior.parameters()), "no gradient"
        prior.eval()
        sp = prior.sampler_params(sampler or {})

        def draw(seed: int, model: Prior = prior, **kw) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                return model.sample(batch_size, labels=labels, context=ctx, generator=g, params=sp, **kw)

        s1 = draw(1)
        assert s1.dtype == torch.long and tuple(s1.shape) == (batch_size, *grid), f"sample shape {tuple(s1.shape)}"
        assert int(s1.min()) >= 0 and int(s1.max()) < codebook_size, "samples outside the codebook"
        assert torch.equal(draw(1), s1), "the same generator seed gave different samples"
        mask = torch.zeros(batch_size, *grid, dtype=torch.bool)
        mask[:, grid[0] // 2 :] = True
        inpainted = draw(2, init=codes, mask=mask)
        assert torch.equal(inpainted[~mask], codes[~mask]), "inpainting changed positions outside the mask"
        with torch.inference_mode():
            nll = prior.nll(codes, labels, ctx, generator=torch.Generator().manual_seed(0))
        assert tuple(nll.bits_per_token.shape) == (batch_size,) and torch.isfinite(nll.bits_per_token).all()
        assert nll.kind in NLL_KINDS, f"nll kind {nll.kind!r} is not one of {NLL_KINDS}"
        assert nll.kind == prior.nll_kind, f"nll() returned kind {nll.kind!r} but nll_kind is {prior.nll_kind!r}"
        try:
            prior.sampler_params({"surely_not_a_param": 1})
        except Exception:  # noqa: BLE001
            pass
        else:
            raise AssertionError("SamplerParams accepted an unknown key")
        loaded = _roundtrip(prior)
        assert torch.equal(draw(1, model=loaded), s1), "a round-trip changed the samples for the same seed"
        return prior


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
