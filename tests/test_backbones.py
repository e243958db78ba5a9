"""Backbones: conformance, causality, KV cache, rotary embeddings, hourglass resampling."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from genfw.nn.attention import SelfAttention
from genfw.nn.rotary import AxialRotary, apply_rotary
from genfw.registry import build
from genfw.testing import check_backbone

TINY = {"dim": 32, "depth": 2, "heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: a second OpenMP thread buys nothing, and on a busy shared CPU every
    # parallel region waits for a descheduled thread (measured: 5.5 s instead of 0.13 s per check).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, params: dict, grid=(4, 4), vocab_size=11, out_size=10, num_classes=0, context=()):
    return build("backbone", name, params, vocab_size=vocab_size, out_size=out_size, grid=list(grid),
                 num_classes=num_classes, context=[list(c) for c in context])


# --- transformer ------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_transformer_conformance(positions):
    params = {**TINY, "positions": positions}
    check_backbone("transformer", params)
    check_backbone("transformer", params, grid=(3, 5), context=[[5, 2, 2], [7, 3, 5]])
    check_backbone("transformer", params, num_classes=0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_transformer_ignores_later_tokens(positions):
    torch.manual_seed(0)
    bb = _build("transformer", {**TINY, "positions": positions}, grid=(3, 4), num_classes=3).eval()
    tokens = torch.randint(0, 11, (2, 3, 4))
    labels = torch.tensor([0, 2])
    n, pos = 12, 5
    # perturbation: changing tokens pos.. leaves outputs before pos unchanged, and changes pos itself
    changed = tokens.clone().view(2, n)
    changed[:, pos:] = (changed[:, pos:] + 3) % 11
    with torch.no_grad():
        a = bb(tokens, labels, causal=True).view(2, n, -1)
        b = bb(changed.view(2, 3, 4), labels, causal=True).view(2, n, -1)
        bidir = bb(changed.view(2, 3, 4), labels).view(2, n, -1)
    assert torch.allclose(a[:, :pos], b[:, :pos], atol=1e-6)
    assert not torch.allclose(a[:, pos], b[:, pos])
    assert not torch.allclose(bidir[:, :pos], b[:, :pos])  # without the mask earlier outputs would change
    # gradient: d out[i] / d embedding[j] is zero exactly for j > i
    emb = bb.embed.tokens
    x = emb(tokens).detach().requires_grad_(True)
    original = emb.forward
    emb.forward = lambda t: x
    try:
        out = bb(tokens, labels, causal=True).view(2, n, -1)
    finally:
        emb.forward = original
    for i in (0, 4, 10):
        (g,) = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)
        g = g.view(2, n, -1).abs().sum((0, 2))
        assert torch.all(g[i + 1 :] == 0), f"position {i} receives gradient from later tokens"
        assert torch.all(g[: i + 1] > 0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_decoding_matches_causal_forward(positions):
    torch.manual_seed(0)
    bb = _build("transformer", {**TINY, "depth": 3, "positions": positions}, grid=(3, 5), num_classes=4,
                context=[[6, 2, 3]]).eval()
    tokens = torch.randint(0, 11, (3, 3, 5))
    labels = torch.tensor([0, 1, 3])
    ctx = [torch.randint(0, 6, (3, 2, 3))]
    with torch.no_grad():
        full = bb(tokens, labels, ctx, causal=True).view(3, 15, -1)
        cache = bb.init_cache(3, torch.device("cpu"), torch.float32)
        flat = tokens.view(3, 15)
        steps = torch.stack([bb.decode_step(flat[:, i], i, cache, labels, ctx) for i in range(15)], 1)
    assert cache.length == 15
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_transformer_grids():
    learned = _build("transformer", TINY, grid=(4, 4))
    with pytest.raises(ValueError, match="learned positions"):
        learned(torch.zeros(1, 6, 6, dtype=torch.long))
    rotary = _build("transformer", {**TINY, "positions": "rotary"}, grid=(4, 4))
    assert rotary(torch.zeros(1, 6, 7, dtype=torch.long)).shape == (1, 6, 7, 10)


def test_transformer_paper_scale_is_expressible():
    with torch.device("meta"):
        bb = _build("transformer", {}, grid=(16, 16), vocab_size=1025, out_size=1024)
    p = bb.params
    assert (p.depth, p.dim, p.heads, len(bb.blocks)) == (24, 512, 8, 24)


# --- rotary -----------------------------------------------------------------------------------


def test_rotary_changes_every_heads_scores():
    torch.manual_seed(0)
    heads, head_dim, h, w = 4, 8, 3, 4
    attn = SelfAttention(16, heads, head_dim)
    x = torch.randn(1, h * w, 16)
    q, k, _ = rearrange(attn.qkv(x), "b n (three h e) -> three b h n e", three=3, h=heads)
    tables = AxialRotary(head_dim)(h, w, "cpu", torch.float32)
    plain = q @ k.transpose(-1, -2)
    rotated = apply_rotary(q, tables) @ apply_rotary(k, tables).transpose(-1, -2)
    for head in range(heads):
        assert not torch.allclose(plain[0, head], rotated[0, head], atol=1e-3), f"head {head} not rotated"
    # scores depend on position only through offsets: a token's score with itself is unchanged
    torch.testing.assert_close(plain.diagonal(dim1=-2, dim2=-1), rotated.diagonal(dim1=-2, dim2=-1))


def test_rotary_axes_and_cache():
    rot = AxialRotary(8)
    t = rot(3, 4, "cpu", torch.float32)
    assert rot(3, 4, "cpu", torch.float32) is t  # cached, not recomputed
    cos = t.cos.view(3, 4, 4)  # one angle per feature pair
    # pairs 0-1 turn with the row, pairs 2-3 with the column
    assert torch.allclose(cos[:, 0, 0], cos[:, 2, 0]) and not torch.allclose(cos[0, :, 0], cos[1, :, 0])
    assert torch.allclose(cos[0, :, 2], cos[1, :, 2]) and not torch.allclose(cos[0, 0, 2], cos[0, 1, 2])
    # the complex (fp32) and real (bf16 and strided inputs) formulas agree
    x = torch.randn(2, 12, 8)
    fast = apply_rotary(x, t)
    slow = apply_rotary(x, t._replace(rot=None))
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(apply_rotary(x.bfloat16(), rot(3, 4, "cpu", torch.bfloat16)).float(), fast,
                               atol=0.05, rtol=0.05)
    with torch.inference_mode():
        made_in_inference = rot(5, 5, "cpu", torch.float32)
    q = torch.randn(1, 1, 25, 8, requires_grad=True)
    apply_rotary(q, made_in_inference).sum().backward()  # usable by autograd later
    assert q.grad is not None


# --- hourglass --------------------------------------------------------------------------------

HG = {"dim": 32, "depth": [1, 1, 1], "heads": 2, "head_dim": 8}


@pytest.mark.parametrize("params, grid", [
    (HG, (4, 4)),
    (HG, (7, 5)),  # padded to 8x6, valley 4x3
    ({**HG, "resampling": "1d"}, (7, 5)),  # width padded to 8, valley 7x2
    ({**HG, "depth": [1, 1, 1, 1, 1], "shorten_factors": [4, 4]}, (7, 5)),  # 8x6 -> 4x3 -> 2x2
    ({**HG, "depth": [0, 1, 2, 1, 0], "shorten_factors": [9, 4], "attention_resampling": False}, (6, 6)),
])
def test_hourglass_conformance(params, grid):
    check_backbone("hourglass", params, grid=grid)
    check_backbone("hourglass", params, grid=grid, context=[[5, 2, 2], [7, 3, 5]])


def test_hourglass_is_bidirectional_and_refuses_causal():
    bb = _build("hourglass", HG, grid=(4, 6)).eval()
    tokens = torch.randint(0, 11, (1, 4, 6))
    changed = tokens.clone()
    changed[0, -1, -1] = (changed[0, -1, -1] + 1) % 11
    with torch.no_grad():
        a, b = bb(tokens), bb(changed)
    assert not torch.allclose(a[0, 0, 0], b[0, 0, 0])  # the first position sees the last token
    assert not bb.supports_causal and "transformer" in bb.causal_unsupported_reason
    with pytest.raises(ValueError, match="cannot be causal"):
        bb(tokens, causal=True)


def test_autoregressive_prior_on_hourglass_is_a_validation_error(registry):
    from genfw.config import validate_recipe
    from genfw.errors import ConfigError
    from genfw.hookspecs import hookimpl
    from genfw.interfaces import Prior

    class CausalPrior(Prior):
        needs_causal = True

    class _Plugin:
        @hookimpl
        def genfw_register(self, registry):
            registry.register("prior", "_test_causal_prior", CausalPrior)

    registry.add_plugin(_Plugin(), name="_test_causal_prior")
    try:
        recipe = {"name": "t", "data": {"name": "synthetic"}, "tokenizer": {"name": "pixels"},
                  "prior": {"name": "_test_causal_prior", "backbone": {"name": "hourglass", "params": HG}}}
        with pytest.raises(ConfigError, match="cannot be causal.*no causal masking.*transformer"):
            validate_recipe(recipe, registry, num_levels=1)
    finally:
        registry.remove_plugin("_test_causal_prior")


def _influence(fn, x: torch.Tensor) -> torch.Tensor:
    """bool [out_h, out_w, in_h, in_w]: which input positions change each output position."""
    out = fn(x)
    result = torch.zeros(*out.shape[1:3], *x.shape[1:3], dtype=torch.bool)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            (g,) = torch.autograd.grad(out[0, i, j].sum(), x, retain_graph=True)
            result[i, j] = g[0].abs().sum(-1) > 0
    return result


@pytest.mark.parametrize("attention_resampling", [True, False])
def test_2d_resampling_maps_a_patch_to_one_valley_token(attention_resampling):
    level = _build("hourglass", {**HG, "attention_resampling": attention_resampling}).body
    x = torch.randn(1, 4, 4, 32, requires_grad=True)
    down = _influence(level.shorten, x)
    assert down.shape == (2, 2, 4, 4)
    expected = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    expected[0, 0, :2, :2] = expected[0, 1, :2, 2:] = expected[1, 0, 2:, :2] = expected[1, 1, 2:, 2:] = True
    assert torch.equal(down, expected), "a valley token must summarise exactly its 2x2 patch"
    valley = torch.randn(1, 2, 2, 32, requires_grad=True)
    up = _influence(lambda v: level.lengthen(v, torch.zeros(1, 4, 4, 32)), valley)
    assert torch.equal(up, expected.permute(2, 3, 0, 1)), "each token must be lengthened from its own valley token"


def test_1d_resampling_maps_consecutive_raster_tokens():
    level = _build("hourglass", {**HG, "resampling": "1d"}, grid=(2, 8)).body
    x = torch.randn(1, 2, 8, 32, requires_grad=True)
    down = _influence(level.shorten, x)
    assert down.shape == (2, 2, 2, 8)
    for i in range(2):
        for j in range(2):
            sources = down[i, j].flatten().nonzero().flatten().tolist()
            start = i * 8 + j * 4
            assert sources == list(range(start, start + 4)), f"valley token {(i, j)} reads {sources}"


def test_hourglass_rotary_per_level_grid():
    bb = _build("hourglass", {**HG, "depth": [1, 1, 1, 1, 1], "shorten_factors": [4, 4]}, grid=(7, 5))
    bb(torch.zeros(1, 7, 5, dtype=torch.long))
    grids = {key[:2] for key in bb.rotary._cache}
    assert grids == {(7, 5), (4, 3), (2, 2)}


def test_hourglass_params_validation():
    from genfw.config import validate_params
    from genfw.errors import ConfigError

    cls = _build("hourglass", HG).Params
    with pytest.raises(ConfigError, match="2 \\* len\\(shorten_factors\\) \\+ 1"):
        validate_params(cls, {"depth": [1, 1, 1], "shorten_factors": [4, 4]}, "params")
    with pytest.raises(ConfigError, match="square"):
        validate_params(cls, {"shorten_factors": [2]}, "params")
    validate_params(cls, {"shorten_factors": [2], "resampling": "1d"}, "params")


# paper configurations (megapixel-SUNDAE Table 3; Unleashing Transformers): vocab, grid, classes, params
PAPER = {
    "ffhq256": ("hourglass", {"depth": [3, 16, 3]}, 1024, (16, 16), 0),
    "ffhq1024": ("hourglass", {"depth": [2, 12, 2]}, 8192, (32, 32), 0),
    "celeba": ("hourglass", {"depth": [2, 12, 2]}, 1024, (16, 16), 0),
    "mnist": ("hourglass", {"depth": [2, 8, 2]}, 256, (28, 28), 10),
    "imagenet": ("hourglass", {"depth": [3, 14, 3], "heads": 12}, 1024, (16, 16), 1000),
    "unleashing": ("transformer", {}, 1024, (16, 16), 0),
}


@pytest.mark.parametrize("config", sorted(PAPER))
def test_paper_configurations_build(config):
    name, params, codes, grid, classes = PAPER[config]
    vocab = codes + 1 if name == "transformer" else codes  # absorbing diffusion's mask token
    with torch.device("meta"):
        bb = _build(name, params, grid=grid, vocab_size=vocab, out_size=codes, num_classes=classes)
        out = bb(torch.zeros(2, *grid, dtype=torch.long, device="meta"))
    assert out.shape == (2, *grid, codes)
