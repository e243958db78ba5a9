"""Convert a taming-transformers VQ-GAN checkpoint (Esser et al. 2021) into a genfw checkpoint.

genfw's ``vqgan`` keeps taming's ``VQModel`` names, so the key mapping is small
(docs/tokenizers.md):

* ``loss.perceptual_loss.*`` (the fixed LPIPS network) is dropped — genfw loads LPIPS from
  ``perceptual_weights`` instead, and the taming checkpoint itself can serve as that file;
* genfw's quantizer bookkeeping buffers (``quantize.unused_steps``, ``quantize.initialised``,
  and with ``ema`` the moving averages) are added fresh;
* a leading ``module.`` (DataParallel) is stripped; anything else unknown is an error.

The architecture is read off the tensor layout (widths, levels, blocks, which levels have
attention); ``n_embed``/``embed_dim``/``ddconfig``/``lossconfig`` hyper-parameters, when the file
holds them, add what the layout cannot say (dropout, the training resolution, the loss settings).
Explicit ``params`` override both. A generator-only file (no ``loss.discriminator.*``, as
released for inference) converts too: the discriminator is freshly initialised, and the output
file says so. The model is first built on the ``meta`` device and checked against the file's
tensor shapes with the bounds of ``genfw.load`` (:func:`genfw.convert.build_state`) before
any weight is read. This is the one place genfw reads a pickle-based file, and it does so with
``torch.load(weights_only=True)`` (memory-mapped when the file allows), which refuses to run
code from the file.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from genfw import convert as core
from genfw.convert import overrides_of, read_torch_file
from genfw.errors import CheckpointError

DROPPED_PREFIXES = ("loss.perceptual_loss.",)
FRESH_BUFFERS = ("quantize.unused_steps", "quantize.initialised", "quantize.ema_count", "quantize.ema_sum")


def _state_and_hparams(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} does not hold a state dict (got {type(obj).__name__})")
    hparams = obj.get("hyper_parameters") or obj.get("hparams") or {}
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: its state_dict is a {type(state).__name__}, not a mapping")
    state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "quantize.embedding.weight" not in state or "encoder.conv_in.weight" not in state:
        raise CheckpointError(f"{source} is not a taming-transformers VQModel checkpoint "
                              "(no quantize.embedding.weight / encoder.conv_in.weight)")
    for key, t in state.items():
        # A pickle may give a tensor a shape its stored data does not fill (zero strides): the
        # sizes inferred from it would then not be backed by the file.
        need = t.numel() * t.element_size()
        if need > t.untyped_storage().nbytes() - t.storage_offset() * t.element_size():
            raise CheckpointError(f"{source}: tensor {key} claims shape {tuple(t.shape)} that its stored data "
                                  f"({t.untyped_storage().nbytes()} bytes) does not hold: the file is corrupt or hostile")
    return state, dict(hparams) if isinstance(hparams, dict) else {}


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def _shape(state: dict[str, torch.Tensor], key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: the checkpoint lacks {key} (is it a taming-transformers VQModel?)")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: tensor {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def attention_levels(state: dict[str, torch.Tensor], source: str = "checkpoint") -> list[int]:
    """Indices of the encoder/decoder levels that hold self-attention blocks (they must agree)."""
    enc = _indices(state, r"encoder\.down\.(\d+)\.attn\.")
    dec = _indices(state, r"decoder\.up\.(\d+)\.attn\.")
    if enc != dec:
        raise CheckpointError(f"{source}: attention at encoder levels {enc} but decoder levels {dec}; taming's "
                              "VQModel places both by the same attn_resolutions")
    return enc


def _section(mapping: dict[str, Any], key: str, source: str, where: str = "hyper-parameters") -> dict[str, Any]:
    """``mapping[key]`` as a mapping ({} when absent); anything else is a one-line error."""
    value = mapping.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: {where} {key} is a {type(value).__name__}, not a mapping: the file is "
                              "corrupt or not a taming-transformers checkpoint (pass --resolution and --set to "
                              "give what it lacks)")
    return value


def infer_resolution(state: dict[str, torch.Tensor], hparams: dict[str, Any], resolution: int | None,
                     source: str = "checkpoint") -> int:
    """The training image size: given, else the checkpoint's ``ddconfig.resolution``, else an error."""
    dd = _section(hparams, "ddconfig", source)
    value = resolution if resolution is not None else dd.get("resolution")
    if value is None:
        raise CheckpointError(f"cannot tell the training resolution of {source} (it holds no ddconfig): "
                              "pass --resolution, the image size it was trained on (e.g. 256)")
    side = core.max_image_side()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= side:
        raise CheckpointError(f"{source}: invalid resolution {value!r} (an image side in 1..{side})")
    return value


# taming's lossconfig.params -> genfw vqgan params (the names the VQGAN loss of genfw understands)
LOSS_KEYS = (("disc_start", "disc_start"), ("disc_weight", "disc_weight"), ("codebook_weight", "codebook_weight"),
             ("perceptual_weight", "perceptual_weight"), ("disc_num_layers", "disc_layers"), ("disc_ndf", "disc_ndf"))


def infer_params(state: dict[str, torch.Tensor], hparams: dict[str, Any], resolution: int,
                 source: str = "checkpoint") -> dict[str, Any]:
    """``vqgan`` params from the tensor layout, completed by taming hyper-parameters when present.

    ``attn_resolutions`` always come from the layout (levels with attention blocks), expressed as
    feature heights of the given training ``resolution``: a ``ddconfig`` written for another
    resolution cannot misplace them.
    """
    codebook_size, embed_dim = _shape(state, "quantize.embedding.weight", source, 2)
    ch = _shape(state, "encoder.conv_in.weight", source, 4)[0]
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder levels {levels} are not 0..n-1")
    ch_mult = [_shape(state, f"encoder.down.{i}.block.0.conv1.weight", source, 4)[0] // ch for i in levels]
    num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    attn = [resolution // 2**i for i in attention_levels(state, source)]
    params: dict[str, Any] = {
        "codebook_size": int(codebook_size), "embed_dim": int(embed_dim), "ch": int(ch), "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks, "attn_resolutions": attn,
        "z_channels": int(_shape(state, "quant_conv.weight", source, 4)[1]),
    }
    disc_convs = [k for k, v in state.items() if k.startswith("loss.discriminator.main.") and v.ndim == 4]
    if disc_convs:
        params["disc_layers"] = len(disc_convs) - 2
        params["disc_ndf"] = int(state["loss.discriminator.main.0.weight"].shape[0])
    dd = _section(hparams, "ddconfig", source)
    if "dropout" in dd:
        params["dropout"] = dd["dropout"]
    loss = _section(_section(hparams, "lossconfig", source), "params", source, "lossconfig")
    for theirs, ours in LOSS_KEYS:
        if theirs in loss and not (disc_convs and ours in ("disc_layers", "disc_ndf")):
            params[ours] = loss[theirs]
    return params


def convert_taming(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    params: dict[str, Any] | None = None,
    resolution: int | None = None,
    channels: int | None = None,
) -> torch.nn.Module:
    """Read taming checkpoint ``src``, save it as a genfw ``vqgan`` checkpoint at ``out``; return the module.

    ``params`` override the inferred ``vqgan`` params (e.g. ``{"perceptual_weight": 0}``);
    ``resolution`` is the training image size (default: the checkpoint's ``ddconfig``; required
    when the file has none).
    """
    source = os.fspath(src)
    state, hparams = _state_and_hparams(read_torch_file(src), source)
    resolution = infer_resolution(state, hparams, resolution, source)
    in_channels = _shape(state, "encoder.conv_in.weight", source, 4)[1]
    if channels is not None and channels != in_channels:
        raise CheckpointError(f"{source} takes {in_channels}-channel images, not {channels}")
    merged = {**infer_params(state, hparams, resolution, source), **(params or {})}
    mapped = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    generator_only = not any(k.startswith("loss.discriminator.") for k in mapped)
    fresh = set(FRESH_BUFFERS)
    if generator_only:
        probe = core.probe("tokenizer", "vqgan", merged, channels=in_channels, resolution=[resolution, resolution])
        fresh |= {k for k in probe.state_dict() if k.startswith("loss.discriminator.")}
        del probe
    model = core.build_state("tokenizer", "vqgan", merged, {"channels": in_channels,
                             "resolution": [resolution, resolution]}, mapped, source, fresh=fresh)
    if model.quantize.ema:  # moving averages consistent with the loaded codebook
        model.quantize.ema_sum.copy_(model.quantize.embedding.weight.detach() * model.quantize.ema_count[:, None])
    model.eval()
    extra = {"converted_from": "taming-transformers", "source": os.path.basename(source)}
    if generator_only:
        extra["discriminator"] = "freshly initialised (the source holds only the generator)"
    core.write(out, model, extra=extra)
    return model


def _taming_params() -> type:
    from genfw_vq.vqgan import VQGAN

    return overrides_of(VQGAN.Params, "TamingParams",
                        "genfw vqgan params that override what the checkpoint implies (--set perceptual_weight=0)")


convert_taming.Params = _taming_params()
