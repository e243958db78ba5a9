"""genfw.nn.quantizer: lookup, straight-through, beta placement, EMA, k-means, dead-code restart."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from genfw.nn.quantizer import VectorQuantizer


def clusters(n_clusters: int = 8, per: int = 32, dim: int = 4, seed: int = 0) -> torch.Tensor:
    """Points around ``n_clusters`` well-separated centres, as [N, dim, 1, 1] quantizer inputs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * 3
    x = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(n_clusters * per, dim, generator=g)
    return x[:, :, None, None]


def test_nearest_codeword_and_straight_through():
    vq = VectorQuantizer(8, 3)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(flat, vq.embedding.weight.detach()).argmin(1)
    assert out.codes.shape == (2, 4, 5) and out.codes.dtype == torch.long
    assert torch.equal(out.codes.flatten(), expected)
    assert torch.allclose(out.quantized.detach(), vq.lookup(out.codes))
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity gradient


def test_lookup_is_fp32_under_autocast():
    vq = VectorQuantizer(2, 1)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0], [1.002]]))
    z = torch.full((1, 1, 1, 1), 1.0015)  # in bf16 both codewords and z round to 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = vq(z).codes
    assert int(codes) == 1


@pytest.mark.parametrize("legacy", [False, True])
def test_beta_multiplies_the_right_term(legacy):
    beta = 0.25
    vq = VectorQuantizer(4, 3, commitment_beta=beta, legacy_beta=legacy)
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    vq(z).loss.backward()
    # Both terms are the same squared distances, so the summed gradients on the encoder side
    # (commitment) and the codebook side differ only by the terms' weights, with opposite signs.
    g_encoder = z.grad.sum(dim=(0, 2, 3))
    g_codebook = vq.embedding.weight.grad.sum(dim=0)
    expected = -(1 / beta if legacy else beta)
    assert torch.allclose(g_encoder, expected * g_codebook, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("ema", [False, True])
def test_quantizer_loss_decreases(ema):
    torch.manual_seed(0)
    x = clusters()
    vq = VectorQuantizer(16, 4, ema=ema)
    opt = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad] or [torch.zeros(1, requires_grad=True)],
                           lr=0.05)
    vq.train()
    first = float(vq(x).loss.detach())
    for _ in range(150):
        loss = vq(x).loss
        opt.zero_grad()
        if loss.requires_grad:
            loss.backward()
            opt.step()
    last = float(vq(x).loss.detach())
    assert last < 0.2 * first, (first, last)
    if ema:
        assert not vq.embedding.weight.requires_grad


def test_dead_code_restart_revives_a_collapsed_codebook():
    x = clusters()

    def collapsed(restart_after):
        vq = VectorQuantizer(16, 4, ema=True, restart_after=restart_after)
        with torch.no_grad():  # every code but 0 far away from the data: only code 0 is ever chosen
            vq.embedding.weight.fill_(100.0)
            vq.embedding.weight[0].zero_()
            vq.ema_sum.copy_(vq.embedding.weight)
        return vq

    for vq in (collapsed(None), collapsed(3)):
        vq.eval()
        assert vq(x).codes.unique().numel() == 1
        vq.train()
        for _ in range(8):
            stats = vq(x).stats
        vq.eval()
        used = vq(x).codes.unique().numel()
        if vq.restart_after is None:
            assert used == 1  # the control: without restart the codebook stays collapsed
        else:
            assert used >= 8, used  # re-seeded from encoder outputs: every cluster gets codes
            assert float(stats["usage"]) > 1 / 16


def test_dead_codes_are_counted():
    vq = VectorQuantizer(4, 2, restart_after=None)
    x = torch.zeros(1, 2, 1, 1)
    vq.train()
    for _ in range(300):  # one point: one code used, three unused for > DEFAULT_DEAD_AFTER steps
        out = vq(x)
    assert float(out.stats["dead_codes"]) == 3
    assert vq.health() == {"dead_codes": 3.0, "dead_fraction": 0.75}
    assert float(out.stats["perplexity"]) == pytest.approx(1.0)


def test_kmeans_init_covers_the_clusters():
    x = clusters(n_clusters=8)
    vq = VectorQuantizer(8, 4, kmeans_init=True, kmeans_iters=20)
    assert not bool(vq.initialised)
    vq.train()
    vq(x)
    assert bool(vq.initialised)
    vq.eval()
    assert vq(x).codes.unique().numel() >= 7  # random init leaves most codes unused


# --------------------------------------------------------------------------------------------
# distributed EMA: two ranks with half a batch each update exactly like one process with all of it


def _ema_worker(rank: int, world: int, init_file: str, x: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, ema=True)
    vq.train()
    half = x.shape[0] // world
    for _ in range(3):
        vq(x[rank * half : (rank + 1) * half])
    save_file({"w": vq.embedding.weight.detach().clone()}, os.path.join(out_dir, f"w{rank}.safetensors"))
    td.destroy_process_group()


@pytest.mark.slow
def test_ema_statistics_are_all_reduced():
    x = clusters(n_clusters=4, per=8)[torch.randperm(32)]
    torch.manual_seed(0)
    single = VectorQuantizer(8, 4, ema=True)
    single.train()
    for _ in range(3):
        single(x)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ema_worker, args=(2, os.path.join(tmp, "pg"), x, tmp), nprocs=2, join=True)
        w0 = load_file(os.path.join(tmp, "w0.safetensors"))["w"]
        w1 = load_file(os.path.join(tmp, "w1.safetensors"))["w"]
    assert torch.equal(w0, w1)
    assert torch.allclose(w0, single.embedding.weight, atol=1e-5)
