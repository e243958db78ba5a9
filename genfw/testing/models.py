"""Conformance checks of the model kinds: tokenizer, backbone, prior (shapes, round trips,
receptive field, sampling, likelihood)."""

from __future__ import annotations

from typing import Any

import torch

from genfw.interfaces import NLL_KINDS, Backbone, Prior, Tokenizer
from genfw.registry import get_registry
from genfw.testing.common import (
    RULES,
    _check_params_reject_typos,
    _cuda_available,
    _registered,
    _roundtrip,
)

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
