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
    cos = t.cos.view(3, 4, 8)
    # features 0 (and 4) turn with the row, 2 (and 6) with the column
    assert torch.allclose(cos[:, 0, 0], cos[:, 2, 0]) and not torch.allclose(cos[0, :, 0], cos[1, :, 0])
    assert torch.allclose(cos[0, :, 2], cos[1, :, 2]) and not torch.allclose(cos[0, 0, 2], cos[0, 1, 2])
    torch.testing.assert_close(cos[..., :4], cos[..., 4:])
    with torch.inference_mode():
        made_in_inference = rot(5, 5, "cpu", torch.float32)
    q = torch.randn(1, 1, 25, 8, requires_grad=True)
    apply_rotary(q, made_in_inference).sum().backward()  # usable by autograd later
    assert q.grad is not None
