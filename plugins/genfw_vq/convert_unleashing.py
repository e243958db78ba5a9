"""Convert the VQ-GAN of Unleashing Transformers (Bond-Taylor et al. 2022; samb-t/unleashing-transformers)
into genfw's ``vqgan`` tokenizer.

Its ``train_vqgan.py`` saves ``torch.save(VQGAN.state_dict(), "vqgan[_ema]_<step>.th")``: the
autoencoder under ``ae.`` (``encoder.blocks.N``, ``quantize.embedding``, ``generator.blocks.N``),
the PatchGAN under ``disc.main.`` and LPIPS under ``perceptual.``. Its architecture (``models/vqgan.py``)
is taming's with four differences, each a ``vqgan`` param here: no 1x1 convs around the codebook
(``quant_convs: false``), ``res_blocks`` (not +1) blocks per decoder level (``decoder_res_blocks``),
no swish before the last conv of encoder and generator (``out_activation: false``) and images in
[0, 1] (``unit_range: true``; genfw's [-1, 1] images are mapped in and out).

Kept: encoder, codebook, generator and discriminator (with BatchNorm statistics), so the model can be
fine-tuned. Dropped and listed in the output: ``perceptual.*`` (LPIPS; genfw loads it from
``perceptual_weights``), ``ae.generator.logsigma.*`` (the ELBO head fitted after training) and the
unused 1x1 ``conv_out`` of residual blocks whose width does not change.

The hyper-parameters are not in the file: ``--config`` takes the hparams as JSON/YAML (the fields of
``HparamsVQGAN``), ``--preset ffhq|churches|bedrooms`` the repository's defaults; ``--set`` changes one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from genfw import convert as core
from genfw.errors import CheckpointError, ConfigError

FORMAT = "Unleashing Transformers VQ-GAN"
_PAPER = {"attn_resolutions": [16], "ch_mult": [1, 1, 2, 2, 4], "codebook_size": 1024, "disc_layers": 3,
          "disc_weight_max": 1.0, "disc_start_step": 30001, "emb_dim": 256, "img_size": 256, "latent_shape": [1, 16, 16],
          "n_channels": 3, "ndf": 64, "nf": 128, "perceptual_weight": 1.0, "res_blocks": 2, "beta": 0.25,
          "quantizer": "nearest", "diff_aug": False}
#: ``hparams/defaults/vqgan_defaults.py`` (the same for the three datasets of the paper).
PRESETS = {name: dict(_PAPER, dataset=name) for name in ("ffhq", "churches", "bedrooms")}
USED = set(_PAPER) | {"dataset"}
#: set by ``HparamsVQGAN`` whatever the dataset
DEFAULTS = {"beta": 0.25, "diff_aug": False, "quantizer": "nearest", "n_channels": 3}


def _vqgan_params(h: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if h["quantizer"] != "nearest":
        raise ConfigError(f"quantizer '{h['quantizer']}': only the nearest-neighbour VQ-GAN converts (not gumbel)")
    params = {
        "codebook_size": h["codebook_size"], "embed_dim": h["emb_dim"], "ch": h["nf"], "ch_mult": list(h["ch_mult"]),
        "num_res_blocks": h["res_blocks"], "decoder_res_blocks": h["res_blocks"],
        "attn_resolutions": list(h["attn_resolutions"]), "z_channels": h["emb_dim"],
        "quant_convs": False, "out_activation": False, "unit_range": True, "ema": False,
        # UT's loss: ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2 (beta on the codebook term, as taming)
        "commitment_beta": h["beta"], "legacy_beta": True,
        "disc_layers": h["disc_layers"], "disc_ndf": h["ndf"], "disc_start": h["disc_start_step"],
        "lambda_max": float(h["disc_weight_max"]), "perceptual_weight": float(h["perceptual_weight"]),
        "diffaug": bool(h["diff_aug"]),
    }
    construct = {"channels": h["n_channels"], "resolution": [h["img_size"], h["img_size"]]}
    return params, construct


def _map_resblock(keys: core.KeyMap, theirs: str, ours: str, width_changes: bool) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        keys.copy_prefix(f"{theirs}.{name}", f"{ours}.{name}")
    if width_changes:
        keys.copy_prefix(f"{theirs}.conv_out", f"{ours}.nin_shortcut")
    else:  # built by UT's ResBlock but never used when the width does not change
        keys.drop(f"{theirs}.conv_out.")


def _map_attn(keys: core.KeyMap, theirs: str, ours: str) -> None:
    for name in ("norm", "q", "k", "v", "proj_out"):
        keys.copy_prefix(f"{theirs}.{name}", f"{ours}.{name}")


def map_autoencoder(keys: core.KeyMap, h: dict[str, Any], prefix: str = "ae.") -> None:
    """UT's flat ``encoder.blocks`` / ``generator.blocks`` lists -> genfw's taming-style names."""
    nf, mult, nres, attn = h["nf"], list(h["ch_mult"]), h["res_blocks"], list(h["attn_resolutions"])
    enc, i = f"{prefix}encoder.blocks", 0
    keys.copy_prefix(f"{enc}.0", "encoder.conv_in")
    i, res, width = 1, h["img_size"], nf
    for level, m in enumerate(mult):
        for j in range(nres):
            _map_resblock(keys, f"{enc}.{i}", f"encoder.down.{level}.block.{j}", width != nf * m)
            width, i = nf * m, i + 1
            if res in attn:
                _map_attn(keys, f"{enc}.{i}", f"encoder.down.{level}.attn.{j}")
                i += 1
        if level != len(mult) - 1:
            keys.copy_prefix(f"{enc}.{i}.conv", f"encoder.down.{level}.downsample.conv")
            i, res = i + 1, res // 2
    _map_resblock(keys, f"{enc}.{i}", "encoder.mid.block_1", False)
    _map_attn(keys, f"{enc}.{i + 1}", "encoder.mid.attn_1")
    _map_resblock(keys, f"{enc}.{i + 2}", "encoder.mid.block_2", False)
    keys.copy_prefix(f"{enc}.{i + 3}", "encoder.norm_out")
    keys.copy_prefix(f"{enc}.{i + 4}", "encoder.conv_out")

    keys.copy(f"{prefix}quantize.embedding.weight", "quantize.embedding.weight")

    gen = f"{prefix}generator.blocks"
    keys.copy_prefix(f"{gen}.0", "decoder.conv_in")
    _map_resblock(keys, f"{gen}.1", "decoder.mid.block_1", False)
    _map_attn(keys, f"{gen}.2", "decoder.mid.attn_1")
    _map_resblock(keys, f"{gen}.3", "decoder.mid.block_2", False)
    i, width, res = 4, nf * mult[-1], h["img_size"] // 2 ** (len(mult) - 1)
    for level in reversed(range(len(mult))):
        for j in range(nres):
            _map_resblock(keys, f"{gen}.{i}", f"decoder.up.{level}.block.{j}", width != nf * mult[level])
            width, i = nf * mult[level], i + 1
            if res in attn:
                _map_attn(keys, f"{gen}.{i}", f"decoder.up.{level}.attn.{j}")
                i += 1
        if level != 0:
            keys.copy_prefix(f"{gen}.{i}.conv", f"decoder.up.{level}.upsample.conv")
            i, res = i + 1, res * 2
    keys.copy_prefix(f"{gen}.{i}", "decoder.norm_out")
    keys.copy_prefix(f"{gen}.{i + 1}", "decoder.conv_out")
    keys.drop(f"{prefix}generator.logsigma.")


def convert_unleashing_vqgan(src: str | os.PathLike, out: str | os.PathLike, *, config: str | None = None,
                             preset: str | None = None, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """Read UT's ``vqgan[_ema]_<step>.th`` at ``src``, write a genfw ``vqgan`` tokenizer to ``out``."""
    source = os.fspath(src)
    state = core.tensor_dict(core.read_torch_file(src), source, FORMAT)
    if "ae.quantize.embedding.weight" not in state or "ae.encoder.blocks.0.weight" not in state:
        hint = (" (it looks like a taming-transformers VQModel: use genfw convert taming)"
                if "encoder.conv_in.weight" in state or "state_dict" in state else "")
        raise CheckpointError(f"{source} is not an {FORMAT} checkpoint: it lacks ae.quantize.embedding.weight{hint}")
    h = core.hyper_parameters(config, preset, overrides, PRESETS, USED, "unleashing VQ-GAN", DEFAULTS)
    keys = core.KeyMap(state, source, FORMAT)
    try:
        map_autoencoder(keys, h)
        params, construct = _vqgan_params(h)
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"invalid unleashing VQ-GAN hyper-parameters: {e}") from None
    has_disc = any(k.startswith("disc.main.") for k in state)
    for k in list(state):
        if k.startswith("disc.main."):
            keys.copy(k, "loss.discriminator." + k[len("disc."):])
    keys.drop("perceptual.")
    fresh = ["quantize.unused_steps", "quantize.initialised"]
    if not has_disc:  # a generator-only file: the discriminator starts fresh
        fresh += [k for k in _discriminator_keys(params, construct)]
    model = core.build("tokenizer", "vqgan", params, construct, keys, fresh=fresh)
    core.save(out, model, "samb-t/unleashing-transformers", source, keys,
              extra={} if has_disc else {"fresh_discriminator": True})
    return model


def _discriminator_keys(params: dict[str, Any], construct: dict[str, Any]) -> list[str]:
    probe = core.probe("tokenizer", "vqgan", params, **construct)
    return [k for k in probe.state_dict() if k.startswith("loss.discriminator.")]


convert_unleashing_vqgan.Params = core.hyper_parameters_model(
    "UnleashingVQGANParams", PRESETS["ffhq"], {"dataset": "their H.dataset"},
    "Unleashing Transformers' H (hparams/) that the VQ-GAN converter reads; each optional: from --config/--preset")
