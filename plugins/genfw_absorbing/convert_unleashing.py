"""Convert Unleashing Transformers checkpoints (Bond-Taylor et al. 2022; samb-t/unleashing-transformers).

``genfw convert unleashing FILE`` takes either file the authors' training writes:

* ``absorbing[_ema]_<step>.th`` (``train_sampler.py``: ``torch.save(AbsorbingDiffusion.state_dict())``):
  the transformer under ``_denoise_fn.`` becomes a genfw ``absorbing`` prior over a ``transformer``
  backbone (learned positions, biased q/k/v as theirs; their separate ``query``/``key``/``value``
  weights are stacked into one projection). Dropped and listed: the sampler's loss-history
  buffers (``Lt_history``, ``Lt_count``, ``loss_history``) and ``start_tok`` (used only by their
  autoregressive sampler). Their ``sample_steps`` and ``temp`` become the file's sampler defaults,
  which ``genfw assemble`` puts into the bundle.
* ``vqgan[_ema]_<step>.th`` (``train_vqgan.py``): handed to the ``unleashing-vqgan`` converter
  (genfw_vq), which writes a ``vqgan`` tokenizer.

The hyper-parameters are not in the files: ``--config`` takes the ``H`` they were trained with as
JSON/YAML (the fields of ``HparamsAbsorbing`` + ``HparamsVQGAN``), ``--preset ffhq|churches|bedrooms``
the repository's defaults; ``--set`` changes one (e.g. ``--set sample_steps=100``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from genfw import convert as core
from genfw.errors import CheckpointError, ConfigError, GenfwError

FORMAT = "Unleashing Transformers absorbing-diffusion"
_PRIOR = {"bert_n_emb": 512, "bert_n_head": 8, "bert_n_layers": 24, "block_size": 256, "codebook_size": 1024,
          "latent_shape": [1, 16, 16], "total_steps": 256, "sample_steps": 256, "temp": 1.0,
          "loss_type": "reweighted_elbo", "mask_schedule": "random", "sampler": "absorbing",
          "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
#: ``hparams/defaults/sampler_defaults.py`` + the VQ-GAN's latent shape and codebook (all three datasets).
PRESETS = {name: dict(_PRIOR, dataset=name) for name in ("ffhq", "churches", "bedrooms")}
USED = set(_PRIOR) | {"dataset"}
#: set by ``HparamsAbsorbing`` whatever the dataset
DEFAULTS = {"loss_type": "reweighted_elbo", "mask_schedule": "random", "total_steps": 256, "sample_steps": 256,
            "temp": 1.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "sampler": "absorbing"}


def _params(h: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    if h["sampler"] != "absorbing":
        raise ConfigError(f"sampler '{h['sampler']}': only the absorbing-diffusion prior converts")
    latent = list(h["latent_shape"])
    if len(latent) != 3 or latent[0] != 1:
        raise ConfigError(f"latent_shape {latent}: expected [1, h, w]")
    dropout = max(float(h["attn_pdrop"]), float(h["embd_pdrop"]), float(h["resid_pdrop"]))
    backbone = {"name": "transformer", "params": {
        "dim": h["bert_n_emb"], "depth": h["bert_n_layers"], "heads": h["bert_n_head"], "mlp_ratio": 4.0,
        "dropout": dropout, "positions": "learned", "qkv_bias": True, "norm_eps": 1e-5}}
    params = {"timesteps": h["total_steps"], "loss_type": h["loss_type"], "masking": h["mask_schedule"]}
    construct = {"codebook_size": h["codebook_size"], "grid": latent[1:], "num_classes": 0, "context": [],
                 "backbone": backbone}
    sampler = {"steps": h["sample_steps"], "temperature": float(h["temp"])}
    return params, construct, sampler


def convert_unleashing(src: str | os.PathLike, out: str | os.PathLike, *, config: str | None = None,
                       preset: str | None = None, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """Convert UT's absorbing prior (or, dispatched, its VQ-GAN) at ``src`` into a genfw model at ``out``."""
    source = os.fspath(src)
    state = core.tensor_dict(core.read_torch_file(src), source, "Unleashing Transformers")
    if any(k.startswith("ae.") for k in state):
        vqgan = core.load_converter("unleashing-vqgan")
        return vqgan(src, out, config=config, preset=preset, overrides=overrides)
    if "_denoise_fn.tok_emb.weight" not in state:
        hint = (" (it looks like a taming-transformers VQModel: use genfw convert taming)"
                if "encoder.conv_in.weight" in state or "quantize.embedding.weight" in state else "")
        raise CheckpointError(f"{source} is not an Unleashing Transformers checkpoint: it has neither "
                              f"_denoise_fn.tok_emb.weight (absorbing prior) nor ae.* (VQ-GAN){hint}")
    h = core.hyper_parameters(config, preset, overrides, PRESETS, USED, "unleashing absorbing", DEFAULTS)
    try:
        params, construct, sampler = _params(h)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid unleashing hyper-parameters: {e}") from None

    keys = core.KeyMap(state, source, FORMAT)
    t, b = "_denoise_fn.", "backbone."
    keys.copy(f"{t}tok_emb.weight", f"{b}embed.tokens.weight")
    pos = keys.take(f"{t}pos_emb.weight" if keys.has(f"{t}pos_emb.weight") else f"{t}pos_emb", ndim=3)
    n = construct["grid"][0] * construct["grid"][1]
    if pos.shape[1] < n:
        raise CheckpointError(f"{source}: pos_emb has {pos.shape[1]} positions (block_size), fewer than the "
                              f"{n} tokens of the latent grid {construct['grid']}")
    keys.put(f"{b}positions", pos[0, :n], f"{t}pos_emb")  # their forward uses the first h*w rows
    keys.drop(f"{t}start_tok")
    depth = int(construct["backbone"]["params"]["depth"])
    for i in range(depth):
        src_blk, dst = f"{t}blocks.{i}", f"{b}blocks.{i}"
        keys.copy_prefix(f"{src_blk}.ln1", f"{dst}.norm1")
        keys.copy_prefix(f"{src_blk}.ln2", f"{dst}.norm2")
        for name in ("weight", "bias"):  # one projection, rows [q; k; v] as genfw splits them
            parts = [keys.take(f"{src_blk}.attn.{p}.{name}") for p in ("query", "key", "value")]
            keys.put(f"{dst}.attn.qkv.{name}", torch.cat(parts, 0), f"{src_blk}.attn.query/key/value.{name}")
        keys.copy_prefix(f"{src_blk}.attn.proj", f"{dst}.attn.proj")
        keys.copy_prefix(f"{src_blk}.mlp.0", f"{dst}.mlp.fc1")
        keys.copy_prefix(f"{src_blk}.mlp.2", f"{dst}.mlp.fc2")
    keys.copy_prefix(f"{t}ln_f", f"{b}norm")
    keys.copy(f"{t}head.weight", f"{b}head.weight")
    for buffer in ("Lt_history", "Lt_count", "loss_history"):
        keys.drop(lambda k, buffer=buffer: k == buffer)
    model = core.build("prior", "absorbing", params, construct, keys)
    core.save(out, model, "samb-t/unleashing-transformers", source, keys, extra={"sampler": sampler})
    return model


def _params_model() -> type:
    # one `genfw convert unleashing` takes both files: a VQ-GAN file goes to unleashing-vqgan with these --set
    prior = core.hyper_parameters_model(
        "UnleashingPriorParams", PRESETS["ffhq"], {"dataset": "their H.dataset"},
        "Unleashing Transformers' H (hparams/) that the absorbing-prior converter reads")
    try:
        vqgan = core.load_converter("unleashing-vqgan").Params
    except (GenfwError, AttributeError):  # no VQ-GAN converter installed: prior files only
        return prior
    made = type("UnleashingParams", (prior, vqgan), {"__doc__": (
        "Unleashing Transformers' H (hparams/) of the absorbing prior or, for a VQ-GAN file, of the VQ-GAN; "
        "each optional: from --config/--preset")})
    return made


convert_unleashing.Params = _params_model()
