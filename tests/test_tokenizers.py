"""vqvae, vqvae2, vqgan: conformance, hierarchy, taming names, VQ-GAN loss, LPIPS, conversion, MNIST."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import genfw
from genfw.errors import CheckpointError, ConfigError
from genfw.registry import build, get_registry
from genfw.testing import check_tokenizer

VQVAE = {"factor": 4, "hidden_channels": 32, "residual_channels": 16, "num_res_blocks": 1,
         "codebook_size": 16, "embed_dim": 8}
VQVAE2 = {"strides": [2, 2], "hidden_channels": 32, "residual_channels": 16, "num_res_blocks": 1,
          "codebook_size": 16, "embed_dim": 8}
VQGAN = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "z_channels": 16,
         "embed_dim": 8, "codebook_size": 16, "perceptual_weight": 0.0, "disc_layers": 2, "disc_ndf": 8}


# --------------------------------------------------------------------------------------------
# conformance


@pytest.mark.parametrize(
    ("name", "params", "channels"),
    [
        ("vqvae", VQVAE, 1),
        ("vqvae", {**VQVAE, "ema": False, "kmeans_init": True, "restart_after": 1}, 3),
        ("vqvae2", VQVAE2, 1),
        ("vqvae2", {**VQVAE2, "strides": [2, 2, 2], "ema": False}, 3),
        ("vqgan", VQGAN, 3),
        ("vqgan", {**VQGAN, "disc_start": 0, "ema": True}, 1),
    ],
)
def test_conformance(name, params, channels):
    check_tokenizer(name, params, channels=channels, resolution=(16, 16))


def test_bad_factor_and_size_are_config_errors():
    with pytest.raises(ConfigError, match="params.factor: .*power of two"):
        build("tokenizer", "vqvae", {**VQVAE, "factor": 3}, channels=1, resolution=[16, 16])
    with pytest.raises(ConfigError, match="not divisible"):
        build("tokenizer", "vqvae", {**VQVAE, "factor": 8}, channels=1, resolution=[20, 20])
    with pytest.raises(ConfigError, match="multiples of 32"):
        build("tokenizer", "vqgan", {**VQGAN, "ch": 24}, channels=1, resolution=[16, 16])


def test_training_logs_report_codebook_health():
    tok = build("tokenizer", "vqvae", VQVAE, channels=1, resolution=[16, 16])
    tok.train()
    logs = tok.training_step(torch.rand(2, 1, 16, 16) * 2 - 1, step=0).logs
    for key in ("mse", "level0/perplexity", "level0/usage", "level0/dead_codes", "level0/vq_loss"):
        assert key in logs
    tok.eval()
    stats = tok.codebook_stats(tok.encode(torch.rand(2, 1, 16, 16)))
    assert {"level0/perplexity", "level0/usage", "level0/dead_codes"} <= set(stats)


# --------------------------------------------------------------------------------------------
# vqvae2


@pytest.mark.parametrize(
    ("strides", "size", "grids", "factors"),
    [
        ([2, 2], 16, [(4, 4), (8, 8)], [4, 2]),
        ([4, 2], 32, [(4, 4), (8, 8)], [8, 4]),
        ([2, 2, 2], 32, [(4, 4), (8, 8), (16, 16)], [8, 4, 2]),
    ],
)
def test_vqvae2_codes_are_coarsest_first(strides, size, grids, factors):
    tok = build("tokenizer", "vqvae2", {**VQVAE2, "strides": strides}, channels=1, resolution=[size, size])
    tok.eval()
    codes = tok.encode(torch.rand(2, 1, size, size) * 2 - 1)
    assert [tuple(c.shape[1:]) for c in codes] == grids
    assert [lv.factor for lv in tok.levels] == factors
    assert tok.grid_shapes(size, size) == grids


def test_vqvae2_lower_level_is_conditioned_on_the_upper():
    tok = build("tokenizer", "vqvae2", VQVAE2, channels=1, resolution=[16, 16])
    tok.eval()
    inputs = {}
    for i, q in enumerate(tok.quantize):  # index 0 is the bottom level
        q.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0].clone()))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        tok.encode(x)
        before = dict(inputs)
        tok.quantize[1].embedding.weight.add_(1.0)  # change what the top level decodes to
        tok.encode(x)
    assert torch.equal(inputs[1], before[1])  # the top quantizer sees only its encoder
    assert not torch.allclose(inputs[0], before[0])  # the bottom one sees the decoded top level
    assert tok.decoder[0].in_channels == 2 * VQVAE2["embed_dim"]  # the decoder takes both levels


# --------------------------------------------------------------------------------------------
# vqgan: taming-transformers names


def _res(prefix: str, shortcut: bool = False) -> list[str]:
    keys = [f"{prefix}.{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias")]
    return keys + ([f"{prefix}.nin_shortcut.weight", f"{prefix}.nin_shortcut.bias"] if shortcut else [])


def _attn(prefix: str) -> list[str]:
    return [f"{prefix}.{m}.{p}" for m in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")]


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


# taming-transformers' VQModel with ddconfig ch=32, ch_mult=[1, 2], num_res_blocks=1,
# attn_resolutions=[8], resolution=16, z_channels=16, embed_dim=8, disc_num_layers=2 — without
# its loss.perceptual_loss.* (LPIPS) tensors, which genfw keeps out of the model.
TAMING_KEYS = [
    "encoder.conv_in.weight", "encoder.conv_in.bias",
    *_res("encoder.down.0.block.0"),
    "encoder.down.0.downsample.conv.weight", "encoder.down.0.downsample.conv.bias",
    *_res("encoder.down.1.block.0", shortcut=True), *_attn("encoder.down.1.attn.0"),
    *_res("encoder.mid.block_1"), *_attn("encoder.mid.attn_1"), *_res("encoder.mid.block_2"),
    "encoder.norm_out.weight", "encoder.norm_out.bias", "encoder.conv_out.weight", "encoder.conv_out.bias",
    "decoder.conv_in.weight", "decoder.conv_in.bias",
    *_res("decoder.mid.block_1"), *_attn("decoder.mid.attn_1"), *_res("decoder.mid.block_2"),
    *_res("decoder.up.0.block.0", shortcut=True), *_res("decoder.up.0.block.1"),
    *_res("decoder.up.1.block.0"), *_res("decoder.up.1.block.1"),
    *_attn("decoder.up.1.attn.0"), *_attn("decoder.up.1.attn.1"),
    "decoder.up.1.upsample.conv.weight", "decoder.up.1.upsample.conv.bias",
    "decoder.norm_out.weight", "decoder.norm_out.bias", "decoder.conv_out.weight", "decoder.conv_out.bias",
    "loss.discriminator.main.0.weight", "loss.discriminator.main.0.bias",
    "loss.discriminator.main.2.weight", *_bn("loss.discriminator.main.3"),
    "loss.discriminator.main.5.weight", *_bn("loss.discriminator.main.6"),
    "loss.discriminator.main.8.weight", "loss.discriminator.main.8.bias",
    "quantize.embedding.weight",
    "quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
]
GENFW_ONLY_KEYS = ["quantize.unused_steps", "quantize.initialised"]  # quantizer bookkeeping


def test_vqgan_state_dict_has_taming_names():
    tok = build("tokenizer", "vqgan", VQGAN, channels=3, resolution=[16, 16])
    keys = set(tok.state_dict())
    assert len(TAMING_KEYS) == len(set(TAMING_KEYS))
    assert keys == set(TAMING_KEYS) | set(GENFW_ONLY_KEYS)
    assert tuple(tok.state_dict()["encoder.down.1.block.0.nin_shortcut.weight"].shape) == (64, 32, 1, 1)
    assert tuple(tok.state_dict()["quantize.embedding.weight"].shape) == (16, 8)


# --------------------------------------------------------------------------------------------
# vqgan: loss


def test_adaptive_weight_is_clamped_at_lambda_max():
    tok = build("tokenizer", "vqgan", {**VQGAN, "disc_weight": 0.5}, channels=1, resolution=[16, 16])
    w = tok.last_layer()
    rec, g = 1000.0 * w.sum(), w.sum()  # gradient norm ratio 1000
    assert float(tok.loss.adaptive_weight(rec, g, w)) == pytest.approx(0.5)  # min(1000, 1) * 0.5
    tok.loss.lambda_max = None  # taming: clamp at 1e4
    assert float(tok.loss.adaptive_weight(rec, g, w)) == pytest.approx(500.0, rel=1e-3)
    assert float(tok.loss.adaptive_weight(1e6 * w.sum(), g, w)) == pytest.approx(5000.0)
    tok.loss.lambda_max = 2000.0
    assert float(tok.loss.adaptive_weight(rec, g, w)) == pytest.approx(500.0, rel=1e-3)  # below the clamp

    # In a real step the logged weight respects the clamp too.
    tok = build("tokenizer", "vqgan", {**VQGAN, "disc_start": 0, "lambda_max": 0.01}, channels=1, resolution=[16, 16])
    tok.train()
    logs = tok.training_step(torch.rand(2, 1, 16, 16) * 2 - 1, step=0).logs
    assert 0 <= logs["d_weight"] <= 0.01 + 1e-9


def test_discriminator_idle_before_disc_start():
    tok = build("tokenizer", "vqgan", {**VQGAN, "disc_start": 5}, channels=1, resolution=[16, 16])
    tok.train()
    groups = tok.param_groups()
    disc = groups["discriminator"]
    bn = tok.loss.discriminator.main[3]
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = tok.training_step(x, step=4)
    assert "discriminator" not in out.losses and out.logs["disc_active"] == 0.0
    assert "g_loss" not in out.logs
    out.losses["generator"].backward()
    assert all(p.grad is None for p in disc)  # the generator loss does not involve D
    assert int(bn.num_batches_tracked) == 0  # D did not even run

    out = tok.training_step(x, step=5)
    assert set(out.losses) == {"generator", "discriminator"} and out.logs["disc_active"] == 1.0
    torch.autograd.backward(out.losses["discriminator"], inputs=disc)
    assert all(p.grad is not None for p in disc) and any(p.grad.abs().sum() > 0 for p in disc)
    assert int(bn.num_batches_tracked) > 0


@pytest.mark.parametrize("diffaug", [True, False])
def test_every_discriminator_input_is_augmented(diffaug, monkeypatch):
    tok = build("tokenizer", "vqgan", {**VQGAN, "disc_start": 0, "diffaug": diffaug}, channels=1, resolution=[16, 16])
    tok.train()
    seen = []
    forward = tok.loss.discriminator.forward
    monkeypatch.setattr(tok.loss.discriminator, "forward", lambda x: (seen.append(x.detach()), forward(x))[1])
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    recon, _ = tok(x)
    monkeypatch.setattr(tok, "forward", lambda images: (recon, tok.quantize(tok.quant_conv(tok.encoder(images)))))
    tok.training_step(x, step=0)
    assert len(seen) == 3  # fake for G, real and fake for D
    raw = [recon.detach(), x, recon.detach()]
    same = [torch.allclose(s, r) for s, r in zip(seen, raw, strict=True)]
    assert same == [not diffaug] * 3


def test_diff_augment_keeps_shape_and_gradient():
    from genfw_vq.diffaug import diff_augment, translation

    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    y = diff_augment(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    shifted = translation(torch.ones(64, 1, 16, 16))
    assert (shifted == 0).any() and (shifted == 1).any()  # vacated pixels are zero-filled


# --------------------------------------------------------------------------------------------
# LPIPS weights: never downloaded, loaded from a user file or the hub cache, clear error otherwise


def _random_lpips():
    from genfw_vq.lpips import LPIPS

    net = LPIPS()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for i in range(5):  # LPIPS' linear weights are non-negative
            getattr(net, f"lin{i}").model[1].weight.abs_()
    return net


def test_lpips_weights_missing_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    tok = build("tokenizer", "vqgan", {**VQGAN, "perceptual_weight": 1.0}, channels=1, resolution=[16, 16])
    tok.train()
    with pytest.raises(ConfigError, match="vgg16-397923af.pth") as err:
        tok.training_step(torch.rand(2, 1, 16, 16), step=0)
    assert "perceptual_weight: 0" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        from genfw_vq.lpips import load_lpips

        load_lpips(tmp_path / "nope.pth")


def test_lpips_loads_from_a_user_file(tmp_path):
    net = _random_lpips()
    path = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    tok = build("tokenizer", "vqgan", {**VQGAN, "perceptual_weight": 1.0, "perceptual_weights": str(path)},
                channels=1, resolution=[16, 16])
    tok.train()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = tok.training_step(x, step=0)
    recon, _ = tok(x)
    with torch.no_grad():
        expected = float(net(x, recon).mean())
    assert out.logs["perceptual"] == pytest.approx(expected, rel=1e-4) and expected > 0
    assert not any(k.startswith("loss.perceptual") for k in tok.state_dict())  # not part of the model


def test_lpips_from_hub_cache_vgg_plus_linear_layers(tmp_path, monkeypatch):
    from genfw_vq.lpips import _SLICES, load_lpips

    net = _random_lpips()
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    state = net.state_dict()
    vgg = {}
    for s, (start, end) in enumerate(_SLICES, 1):  # torchvision's naming: features.N.*
        for j in range(start, end):
            for p in ("weight", "bias"):
                if f"net.slice{s}.{j}.{p}" in state:
                    vgg[f"features.{j}.{p}"] = state[f"net.slice{s}.{j}.{p}"]
    torch.save(vgg, hub / "vgg16-397923af.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, hub / "vgg.pth")
    loaded = load_lpips()
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x, y), net(x, y))


# --------------------------------------------------------------------------------------------
# taming-transformers conversion


def _fake_taming_checkpoint(tmp_path, hparams=None):
    torch.manual_seed(1)
    src_model = build("tokenizer", "vqgan", VQGAN, channels=3, resolution=[16, 16])
    state = {k: v for k, v in src_model.state_dict().items() if k not in GENFW_ONLY_KEYS}
    assert set(state) == set(TAMING_KEYS)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)  # taming ships LPIPS
    ckpt = {"state_dict": state, "global_step": 123, "epoch": 4}
    if hparams:
        ckpt["hyper_parameters"] = hparams
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    return src_model, path


def test_convert_taming_checkpoint(tmp_path):
    from genfw_vq.convert import convert_taming

    assert get_registry().load("converter", "taming") is convert_taming
    src_model, path = _fake_taming_checkpoint(tmp_path)
    out = tmp_path / "vqgan.safetensors"
    convert_taming(path, out, resolution=16)
    model = genfw.load(out)
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim",
                "codebook_size", "disc_layers", "disc_ndf"):
        assert getattr(model.params, key) == getattr(src_model.params, key), key
    src_model.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = src_model.encode(x)
        assert torch.equal(model.encode(x)[0], codes[0])
        assert torch.equal(model.decode(codes), src_model.decode(codes))


def test_check_converter_taming(tmp_path):
    """genfw.testing.check_converter on the taming converter: the reference is the source model's output."""
    from genfw.testing import check_converter

    src_model, path = _fake_taming_checkpoint(tmp_path)
    src_model.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = src_model.encode(x)
        reference = {"codes": codes, "images": src_model.decode(codes)}
    check_converter("taming", path, options={"resolution": 16}, inputs=x, reference=reference, atol=1e-5)


def test_convert_taming_uses_hyper_parameters(tmp_path):
    from genfw_vq.convert import convert_taming

    hparams = {"n_embed": 16, "embed_dim": 8,
               "ddconfig": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                            "z_channels": 16, "resolution": 16, "in_channels": 3, "dropout": 0.0},
               "lossconfig": {"params": {"disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}}}
    _, path = _fake_taming_checkpoint(tmp_path, hparams)
    model = convert_taming(path, tmp_path / "out.safetensors", params={"perceptual_weight": 0.0})
    assert model.params.disc_start == 250001 and model.params.disc_weight == 0.8
    assert model.params.perceptual_weight == 0.0 and model.construct["resolution"] == [16, 16]


def test_convert_taming_refuses_pickled_objects_and_other_files(tmp_path):
    from genfw_vq.convert import convert_taming

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Opaque()}, path)
    with pytest.raises(CheckpointError, match=r"safely: .*_Opaque is not allowed") as caught:
        convert_taming(path, tmp_path / "out.safetensors")
    assert "weights_only=False" not in str(caught.value)  # never pointed at the unsafe path
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match="not a taming-transformers VQModel"):
        convert_taming(plain, tmp_path / "out.safetensors")
    assert not os.path.exists(tmp_path / "out.safetensors")


class _Opaque:
    """An arbitrary Python object: weights_only loading must refuse it."""


# --------------------------------------------------------------------------------------------
# a short MNIST run


def test_short_mnist_training_lowers_reconstruction_error():
    from genfw.data import AsTorchDataset

    torch.manual_seed(0)
    data = build("dataset", "mnist", {"resolution": 32, "limit": 600})
    loader = torch.utils.data.DataLoader(AsTorchDataset(data), batch_size=32, shuffle=True, drop_last=True)
    held = torch.stack([data[i][0] for i in range(500, 564)])
    params = {"factor": 4, "hidden_channels": 32, "residual_channels": 16, "num_res_blocks": 1,
              "codebook_size": 32, "embed_dim": 16, "restart_after": 10}
    tok = build("tokenizer", "vqvae", params, channels=1, resolution=[32, 32])

    def held_out_mse() -> float:
        tok.eval()
        with torch.no_grad():
            return float((tok.decode(tok.encode(held)) - held).pow(2).mean())

    before = held_out_mse()
    opt = torch.optim.Adam(tok.param_groups()["main"], lr=2e-3)
    step = 0
    while step < 60:
        for images, _ in loader:
            tok.train()
            loss = tok.training_step(images, step).losses["main"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 60:
                break
    after = held_out_mse()
    assert after < 0.5 * before, (before, after)


def test_convert_taming_generator_only_gives_the_same_codes_and_images(tmp_path):
    from typer.testing import CliRunner

    from genfw.cli import app

    hparams = {"lossconfig": {"params": {"disc_start": 30001, "disc_weight": 0.8, "disc_num_layers": 2,
                                         "disc_ndf": 8, "codebook_weight": 1.0}}}
    _, full = _fake_taming_checkpoint(tmp_path, hparams)
    ckpt = torch.load(full, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("loss.")}
    generator_only = tmp_path / "generator.ckpt"
    torch.save(ckpt, generator_only)
    runner = CliRunner()
    for src, dst in ((full, "full.safetensors"), (generator_only, "gen.safetensors")):
        result = runner.invoke(app, ["convert", "taming", str(src), "-o", str(tmp_path / dst), "--resolution", "16"])
        assert result.exit_code == 0, result.output
    a, b = genfw.load(tmp_path / "full.safetensors"), genfw.load(tmp_path / "gen.safetensors")
    assert b.params.disc_start == 30001 and b.params.disc_weight == 0.8  # the loss settings came along
    assert (b.params.disc_layers, b.params.disc_ndf) == (2, 8)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = a.encode(x)
        assert torch.equal(b.encode(x)[0], codes[0])
        assert torch.equal(b.decode(codes), a.decode(codes))
    from genfw.checkpoint import read

    assert "freshly initialised" in read(tmp_path / "gen.safetensors")[1]["extra"]["discriminator"]
    again = runner.invoke(app, ["convert", "taming", str(full), "-o", str(tmp_path / "full.safetensors"),
                                "--resolution", "16"])
    assert again.exit_code != 0 and "--overwrite" in again.output  # an existing file is kept


def test_convert_taming_needs_a_resolution_it_cannot_infer_and_places_attention_by_layout(tmp_path):
    from genfw_vq.convert import convert_taming

    src_model, path = _fake_taming_checkpoint(tmp_path)  # no hyper-parameters: no resolution
    with pytest.raises(CheckpointError, match="pass --resolution"):
        convert_taming(path, tmp_path / "out.safetensors")
    # a ddconfig written for 16-pixel images, converted for 32: attention stays on the same level
    hparams = {"ddconfig": {"resolution": 16, "attn_resolutions": [8], "ch": 32, "ch_mult": [1, 2]}}
    _, path = _fake_taming_checkpoint(tmp_path, hparams)
    model = convert_taming(path, tmp_path / "out32.safetensors", resolution=32)
    assert model.params.attn_resolutions == [16]
    src_model.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x)[0], src_model.encode(x)[0])


def test_convert_taming_refuses_shapes_the_file_does_not_hold_before_building(tmp_path):
    from genfw_vq.convert import convert_taming

    _, path = _fake_taming_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    # 2**26 x 8 codewords claimed by a single stored float (zero strides): 2 GiB if built
    ckpt["state_dict"]["quantize.embedding.weight"] = torch.zeros(1, 1).expand(2**26, 8)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="does not hold"):
        convert_taming(path, tmp_path / "out.safetensors", resolution=16)
