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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from genfw import dist, limits
from genfw.devices import autocast_context, free_memory_bytes
from genfw.errors import CheckpointError, ConfigError, GenfwError
from genfw.interfaces import Prior, Tokenizer
from genfw.progress import progress_bar


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


def check_count(n: object, what: str = "the number of samples") -> int:
    """``n`` as an int (a Python or NumPy integer; not 2.5, '3' or True), or one line saying what it must be."""
    import operator

    try:
        value = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        value = None
    if value is None:
        raise ConfigError(f"{what} must be an integer, got {n!r}")
    return value


def choose_seed(seed: object) -> int:
    """A checked seed (0..2**63-1); None draws a fresh random one (``SampleResult.stats['seed']`` records it)."""
    if seed is None:
        import secrets

        return secrets.randbits(63)
    return limits.check_seed(seed)


def sample_labels(n: int, num_classes: int, labels: list[int] | None) -> torch.Tensor | None:
    """Labels for ``n`` samples: the given list cycled, or round-robin over the classes."""
    n = check_count(n)
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
    seed: int | None = 0,
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
    batch size only (``seed=None``: a random seed, recorded in ``stats["seed"]``).
    ``on_chunk(start, images, codes)`` receives each chunk as it is made (for
    writing images as they come, so an interruption keeps them). ``progress`` names the
    progress bar (None: no bar). ``split`` (default: under ``torchrun``) deals the chunks out to
    the ranks, every rank must then call; False samples everything in this process.
    """
    device = torch.device(device)
    n, batch_size = check_count(n), check_count(batch_size, "the batch size")
    seed = choose_seed(seed)
    if len(priors) != len(tokenizer.levels):
        raise ConfigError(f"{len(priors)} priors for a tokenizer with {len(tokenizer.levels)} levels")
    if grid is not None and len(priors) > 1:
        raise ConfigError("--size (larger-than-training grids) works with single-level tokenizers only")
    samplers = sampler if isinstance(sampler, list) else [sampler] * len(priors)
    samplers = [p.sampler_params(s) for p, s in zip(priors, samplers)]
    check_sampling_sizes(tokenizer, priors, n, batch_size, samplers, precision, grid, device)
    prepare_for_sampling(tokenizer, priors, device)
    split = dist.is_initialized() if split is None else split and dist.is_initialized()
    chunks = list(enumerate(range(0, n, batch_size)))
    mine = [chunks[i] for i in dist.shard(len(chunks))] if split else chunks
    made: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []  # (start, images, codes per level)
    evaluations = 0
    _sync(device)
    t0 = time.perf_counter()
    total = sum(min(batch_size, n - start) for _, start in mine)
    with progress_bar(progress, total=total) if progress else nullcontext(None) as bar, \
            _memory_as_error(device, batch_size):
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
    stats: dict[str, Any] = {"seed": seed}
    if evaluations:
        stats["backbone_evaluations"] = evaluations
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


def activation_bytes(prior: Prior, batch: int, tokens: int) -> int:
    """A lower bound of what one backbone evaluation of ``batch`` grids of ``tokens`` codes holds.

    Per token, in float32: four copies of the logits over the vocabulary (logits, softmax, noise,
    the update), sixteen activations of the backbone's width (input, queries/keys/values, the 4x
    MLP hidden layer and its activation, output), and 1 KiB for the codes, masks and position
    tables. Measured on CPU (SUNDAE, width 16, vocabulary 5): 2.0 KiB per token with the
    transformer, 3.3 KiB with the hourglass; this gives 2.1 KiB. Attention scores are not
    counted (SDPA need not materialise them).
    """
    vocab = int(getattr(prior, "codebook_size", 0) or 0) + 1  # + a mask or special token
    params = getattr(getattr(prior, "backbone", None), "params", None)
    width = getattr(params, "dim", 0)
    width = int(width) if isinstance(width, int) and not isinstance(width, bool) else 0
    return batch * tokens * (4 * (4 * vocab + 16 * width) + 1024)


def check_activation_memory(priors: list[Prior], batch: int, grid: tuple[int, int] | None,
                            device: torch.device | str | None) -> None:
    """Refuse a sampling chunk whose activations cannot fit the device's free memory, in one line."""
    device = torch.device(device or "cpu")
    bound_gib = limits.limit("activation_gib")
    bound = bound_gib * 2**30 if bound_gib else free_memory_bytes(device)
    if bound is None:
        return
    for level, p in enumerate(priors):
        h, w = grid or tuple(p.grid)
        need = activation_bytes(p, batch, int(h) * int(w))
        if need > bound:
            source = (f"{limits.env_var('activation_gib')}={bound_gib}" if bound_gib
                      else f"the {bound / 2**30:.1f} GiB free on {device}")
            raise ConfigError(
                f"sampling {batch} image(s) at a time on a {h}x{w} code grid needs at least {need / 2**30:,.1f} GiB of "
                f"activations (prior {level} '{type(p).__name__}'), more than {source}: lower --batch-size "
                f"(batch_size), or raise the limit with {limits.env_var('activation_gib')}=N (GiB)")


@contextmanager
def _memory_as_error(device: torch.device, batch_size: int) -> Iterator[None]:
    """An allocation the estimate did not foresee fails in one line, not an allocator traceback."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in text:
            raise
        first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        raise GenfwError(f"sampling ran out of memory on {device} ({first}): lower --batch-size (now {batch_size}) "
                         "or the grid size") from None


def check_sampling_sizes(tokenizer: Tokenizer, priors: list[Prior], n: int, batch_size: int, samplers: list[Any],
                         precision: str, grid: tuple[int, int] | None, device: torch.device | str | None = None) -> None:
    """Bound what a sampling call asks for (count, batch, steps, grid, image and activation memory) before any work."""
    if n < 1:
        raise ConfigError(f"the number of samples must be at least 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"unknown precision '{precision}': use bf16, fp16 or fp32")
    limits.check("samples", n, "the number of samples")
    limits.check("batch", batch_size, "the batch size")
    for sp in samplers:
        limits.check_sampler_steps(sp.model_dump())
    if grid is not None:
        h, w = grid
        if h < 1 or w < 1:
            raise ConfigError(f"--size must be positive, got {h}x{w}")
        limits.check("grid_tokens", h * w, f"the code grid {h}x{w}", " tokens")
    tokens = max(int(np.prod(grid or p.grid)) for p in priors)
    limits.check("batch_tokens", min(n, batch_size) * tokens, f"batch {min(n, batch_size)} x {tokens} codes")
    check_activation_memory(priors, min(n, batch_size), grid, device)
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
