"""The converters' pieces that need no fixture files: the authors'-behaviour params of genfw's
hourglass and vqgan (set by genfw convert sundae / unleashing), and genfw convert's option routing.
"""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import genfw
from genfw.cli import app

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_authors_variants_train_and_take_other_grids():
    from genfw.registry import build

    hourglass = build("backbone", "hourglass", {
        "dim": 32, "depth": [1, 1, 1], "shorten_factors": [4], "heads": 2, "head_dim": 16,
        "rotary_heads": "first", "resampling_groups": "raster", "valley_rotary_max_freq": 4.0,
        "resampling_context_norm": False}, vocab_size=9, out_size=8, grid=[6, 6])
    tokens = torch.randint(0, 9, (2, 5, 7))  # odd, non-square: padded before shortening
    logits = hourglass(tokens)
    assert logits.shape == (2, 5, 7, 8)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in hourglass.parameters())
    vqgan = build("tokenizer", "vqgan", {
        "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "z_channels": 8, "embed_dim": 8,
        "codebook_size": 16, "quant_convs": False, "decoder_res_blocks": 1, "out_activation": False,
        "unit_range": True, "perceptual_weight": 0}, channels=3, resolution=[8, 8])
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    (codes,) = vqgan.encode(images)
    assert codes.shape == (2, 4, 4) and vqgan.decode([codes]).abs().max() <= 1
    assert not any("quant_conv" in k for k in vqgan.state_dict())
    assert len(vqgan.decoder.up[0].block) == 1  # not num_res_blocks + 1


def test_convert_cli_routes_taming_options(tmp_path):
    """--resolution and --set reach the taming converter (genfw vqgan params), as before."""
    from genfw.registry import build

    torch.manual_seed(1)
    src = build("tokenizer", "vqgan", {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                                       "z_channels": 16, "embed_dim": 8, "codebook_size": 16, "perceptual_weight": 0,
                                       "disc_layers": 2, "disc_ndf": 16}, channels=3, resolution=[16, 16])
    fresh = ("quantize.unused_steps", "quantize.initialised")
    torch.save({"state_dict": {k: v for k, v in src.state_dict().items() if k not in fresh}}, tmp_path / "last.ckpt")
    out = tmp_path / "vqgan.safetensors"
    code, text = cli("convert", "taming", str(tmp_path / "last.ckpt"), "-o", str(out), "--resolution", "16",
                     "--set", "perceptual_weight=0", "--set", "disc_start=77")
    assert code == 0, text
    model = genfw.load(out)
    assert model.params.disc_start == 77 and model.params.perceptual_weight == 0
    assert model.construct["resolution"] == [16, 16]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x)[0], src.eval().encode(x)[0])
