"""Convert a VQ-VAE-2 checkpoint of rosinality/vq-vae-2-pytorch into genfw's ``vqvae2`` tokenizer.

Its ``train_vqvae.py`` saves ``torch.save(model.state_dict(), "checkpoint/vqvae_NNN.pt")`` of a
two-level ``VQVAE`` (bottom f = 4, top f = 8). The architecture is genfw's ``vqvae2`` with
``strides: [4, 2]``; what differs is naming and two concatenation orders, fixed here:

* the bottom quantizer's 1x1 conv sees [decoded top, bottom features] there, [features, decoded
  top] in genfw; the final decoder sees [upsampled top, bottom] there, [bottom, upsampled top]
  in genfw: their input channels are swapped accordingly;
* each codebook ``embed`` (D x K, codes are columns) becomes ``embedding.weight`` (K x D); its
  EMA state (``cluster_size``, ``embed_avg``) becomes ``ema_count``/``ema_sum``, so training can
  continue; genfw's own bookkeeping (``unused_steps``, ``initialised``) starts fresh.

The constructor arguments are not in the file. They are read off the tensor shapes (channel,
n_res_block, n_res_channel, embed_dim, n_embed); ``--config vqvae_config.json`` (their kwargs)
or ``--set`` may state them, and a value that disagrees with the tensors fails naming the tensor.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from genfw import convert as core
from genfw.errors import CheckpointError, ConfigError

FORMAT = "rosinality VQ-VAE-2"
# their VQVAE(...) keyword -> genfw vqvae2 param
KWARGS = {"channel": "hidden_channels", "n_res_channel": "residual_channels", "n_res_block": "num_res_blocks",
          "embed_dim": "embed_dim", "n_embed": "codebook_size", "decay": "ema_decay"}
OTHER = {"in_channel", "resolution"}
#: ``VQVAE()`` defaults, the model ``train_vqvae.py`` trains (256x256 images).
PRESETS = {"rosinality": {"in_channel": 3, "channel": 128, "n_res_block": 2, "n_res_channel": 32,
                          "embed_dim": 64, "n_embed": 512, "decay": 0.99, "resolution": 256}}
FRESH = ("quantize.0.unused_steps", "quantize.0.initialised", "quantize.1.unused_steps", "quantize.1.initialised")


def _res_indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    rx = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.conv\.")
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def _hyper(state: dict[str, torch.Tensor], source: str, config: dict[str, Any]) -> dict[str, Any]:
    """Their constructor kwargs: from the shapes, then the config / overrides on top."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: not a {FORMAT} checkpoint: it lacks '{key}'")
        return tuple(state[key].shape)

    d, k = shape("quantize_t.embed")[:2] if len(shape("quantize_t.embed")) == 2 else (None, None)
    if d is None:
        raise CheckpointError(f"{source}: tensor 'quantize_t.embed' has shape {shape('quantize_t.embed')}, "
                              "expected (embed_dim, n_embed)")
    inferred = {"in_channel": shape("enc_b.blocks.0.weight")[1], "channel": shape("enc_b.blocks.4.weight")[0],
                "n_res_block": len(_res_indices(state, "enc_b")), "embed_dim": d, "n_embed": k, "decay": 0.99,
                "resolution": 256}
    res = _res_indices(state, "enc_b")
    if res:
        inferred["n_res_channel"] = shape(f"enc_b.blocks.{res[0]}.conv.1.weight")[0]
    else:
        inferred["n_res_channel"] = 32
    unknown = sorted(set(config) - set(KWARGS) - OTHER)
    if unknown:
        raise ConfigError(f"unknown {FORMAT} hyper-parameter(s) {unknown}; known: {sorted(set(KWARGS) | OTHER)}")
    return {**inferred, **config}


def convert_vqvae2(src: str | os.PathLike, out: str | os.PathLike, *, config: str | None = None,
                   preset: str | None = None, overrides: dict[str, Any] | None = None,
                   resolution: int | None = None) -> torch.nn.Module:
    """Read rosinality's ``vqvae_NNN.pt`` at ``src``, write a genfw ``vqvae2`` tokenizer to ``out``.

    ``resolution`` is the training image size (default 256, their ``train_vqvae.py``'s).
    """
    source = os.fspath(src)
    obj = core.read_torch_file(src)
    state = core.tensor_dict(obj, source, FORMAT)
    if "quantize_t.embed" not in state and any(k.startswith(("encoder.", "ae.", "net", "_denoise_fn.")) for k in state):
        raise CheckpointError(f"{source} is not a {FORMAT} checkpoint (no quantize_t.embed): use the converter "
                              "for the project that wrote it (genfw convert taming / unleashing / sundae)")
    given: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown vqvae2 preset '{preset}'; presets: {', '.join(PRESETS)}")
        given.update(PRESETS[preset])
    if config is not None:
        cfg = core.read_config(config)
        given.update(cfg.get("kwargs", cfg) if isinstance(cfg.get("kwargs", cfg), dict) else {})
    given.update(overrides or {})
    if resolution is not None:
        given["resolution"] = resolution
    h = _hyper(state, source, given)
    try:
        d = int(h["embed_dim"])
    except (TypeError, ValueError):
        raise ConfigError(f"embed_dim {h['embed_dim']!r} is not an integer") from None

    keys = core.KeyMap(state, source, FORMAT)

    def conv(theirs: str, ours: str) -> None:
        keys.copy_prefix(theirs, ours)

    def res_stack(theirs: str, ours: str, first: int) -> None:
        indices = _res_indices(state, theirs)
        if indices != list(range(first, first + len(indices))):
            raise CheckpointError(f"{source}: residual blocks of {theirs} at {indices}, expected consecutive from {first}")
        for j, i in enumerate(indices):
            conv(f"{theirs}.blocks.{i}.conv.1", f"{ours}.{j}.block.1")
            conv(f"{theirs}.blocks.{i}.conv.3", f"{ours}.{j}.block.3")
        return len(indices)

    def swap_inputs(theirs: str, ours: str, first_width: int) -> None:
        """1x1/3x3 conv whose input channels are [A (first_width), B] there and [B, A] here."""
        w = keys.take(f"{theirs}.weight", ndim=4)
        keys.put(f"{ours}.weight", torch.cat([w[:, first_width:], w[:, :first_width]], dim=1), f"{theirs}.weight")
        keys.copy(f"{theirs}.bias", f"{ours}.bias")

    # encoders: bottom (stride 4) = conv, relu, conv, relu, conv, res...; top (stride 2) = conv, relu, conv, res...
    for i in (0, 2, 4):
        conv(f"enc_b.blocks.{i}", f"encoders.0.{i}")
    res_stack("enc_b", "encoders.0.5", 5)
    for i in (0, 2):
        conv(f"enc_t.blocks.{i}", f"encoders.1.{i}")
    res_stack("enc_t", "encoders.1.3", 3)
    conv("quantize_conv_t", "quant_convs.1")
    swap_inputs("quantize_conv_b", "quant_convs.0", d)  # [dec_t, enc_b] -> [enc_b, dec_t]
    for theirs, ours in (("quantize_b", "quantize.0"), ("quantize_t", "quantize.1")):
        keys.copy(f"{theirs}.embed", f"{ours}.embedding.weight", lambda t: t.t().contiguous())
        keys.copy(f"{theirs}.cluster_size", f"{ours}.ema_count")
        keys.copy(f"{theirs}.embed_avg", f"{ours}.ema_sum", lambda t: t.t().contiguous())
    # decoders: conv, res..., relu, convT (, relu, convT)
    conv("dec_t.blocks.0", "cond_decoders.0.0")
    n = res_stack("dec_t", "cond_decoders.0.1", 1)
    conv(f"dec_t.blocks.{n + 2}", "cond_decoders.0.2")
    conv("upsample_t", "upsamplers.1.0")
    swap_inputs("dec.blocks.0", "decoder.0", d)  # [upsampled top, bottom] -> [bottom, upsampled top]
    n = res_stack("dec", "decoder.1", 1)
    conv(f"dec.blocks.{n + 2}", "decoder.2")
    conv(f"dec.blocks.{n + 4}", "decoder.4")

    params = {"strides": [4, 2], "ema": True}
    for theirs, ours in KWARGS.items():
        params[ours] = h[theirs]
    res = h["resolution"]
    construct = {"channels": h["in_channel"], "resolution": [res, res] if isinstance(res, int) else res}
    model = core.build("tokenizer", "vqvae2", params, construct, keys, fresh=FRESH)
    core.save(out, model, "rosinality/vq-vae-2-pytorch", source, keys)
    return model


convert_vqvae2.Params = core.hyper_parameters_model(
    "VQVAE2Params", PRESETS["rosinality"], {"resolution": "training image size (also --resolution)",
                                            "in_channel": "their VQVAE(in_channel): image channels"},
    "rosinality's VQVAE() keyword arguments (and the image size); each optional: inferred from the tensors")
