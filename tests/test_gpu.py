"""The GPU check's dry run (CPU), and CUDA-only tests (marked ``cuda``; skipped without a GPU):
bf16 autocast numerics and sampling memory bounds."""

import importlib.util
import json
import os

import pytest
import torch

from genfw.registry import build

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_lists_what_it_would_measure(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _gpu_check().main(["--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    priors = result["plan"]["priors"]
    assert list(priors) == ["sundae", "absorbing", "autoregressive"]
    for name, p in priors.items():
        # the FFHQ1024 recipe's shapes: VQ-GAN f = 32 on 1024 px, 8192 codes
        assert p["grid"] == [32, 32] and p["codebook_size"] == 8192, name
        assert p["parameters"] > 100e6 and p["tokenizer_parameters"] > 10e6, name
        assert any("bf16 autocast vs fp32 logits" in m for m in p["measurements"])
        assert any("torch.compile" in m for m in p["measurements"])
    assert priors["sundae"]["backbone"] == "Hourglass" and priors["autoregressive"]["backbone"] == "Transformer"
    assert priors["sundae"]["sampler_steps"] == 20 and priors["autoregressive"]["sampler_steps"] == "1024 tokens"
    assert "--nproc-per-node 1" in result["plan"]["nccl"]
    printed = capsys.readouterr().out
    assert "sundae: Sundae over Hourglass" in printed and "nccl: torchrun" in printed


def _prior(name: str = "sundae", dim: int = 256, depth: int = 4, grid=(16, 16), codes: int = 1024):
    backbone = {"name": "transformer", "params": {"dim": dim, "depth": depth, "heads": 4, "dropout": 0.0}}
    return build("prior", name, {}, codebook_size=codes, grid=list(grid), num_classes=0, context=[],
                 backbone=backbone)


@pytest.mark.cuda
@torch.inference_mode()
def test_bf16_autocast_logits_agree_with_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    prior = _prior().cuda().eval()
    tokens = torch.randint(0, 1024, (4, 16, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = prior.backbone(tokens).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = prior.backbone(tokens)
    assert low.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(low).all()
    low = low.float()
    # bf16 keeps 8 bits of mantissa: ~0.4% per operation, a few percent through 4 blocks
    assert float((low - ref).norm() / ref.norm()) < 0.03
    assert float((low.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - low.log_softmax(-1))).sum(-1)
    assert float(kl.mean()) < 1e-2


@pytest.mark.cuda
def test_bf16_sampling_gives_valid_codes_and_the_same_images_as_one_process():
    from genfw.sampling import generate

    tokenizer = build("tokenizer", "pixels", {"levels": 4}, channels=1, resolution=[8, 8])
    prior = build("prior", "sundae", {}, codebook_size=4, grid=list(tokenizer.grid_shapes(8, 8)[0]), num_classes=0,
                  context=[], backbone={"name": "transformer", "params": {"dim": 32, "depth": 1, "heads": 2}})
    a = generate(tokenizer, [prior], 6, batch_size=2, device="cuda", precision="bf16", progress=None,
                 sampler={"steps": 4})
    b = generate(tokenizer, [prior], 6, batch_size=2, device="cuda", precision="bf16", progress=None,
                 sampler={"steps": 4})
    assert a.codes[0].min() >= 0 and a.codes[0].max() < 4 and torch.isfinite(a.images).all()
    assert torch.equal(a.images, b.images)  # chunk k drawn from seed + k: reproducible on CUDA too


@pytest.mark.cuda
def test_sampling_memory_is_bounded_and_does_not_grow_with_steps():
    from genfw.sampling import generate

    tokenizer = build("tokenizer", "pixels", {"levels": 1024}, channels=1, resolution=[16, 16])
    prior = _prior().cuda()
    weights = sum(p.numel() * p.element_size() for p in prior.parameters())

    def peak(steps: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        generate(tokenizer, [prior], 16, batch_size=16, device="cuda", precision="bf16", progress=None,
                 sampler={"steps": steps, "min_steps": steps})
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    short, long = peak(4), peak(32)
    # inference mode keeps no graph: 8x the steps may not cost more memory (a leak grows with steps)
    assert long <= short * 1.1 + (4 << 20), (short, long)
    # batch 16 x 256 tokens x 1024-way logits in fp32 is 16 MiB; weights and activations stay
    # well under 64x that
    assert long < 64 * (16 << 20) + weights, long
