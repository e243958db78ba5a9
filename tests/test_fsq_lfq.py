"""FSQ and LFQ quantizers checked against lucidrains/vector-quantize-pytorch on fixed inputs.

References (read, not imported; genfw does not depend on them):
- ``vector_quantize_pytorch/finite_scalar_quantization.py`` at commit
  002400875c9769e6da7ecc5b64ed98ae88582344 (FSQ: bound, straight-through round, codes / (L // 2),
  mixed-radix indices with the first channel least significant);
- ``vector_quantize_pytorch/lookup_free_quantization.py`` at commit
  002cd57da500e151a28bf82209eb82c45c2c9508 (LFQ: sign codes, indices with the first channel most
  significant, entropy aux loss ``(per-sample entropy - gamma * codebook entropy) * 0.1 +
  commitment * 0.25`` with ``softmax(2 x.c * 100)`` and log clamped at 1e-5).
The ``_reference_*`` functions below are minimal transcriptions of those formulas (marked as such),
and a few values are also written out by hand.
"""

import math

import torch

from genfw.nn.fsq import FiniteScalarQuantizer
from genfw.nn.lfq import LookupFreeQuantizer


# ---- minimal transcription of the reference FSQ (finite_scalar_quantization.py, see docstring) ----
def _reference_fsq(z: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lv = torch.tensor(levels, dtype=torch.int32)
    basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    bounded = (z + shift).tanh() * half_l - offset
    codes = bounded.round() / (lv // 2)
    indices = ((codes * (lv // 2) + lv // 2) * basis).sum(dim=-1).to(torch.int32)
    return codes, indices


# ---- minimal transcription of the reference LFQ forward in training (lookup_free_quantization.py) ----
def _reference_lfq(x: torch.Tensor, dim: int, inv_temperature: float = 100.0) -> tuple[torch.Tensor, ...]:
    mask = 2 ** torch.arange(dim - 1, -1, -1)
    bits = ((torch.arange(2 ** dim)[..., None].int() & mask) != 0).float()
    codebook = bits * 2 - 1
    quantized = torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))
    indices = ((quantized > 0).int() * mask.int()).sum(-1)
    prob = (2 * torch.einsum("i d, j d -> i j", x, codebook) * inv_temperature).softmax(dim=-1)

    def entropy(p):
        return (-p * p.clamp(min=1e-5).log()).sum(dim=-1)

    aux = entropy(prob).mean() - 1.0 * entropy(prob.mean(0))
    commit = torch.nn.functional.mse_loss(x, quantized)
    return quantized, indices, aux * 0.1 + commit * 0.25


def test_fsq_codes_and_indices_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    for levels in ([8, 5, 5, 5], [4, 3], [7, 6, 2]):
        z = torch.randn(3, len(levels), 5, 4, generator=g) * 2  # b d h w
        q = FiniteScalarQuantizer(levels)
        out = q(z)
        ref_codes, ref_idx = _reference_fsq(z.movedim(1, -1), levels)
        assert torch.allclose(out.quantized.movedim(1, -1), ref_codes, atol=1e-6)
        assert torch.equal(out.codes, ref_idx.long())
        assert torch.allclose(q.lookup(out.codes), out.quantized, atol=1e-6)  # indices -> codes round-trips
        assert float(out.loss) == 0.0
        # the implicit codebook: every index maps to a distinct code and back
        every = torch.arange(q.codebook_size)
        assert q.codebook_size == math.prod(levels)
        assert torch.equal(q.codes_to_indices(q.indices_to_codes(every)), every)
    # by hand: 3 levels -> codes -1, 0, 1 (indices 0, 1, 2); 4 levels -> 0 maps to code 0 = index 2
    q3 = FiniteScalarQuantizer([3])
    assert q3(torch.tensor([[[-9.0]], [[0.0]], [[9.0]]])[..., None]).codes.flatten().tolist() == [0, 1, 2]
    q4 = FiniteScalarQuantizer([4])
    out4 = q4(torch.tensor([[[-9.0]], [[0.0]], [[9.0]]])[..., None])
    assert out4.codes.flatten().tolist() == [0, 2, 3]
    assert out4.quantized.flatten().tolist() == [-1.0, 0.0, 0.5]


def test_fsq_rounds_straight_through():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = FiniteScalarQuantizer([5, 5, 5])
    q(z).quantized.sum().backward()
    zz = z.detach().movedim(1, -1).requires_grad_()
    (q.bound(zz) / 2).sum().backward()  # d quantized / dz = d bound / dz / (L // 2)
    assert torch.allclose(z.grad.movedim(1, -1), zz.grad, atol=1e-6)


def test_lfq_codes_indices_and_entropy_loss_equal_the_reference():
    g = torch.Generator().manual_seed(1)
    dim = 5
    z = torch.randn(2, dim, 3, 3, generator=g) * 0.05  # small: the soft assignment is not one-hot
    q = LookupFreeQuantizer(dim)
    q.train()
    out = q(z)
    flat = z.movedim(1, -1).reshape(-1, dim)
    ref_q, ref_idx, ref_loss = _reference_lfq(flat, dim)
    assert torch.equal(out.quantized.movedim(1, -1).reshape(-1, dim), ref_q)
    assert torch.equal(out.codes.flatten(), ref_idx.long())
    assert torch.allclose(out.loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert torch.equal(q.lookup(out.codes), out.quantized)
    # by hand: signs (+, -, +, +, -) are the bits 10110 = 22, the first channel most significant
    one = torch.tensor([0.3, -0.1, 0.2, 0.7, -0.4]).view(1, 5, 1, 1)
    assert int(q.eval()(one).codes) == 22
    # the penalty pushes towards a used codebook: its gradient is non-zero and the loss is zero in eval
    assert float(q(z).loss) == 0.0


def test_codebook_usage_is_reported_like_vq():
    q = FiniteScalarQuantizer([3, 3])
    q.train()
    out = q(torch.tensor([[[[-9.0, 9.0]], [[-9.0, -9.0]]]]))  # b=1, d=2, 1x2: codes 0 and 2 of 9
    assert out.codes.flatten().tolist() == [0, 2]
    assert abs(float(out.stats["usage"]) - 2 / 9) < 1e-6 and abs(float(out.stats["perplexity"]) - 2.0) < 1e-5
    for _ in range(300):
        q(torch.tensor([[[[-9.0]], [[-9.0]]]]))  # only code 0 from now on
    assert q.health()["dead_codes"] == 8.0


def test_fsq_and_lfq_tokenizers_log_codebook_usage_like_vqgan():
    import genfw

    arch = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
            "perceptual_weight": 0.0, "disc_layers": 2, "disc_ndf": 8}
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    for name, extra, k in (("fsq", {"levels": [4, 3]}, 12), ("lfq", {"codebook_bits": 3}, 8)):
        tok = genfw.build("tokenizer", name, {**arch, **extra}, channels=1, resolution=[8, 8])
        assert tok.levels[0].codebook_size == k and tok.quant_conv.out_channels == len(extra.get("levels", [0] * 3))
        logs = tok.training_step(images, 0).logs
        assert {"level0/perplexity", "level0/usage", "level0/dead_codes", "level0/vq_loss"} <= set(logs)
        codes = tok.encode(images)
        assert int(codes[0].max()) < k
        stats = tok.codebook_stats(codes)
        assert {"level0/perplexity", "level0/usage", "level0/dead_codes", "level0/dead_fraction"} <= set(stats)
