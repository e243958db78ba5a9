"""Generating and inpainting images with a tokenizer and its priors (one per level, top-down).

Shared by the pipeline's sample stage, ``genfw sample`` and ``genfw inpaint``. Sampling runs
under ``torch.inference_mode`` with bf16/fp16 autocast on CUDA, in chunks of ``batch_size``.

Under ``torchrun`` the chunks are dealt out to the ranks (chunk ``k`` to rank ``k mod world``)
and each chunk draws from its own generator seeded ``seed + k``: the images are the same
whatever the number of processes, each is made (and handed to ``on_chunk``, i.e. written) by
one rank only, and the whole result is then gathered on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from genfw import dist, limits
from genfw.errors import CheckpointError, ConfigError
from genfw.interfaces import Prior, Tokenizer
from genfw.train import autocast_context


def resolve_device(name: str | None) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a clear error for unavailable devices."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s): use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}' requested but MPS is not available: use --device cpu")
    return device


def sample_labels(n: int, num_classes: int, labels: list[int] | None) -> torch.Tensor | None:
    """Labels for ``n`` samples: the given list cycled, or round-robin over the classes."""
    if n < 1:
        raise ConfigError(f"the number of samples must be at least 1, got {n}")
    limits.check("samples", n, "the number of samples")
    if num_classes <= 0:
        if labels:
            raise ConfigError("labels were given but the model is unconditional")
        return None
    if labels:
        bad = [lab for lab in labels if not 0 <= lab < num_classes]
        if bad:
            raise ConfigError(f"labels {bad} out of range: the model has classes 0..{num_classes - 1}")
        seq = labels
    else:
        seq = list(range(num_classes))
    return torch.tensor([seq[i % len(seq)] for i in range(n)], dtype=torch.long)


@dataclass
class SampleResult:
    images: torch.Tensor  # [n, C, H, W] in [-1, 1], CPU float32
    codes: list[torch.Tensor]  # per level, CPU int64
    labels: torch.Tensor | None
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images.shape[0] / max(self.seconds, 1e-9)


#: Sampler keys a command-line flag sets; a prior without one of them ignores it.
FLAG_KEYS = ("steps", "temperature", "temperature_end", "sample_proportion", "sample_proportion_end")


def flag_overrides(steps: int | None = None, temperature: float | None = None, temperature_end: float | None = None,
                   proportion: float | None = None, proportion_end: float | None = None) -> dict[str, Any]:
    """Sampler params from command-line flags: a start value without its end value is a constant.

    ``--temperature 0.5`` alone means 0.5 at every step (the end value stored with a model is
    replaced too); ``--temperature 1.0 --temperature-end 0.7`` anneals. Same for the proportion.
    """
    out: dict[str, Any] = {}
    if steps is not None:
        out["steps"] = steps
    for key, start, end in (("temperature", temperature, temperature_end),
                            ("sample_proportion", proportion, proportion_end)):
        if start is not None:
            out[key] = start
            out[f"{key}_end"] = start if end is None else end
        elif end is not None:
            out[f"{key}_end"] = end
    return out


def apply_flag_overrides(priors: list[Prior], stored: dict[str, Any], flags: dict[str, Any]) -> list[Any]:
    """Each prior's sampler params: the stored ones, then the flags that prior has.

    A flag no prior understands is an error (e.g. ``--proportion`` for an autoregressive model).
    """
    # An end value implied by its start (a constant) is fine for a prior without schedules.
    implied = {f"{k}_end" for k in ("temperature", "sample_proportion") if k in flags and flags.get(f"{k}_end") == flags[k]}
    unused = [k for k in flags if k not in implied and not any(k in p.SamplerParams.model_fields for p in priors)]
    if unused:
        names = ", ".join("--" + k.replace("sample_", "").replace("_", "-") for k in unused)
        raise ConfigError(f"{names}: not a sampler setting of this model's prior(s) "
                          f"({', '.join(type(p).__name__ for p in priors)})")
    merged = {**stored, **flags}
    return [p.sampler_params({k: v for k, v in merged.items()
                              if k in p.SamplerParams.model_fields or k not in FLAG_KEYS}) for p in priors]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_for_sampling(tokenizer: Tokenizer, priors: list[Prior], device: torch.device) -> None:
    """Move to ``device`` in eval mode; on CUDA, convolutional decoders get channels-last weights.

    cuDNN then runs NHWC kernels through the whole decoder instead of converting layouts between
    layers (on CPU, measured, channels-last is no faster, so the default layout stays).
    """
    tokenizer.to(device).eval()
    if device.type == "cuda":
        tokenizer.to(memory_format=torch.channels_last)
    for p in priors:
        p.to(device).eval()


@torch.inference_mode()
def generate(
    tokenizer: Tokenizer,
    priors: list[Prior],
    n: int,
    *,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 16,
    sampler: list[Any] | Any | None = None,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
    grid: tuple[int, int] | None = None,
    init_codes: list[torch.Tensor] | None = None,
    masks: list[torch.Tensor] | None = None,
    on_chunk: Callable[[int, torch.Tensor, list[torch.Tensor]], None] | None = None,
    progress: str | None = "sampling",
    split: bool | None = None,
) -> SampleResult:
    """Sample ``n`` images top-down through the levels, in chunks of ``batch_size``.

    ``sampler`` is one SamplerParams (or dict) for all levels or a list, one per level.
    ``init_codes``/``masks`` (per level, [n, h, w]) inpaint: only masked positions change.
    ``grid`` asks for a code grid larger than the training one (single-level models only).
    Chunk ``k`` uses a generator seeded with ``seed + k``, so results depend on seed and
    batch size only. ``on_chunk(start, images, codes)`` receives each chunk as it is made (for
    writing images as they come, so an interruption keeps them). ``progress`` names the
    progress bar (None: no bar). ``split`` (default: under ``torchrun``) deals the chunks out to
    the ranks, every rank must then call; False samples everything in this process.
    """
    from genfw.progress import progress_bar

    device = torch.device(device)
    if len(priors) != len(tokenizer.levels):
        raise ConfigError(f"{len(priors)} priors for a tokenizer with {len(tokenizer.levels)} levels")
    if grid is not None and len(priors) > 1:
        raise ConfigError("--size (larger-than-training grids) works with single-level tokenizers only")
    samplers = sampler if isinstance(sampler, list) else [sampler] * len(priors)
    samplers = [p.sampler_params(s) for p, s in zip(priors, samplers)]
    check_sampling_sizes(tokenizer, priors, n, batch_size, samplers, precision, grid)
    prepare_for_sampling(tokenizer, priors, device)
    split = dist.is_initialized() if split is None else split and dist.is_initialized()
    chunks = list(enumerate(range(0, n, batch_size)))
    mine = [chunks[i] for i in dist.shard(len(chunks))] if split else chunks
    made: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []  # (start, images, codes per level)
    evaluations = 0
    _sync(device)
    t0 = time.perf_counter()
    total = sum(min(batch_size, n - start) for _, start in mine)
    with progress_bar(progress, total=total) if progress else nullcontext(None) as bar:
        for k, start in mine:
            m = min(batch_size, n - start)
            g = torch.Generator(device=device).manual_seed(seed + k)
            chunk_labels = labels[start : start + m].to(device) if labels is not None else None
            codes: list[torch.Tensor] = []
            with autocast_context(device, precision):
                for level, (prior, sp) in enumerate(zip(priors, samplers)):
                    init = init_codes[level][start : start + m].to(device) if init_codes is not None else None
                    mask = masks[level][start : start + m].to(device) if masks is not None else None
                    c = prior.sample(m, labels=chunk_labels, context=codes[:level] or None, init=init, mask=mask,
                                     generator=g, params=sp, grid=grid)
                    evaluations += int(getattr(prior, "last_sample_stats", {}).get("backbone_evaluations", 0))
                    codes.append(c)
                out = tokenizer.decode(codes)
            check_outputs(priors, codes, out, start)
            made.append((start, out.float().clamp(-1, 1).cpu(), [c.cpu() for c in codes]))
            if on_chunk is not None:
                on_chunk(start, made[-1][1], made[-1][2])
            if bar is not None:
                bar.advance(m)
    _sync(device)
    if split:
        made = dist.gather(made, dst=None)
        evaluations = sum(dist.gather([evaluations], dst=None))
        made.sort(key=lambda chunk: chunk[0])
    seconds = time.perf_counter() - t0  # under torchrun: until the last rank's chunks arrived
    stats = {"backbone_evaluations": evaluations} if evaluations else {}
    images = torch.cat([chunk[1] for chunk in made])
    codes_out = [torch.cat([chunk[2][level] for chunk in made]) for level in range(len(priors))]
    return SampleResult(images, codes_out, labels, seconds, stats)


@torch.inference_mode()
def decode_codes(tokenizer: Tokenizer, codes: list[torch.Tensor], batch_size: int,
                 device: torch.device | str) -> torch.Tensor:
    """Code grids (per level, [n, h, w]) -> images [n, C, H, W] (CPU float32), in chunks of
    ``batch_size``; under ``torchrun`` the chunks are dealt out to the ranks and every rank gets
    all the images (every rank must call it)."""
    n = codes[0].shape[0]
    starts = list(range(0, n, batch_size))
    made = [(start, tokenizer.decode([c[start : start + batch_size].to(device) for c in codes]).float().cpu())
            for start in (starts[i] for i in dist.shard(len(starts)))]
    made = sorted(dist.gather(made, dst=None), key=lambda chunk: chunk[0])
    return torch.cat([images for _, images in made])


def check_sampling_sizes(tokenizer: Tokenizer, priors: list[Prior], n: int, batch_size: int, samplers: list[Any],
                         precision: str, grid: tuple[int, int] | None) -> None:
    """Bound what a sampling call asks for (count, batch, steps, grid, image memory) before any work."""
    if n < 1:
        raise ConfigError(f"the number of samples must be at least 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"unknown precision '{precision}': use bf16, fp16 or fp32")
    limits.check("samples", n, "the number of samples")
    limits.check("batch", batch_size, "the batch size")
    for sp in samplers:
        for key, value in sp.model_dump().items():
            if (key == "steps" or key.endswith("_steps")) and isinstance(value, int):
                limits.check("sampler_steps", value, f"sampler param {key}")
    if grid is not None:
        h, w = grid
        if h < 1 or w < 1:
            raise ConfigError(f"--size must be positive, got {h}x{w}")
        limits.check("grid_tokens", h * w, f"the code grid {h}x{w}", " tokens")
    tokens = max(int(np.prod(grid or p.grid)) for p in priors)
    limits.check("batch_tokens", min(n, batch_size) * tokens, f"batch {min(n, batch_size)} x {tokens} codes")
    resolution = tokenizer.construct.get("resolution") if hasattr(tokenizer, "construct") else None
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        pixels = int(resolution[0]) * int(resolution[1])
        if grid is not None:  # a larger grid decodes to a proportionally larger image
            pixels = pixels * h * w // max(1, int(np.prod(priors[0].grid)))
        channels = int(tokenizer.construct.get("channels", 3) or 3)
        gib = n * channels * pixels * 4 / 2**30
        if gib > limits.limit("sample_gib"):
            raise ConfigError(f"{n:,} images of {channels}x{pixels:,} pixels need {gib:,.1f} GiB in memory, beyond "
                              f"genfw's limit of {limits.limit('sample_gib')} GiB: sample fewer images per call, "
                              "or raise the limit with GENFW_MAX_SAMPLE_GIB=N")


def check_outputs(priors: list[Prior], codes: list[torch.Tensor], images: torch.Tensor, start: int) -> None:
    """Refuse to write images from codes out of range or from non-finite decoder outputs."""
    for level, (prior, c) in enumerate(zip(priors, codes)):
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= prior.codebook_size):
            raise CheckpointError(f"prior {level} produced codes outside 0..{prior.codebook_size - 1}: the model is "
                                  "corrupt; no images were written from it")
    if not bool(torch.isfinite(images).all()):
        raise CheckpointError(f"decoding samples {start}.. gave NaN/inf pixels: the model is corrupt (or its "
                              "precision overflowed: try --precision fp32); no images were written from it")


def latent_masks(tokenizer: Tokenizer, pixel_mask: torch.Tensor) -> list[torch.Tensor]:
    """Pixel mask [B, H, W] (True = regenerate) -> one latent mask per level.

    Megapixel-SUNDAE section 3.6: a latent position is regenerated when any pixel of its f x f
    patch is masked, i.e. it is known only when all of its pixels are known.
    """
    b, h, w = pixel_mask.shape
    out = []
    for level, (gh, gw) in zip(tokenizer.levels, tokenizer.grid_shapes(h, w)):
        f = level.factor
        if h % f or w % f:
            raise ConfigError(f"mask size {h}x{w} is not divisible by the tokenizer's factor {f}")
        pooled = F.max_pool2d(pixel_mask.float()[:, None], kernel_size=f, stride=f)[:, 0] > 0
        if gw != pooled.shape[-1]:  # e.g. `pixels` lays channel planes side by side
            if gw % pooled.shape[-1]:
                raise ConfigError(f"cannot map a {h}x{w} mask onto a {gh}x{gw} code grid")
            pooled = pooled.repeat(1, 1, gw // pooled.shape[-1])
        out.append(pooled)
    return out
