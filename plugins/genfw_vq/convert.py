"""Convert a taming-transformers VQ-GAN checkpoint (Esser et al. 2021) into a genfw checkpoint.

genfw's ``vqgan`` keeps taming's ``VQModel`` names, so the key mapping is small
(docs/tokenizers.md):

* ``loss.perceptual_loss.*`` (the fixed LPIPS network) is dropped — genfw loads LPIPS from
  ``perceptual_weights`` instead, and the taming checkpoint itself can serve as that file;
* genfw's quantizer bookkeeping buffers (``quantize.unused_steps``, ``quantize.initialised``,
  and with ``ema`` the moving averages) are added fresh;
* a leading ``module.`` (DataParallel) is stripped; anything else unknown is an error.

Parameters come from the checkpoint's hyper-parameters when it holds them (``ddconfig``,
``lossconfig``, ``n_embed``, ``embed_dim``), else are inferred from tensor shapes; explicit
``params`` override both. This is the one place genfw reads a pickle-based file, and it does so
with ``torch.load(weights_only=True)``, which refuses to run code from the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from genfw import checkpoint
from genfw.errors import CheckpointError
from genfw.registry import get_registry

DROPPED_PREFIXES = ("loss.perceptual_loss.",)
FRESH_BUFFERS = ("quantize.unused_steps", "quantize.initialised", "quantize.ema_count", "quantize.ema_sum")


def read_torch_file(path: str | os.PathLike) -> Any:
    """Load a user's own ``.pth``/``.ckpt`` safely: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read {path} safely (weights_only): {first}. If it holds Python objects besides "
            "tensors, save just its weights where it was written: "
            "torch.save(torch.load(ckpt)['state_dict'], 'weights.pt'), and convert that"
        ) from None


def _state_and_hparams(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} does not hold a state dict (got {type(obj).__name__})")
    hparams = obj.get("hyper_parameters") or obj.get("hparams") or {}
    state = obj.get("state_dict", obj)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "quantize.embedding.weight" not in state or "encoder.conv_in.weight" not in state:
        raise CheckpointError(f"{source} is not a taming-transformers VQModel checkpoint "
                              "(no quantize.embedding.weight / encoder.conv_in.weight)")
    return state, dict(hparams) if isinstance(hparams, dict) else {}


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def infer_params(state: dict[str, torch.Tensor], hparams: dict[str, Any], resolution: int) -> dict[str, Any]:
    """``vqgan`` params from taming hyper-parameters when present, else from tensor shapes."""
    codebook_size, embed_dim = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    attn = [resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state]
    disc_convs = [k for k, v in state.items() if k.startswith("loss.discriminator.main.") and v.ndim == 4]
    params: dict[str, Any] = {
        "codebook_size": int(codebook_size), "embed_dim": int(embed_dim), "ch": int(ch), "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks, "attn_resolutions": attn,
        "z_channels": int(state["quant_conv.weight"].shape[1]),
    }
    if disc_convs:
        params["disc_layers"] = len(disc_convs) - 2
        params["disc_ndf"] = int(state["loss.discriminator.main.0.weight"].shape[0])
    dd = hparams.get("ddconfig") or {}
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "dropout"):
        if key in dd:
            params[key] = list(dd[key]) if isinstance(dd[key], (list, tuple)) else dd[key]
    if "n_embed" in hparams:
        params["codebook_size"] = int(hparams["n_embed"])
    if "embed_dim" in hparams:
        params["embed_dim"] = int(hparams["embed_dim"])
    loss = (hparams.get("lossconfig") or {}).get("params") or {}
    for theirs, ours in (("disc_start", "disc_start"), ("disc_weight", "disc_weight"),
                         ("codebook_weight", "codebook_weight"), ("perceptual_weight", "perceptual_weight"),
                         ("disc_num_layers", "disc_layers"), ("disc_ndf", "disc_ndf")):
        if theirs in loss:
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
    ``resolution`` is the training image size (default: the checkpoint's, else 256).
    """
    source = os.fspath(src)
    state, hparams = _state_and_hparams(read_torch_file(src), source)
    dd = hparams.get("ddconfig") or {}
    resolution = int(resolution or dd.get("resolution") or 256)
    channels = int(channels or dd.get("in_channels") or state["encoder.conv_in.weight"].shape[1])
    merged = {**infer_params(state, hparams, resolution), **(params or {})}
    model = get_registry().build("tokenizer", "vqgan", merged, channels=channels, resolution=[resolution, resolution])
    ours = model.state_dict()
    mapped = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    unexpected = sorted(set(mapped) - set(ours))
    if unexpected:
        raise CheckpointError(f"{source}: tensors with no place in genfw's vqgan: {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    missing = sorted(k for k in set(ours) - set(mapped) if k not in FRESH_BUFFERS)
    if missing:
        raise CheckpointError(f"{source}: the checkpoint lacks {missing[:5]}{'...' if len(missing) > 5 else ''} "
                              "(is it a VQModel with these params?)")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)}, genfw expects "
                                  f"{tuple(ours[k].shape)} for the inferred params")
    model.load_state_dict({**ours, **mapped}, strict=True)
    if model.quantize.ema:  # moving averages consistent with the loaded codebook
        model.quantize.ema_sum.copy_(model.quantize.embedding.weight.detach() * model.quantize.ema_count[:, None])
    model.eval()
    checkpoint.save(out, model, extra={"converted_from": "taming-transformers", "source": os.path.basename(source)})
    return model
