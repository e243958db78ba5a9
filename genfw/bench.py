"""``genfw bench``: how fast a recipe's or a model's sampling runs, against this machine's limit.

The papers sell speed (megapixel-SUNDAE: a 1024x1024 sample in about 2 s on a GTX 1080Ti with
100 steps plus VQ-GAN decoding), so genfw measures it the same way on any machine:

* prior forward ms per step at batch B, its FLOPs (counted with ``FlopCounterMode``, attention
  included), the achieved FLOP/s, and that as a fraction of the throughput of a large matrix
  multiply in the same dtype measured in the same process (the machine's practical peak);
* sampling ms per image at the recipe's step count (``prior.sample`` with the recipe's sampler
  params), tokenizer decode ms per image, images per second end to end, and peak memory.

Every time is the median of ``repeats`` runs after a warm-up, synchronised on CUDA. A recipe is
benchmarked with random weights built on the target device (nothing is trained and no data is
read); a bundle or run directory with its trained weights. Sampling runs exactly as
:func:`genfw.sampling.generate` does: ``torch.inference_mode``, bf16/fp16 autocast on CUDA (fp32 on
CPU unless bf16 is asked for), channels-last convolutional decoders on CUDA, and optionally
``torch.compile``d backbones.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from genfw import checkpoint
from genfw.errors import ConfigError, GenfwError
from genfw.interfaces import Prior, Tokenizer
from genfw.progress import console as progress_console
from genfw.progress import enabled as progress_enabled
from genfw.registry import get_registry
from genfw.sampling import prepare_for_sampling, resolve_device, sample_labels

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchModels:
    """What is benchmarked: the tokenizer, one prior per level and their sampler params."""

    tokenizer: Tokenizer
    priors: list[Prior]
    samplers: list[BaseModel]
    weights: str  # "random" (built from a recipe) or "trained" (loaded)
    notes: list[str] = field(default_factory=list)


def _say(text: str) -> None:
    if progress_enabled():
        progress_console.print(f"[dim]bench:[/dim] {text}", highlight=False)


# --------------------------------------------------------------------------------------------
# building or loading the models


def _is_recipe(source: str) -> bool:
    return source.lower().endswith((".yaml", ".yml"))


def _from_recipe(source: str, overrides: list[str] | None, device: torch.device) -> BenchModels:
    """Tokenizer and priors of a recipe with random weights, built directly on ``device``."""
    from genfw.config import load_recipe

    resolved = load_recipe(source, overrides)
    recipe, registry, notes = resolved.recipe, get_registry(), []
    # Channels and resolution come from the params alone: no data has to be on disk.
    dataset = registry.build("dataset", recipe.data.name, resolved.data_params)
    channels, resolution = dataset.channels, tuple(dataset.resolution)
    num_classes = 0
    if recipe.class_conditional:
        try:
            num_classes = dataset.num_classes
        except GenfwError:
            notes.append("class count unknown without the dataset: benchmarked unconditional")
    with torch.device(device):
        tokenizer = registry.build("tokenizer", recipe.tokenizer.name, resolved.tokenizer_params,
                                   channels=channels, resolution=list(resolution))
        levels, grids = tokenizer.levels, tokenizer.grid_shapes(*resolution)
        priors = []
        for level, spec in enumerate(resolved.prior_specs):
            construct = {
                "codebook_size": levels[level].codebook_size,
                "grid": list(grids[level]),
                "num_classes": num_classes,
                "context": [[levels[j].codebook_size, *grids[j]] for j in range(level)],
                "backbone": spec.backbone.model_dump(),
            }
            priors.append(registry.build("prior", spec.name, resolved.prior_params[level], **construct))
    return BenchModels(tokenizer, priors, list(resolved.sampler_params), "random", notes)


def _from_model(source: str, device: torch.device) -> BenchModels:
    """A bundle file or a run directory, with its sampler defaults."""
    from genfw.pipeline import load_run_models

    if os.path.isdir(source):
        tokenizer, priors, extra = load_run_models(source, device)
    else:
        loaded = checkpoint.load(source, device=device)
        if not isinstance(loaded, checkpoint.Bundle):
            raise ConfigError(f"{source} holds a single {getattr(loaded, 'kind', 'model')}, not a pipeline bundle: "
                              "export one with `genfw export RUN_DIR -o model.safetensors`, or bench a recipe")
        tokenizer, priors, extra = loaded.tokenizer, loaded.priors, loaded.extra
    defaults = extra.get("sampler") or {}
    samplers = [p.sampler_params({k: v for k, v in defaults.items() if k in p.SamplerParams.model_fields})
                for p in priors]
    return BenchModels(tokenizer, priors, samplers, "trained")


def load_models(source: str, device: torch.device, overrides: list[str] | None = None,
                steps: int | None = None) -> BenchModels:
    """Build a recipe's models with random weights, or load a bundle / run directory.

    ``steps`` replaces the sampler's step count for priors that have one.
    """
    if _is_recipe(source):
        models = _from_recipe(source, overrides, device)
    elif os.path.exists(source) or "://" in source:
        if overrides:
            raise ConfigError("--set overrides apply to recipes; a model's sampler params come from the file")
        models = _from_model(source, device)
    else:
        raise ConfigError(f"{source}: no such recipe, bundle or run directory")
    if steps is not None:
        models.samplers = [p.sampler_params(s, steps=steps) if "steps" in p.SamplerParams.model_fields else s
                           for p, s in zip(models.priors, models.samplers, strict=True)]
    return models


def compile_backbones(priors: list[Prior], **options: Any) -> None:
    """``torch.compile`` every prior's backbone in place (parameter names are unchanged).

    Shapes that change while sampling (SUNDAE's shrinking batch, absorbing's active subset)
    recompile once and then run with a dynamic batch dimension.
    """
    for prior in priors:
        backbone = getattr(prior, "backbone", None)
        if isinstance(backbone, torch.nn.Module):
            backbone.compile(**options)


# --------------------------------------------------------------------------------------------
# measuring


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU; fp16 needs CUDA."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 autocast needs CUDA: use --precision fp32 or bf16 on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision`` on ``device`` (nothing for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device: torch.device, precision: str, size: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of a ``size`` x ``size`` matrix multiply in ``precision``: this process's practical peak.

    fp32 on CUDA runs in whatever TF32 mode the process has, as the model's matmuls do.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    dtype = DTYPES[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    with torch.inference_mode():
        seconds = median_seconds(lambda: a @ b, device, repeats, warmup=2)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "flops_per_second": 2 * size**3 / seconds}


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def forward_flops(backbone: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """FLOPs of one backbone forward (matmuls and attention; elementwise ops are not counted).

    The CPU's fused attention kernel is missing from ``FlopCounterMode``'s table: it is counted
    with the same formula as the CUDA kernels (2 matmuls of ``n x n x head_dim`` per head).
    """
    from torch.utils.flop_counter import FlopCounterMode

    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_attention: _cpu_attention_flops} if cpu_attention is not None else {}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.inference_mode():
        backbone(**inputs)
    return int(counter.get_total_flops())


def forward_inputs(prior: Prior, batch_size: int, device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    """Random codes (and labels, coarser levels) shaped as the prior's backbone expects."""
    h, w = prior.grid
    k = prior.codebook_size
    ctx = [torch.randint(v, (batch_size, ch, cw), generator=generator, device=device)
           for v, ch, cw in prior.construct.get("context", [])]
    labels = (torch.randint(prior.num_classes, (batch_size,), generator=generator, device=device)
              if prior.num_classes else None)
    return {"tokens": torch.randint(k, (batch_size, h, w), generator=generator, device=device),
            "labels": labels, "context": ctx or None}


def _memory_start(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _memory_report(device: torch.device, start: int) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda max_memory_allocated during sampling and decoding"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_memory_bytes": int(peak), "peak_memory_increase_bytes": int(peak - start),
            "peak_memory_kind": "cpu peak resident set size of the process (ru_maxrss: weights, Python and "
                                "all allocations); the increase is how much sampling raised that peak"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def bench(
    source: str,
    *,
    batch_size: int = 4,
    steps: int | None = None,
    device: str | None = "auto",
    precision: str = "auto",
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    repeats: int = 3,
    overrides: list[str] | None = None,
    matmul_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure a recipe's (random weights) or a model's sampling speed; returns the JSON record."""
    if batch_size < 1 or repeats < 1:
        raise ConfigError("--batch-size and --repeats must be at least 1")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    _say(f"loading {source} on {dev}")
    models = load_models(source, dev, overrides, steps)
    tokenizer, priors = models.tokenizer, models.priors
    prepare_for_sampling(tokenizer, priors, dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    inputs = [forward_inputs(p, batch_size, dev, g) for p in priors]
    flops = [forward_flops(p.backbone, x) for p, x in zip(priors, inputs, strict=True)]  # before compiling
    if compile:
        _say("compiling the backbones (torch.compile)")
        compile_backbones(priors)

    _say(f"matmul peak ({precision})")
    peak = matmul_peak(dev, precision, matmul_size)

    levels = []
    for level, (prior, x, fl, sp) in enumerate(zip(priors, inputs, flops, models.samplers, strict=True)):
        _say(f"prior {level} forward, batch {batch_size}")
        with torch.inference_mode(), autocast(dev, precision):
            seconds = median_seconds(lambda p=prior, x=x: p.backbone(**x), dev, repeats, warmup=2 if compile else 1)
        levels.append({
            "level": level, "prior": _component_name(prior), "backbone": _component_name(prior.backbone),
            "parameters": sum(p.numel() for p in prior.parameters()), "grid": list(prior.grid),
            "codebook_size": prior.codebook_size, "sampler": sp.model_dump(),
            "forward_ms": 1e3 * seconds, "forward_flops": fl,
            "achieved_flops_per_second": fl / seconds,
            "fraction_of_matmul_peak": fl / seconds / peak["flops_per_second"],
        })

    labels = sample_labels(batch_size, priors[0].num_classes, None)
    labels = labels.to(dev) if labels is not None else None

    def sample_once(repeat: int, warm: bool = False) -> dict[str, Any]:
        """One chunk as generate() makes it: every level top-down, then decode."""
        gen = torch.Generator(device=dev).manual_seed(seed + repeat)
        codes: list[torch.Tensor] = []
        record: dict[str, Any] = {"levels": []}
        with torch.inference_mode(), autocast(dev, precision):
            for prior, sp in zip(priors, models.samplers, strict=True):
                if warm and "steps" in type(sp).model_fields:
                    sp = prior.sampler_params(sp, steps=min(sp.steps, 2))
                synchronize(dev)
                t0 = time.perf_counter()
                c = prior.sample(batch_size, labels=labels, context=codes or None, generator=gen, params=sp)
                synchronize(dev)
                stats = dict(getattr(prior, "last_sample_stats", {}) or {})
                record["levels"].append({"seconds": time.perf_counter() - t0, "steps": stats.get("steps"),
                                         "backbone_evaluations": stats.get("backbone_evaluations")})
                codes.append(c)
            t0 = time.perf_counter()
            images = tokenizer.decode(codes).float().clamp(-1, 1).cpu()  # .cpu() synchronises
            record["decode_seconds"] = time.perf_counter() - t0
        record["images"] = images.shape[0]
        return record

    _say("sampling warm-up")
    sample_once(-1, warm=True)
    memory_start = _memory_start(dev)
    runs = []
    for r in range(repeats):
        _say(f"sampling {batch_size} images, run {r + 1}/{repeats}")
        runs.append(sample_once(r))
    memory = _memory_report(dev, memory_start)

    for level, info in enumerate(levels):
        per = [run["levels"][level] for run in runs]
        seconds = statistics.median(p["seconds"] for p in per)
        steps_run = statistics.median(p["steps"] for p in per) if per[0]["steps"] else None
        info["sample_ms_per_image"] = 1e3 * seconds / batch_size
        info["steps"] = steps_run
        info["backbone_evaluations"] = per[0]["backbone_evaluations"]
        if steps_run:
            info["sample_ms_per_step"] = 1e3 * seconds / steps_run
            info["step_over_forward"] = info["sample_ms_per_step"] / info["forward_ms"]
    decode = statistics.median(run["decode_seconds"] for run in runs)
    total = statistics.median(sum(lv["seconds"] for lv in run["levels"]) + run["decode_seconds"] for run in runs)
    return {
        "source": source, "weights": models.weights, "notes": models.notes,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "precision": precision, "compile": compile,
        "batch_size": batch_size, "repeats": repeats,
        "matmul_peak": peak, "priors": levels,
        "sample_ms_per_image": sum(lv["sample_ms_per_image"] for lv in levels),
        "decode_ms_per_image": 1e3 * decode / batch_size,
        "seconds_per_image": total / batch_size, "images_per_second": batch_size / total,
        **memory,
    }


def _component_name(module: torch.nn.Module) -> str:
    from genfw.registry import component_name

    try:
        return component_name(module)
    except GenfwError:  # built outside the registry: the class name is label enough
        return type(module).__name__


# --------------------------------------------------------------------------------------------
# output


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def print_table(result: dict[str, Any], console: Console) -> None:
    """The benchmark as a rich table (one column of values per prior level where it applies)."""
    peak = result["matmul_peak"]
    title = (f"genfw bench {result['source']} — {result['device_name']}, {result['precision']}, "
             f"batch {result['batch_size']}{', compiled' if result['compile'] else ''}, "
             f"{result['weights']} weights, median of {result['repeats']}")
    table = Table(title=title)
    table.add_column("measure")
    for lv in result["priors"]:
        table.add_column(f"level {lv['level']}: {lv['prior']} / {lv['backbone']}", justify="right")
    rows = [
        ("parameters", lambda lv: f"{lv['parameters'] / 1e6:.1f} M"),
        ("grid / codes", lambda lv: f"{lv['grid'][0]}x{lv['grid'][1]} of {lv['codebook_size']}"),
        ("prior forward ms (batch)", lambda lv: f"{lv['forward_ms']:.1f}"),
        ("FLOPs per forward", lambda lv: _si(lv["forward_flops"], "FLOP")),
        ("achieved FLOP/s", lambda lv: _si(lv["achieved_flops_per_second"], "FLOP/s")),
        ("fraction of matmul peak", lambda lv: f"{lv['fraction_of_matmul_peak']:.1%}"),
        ("sampler steps run", lambda lv: "-" if lv.get("steps") is None else f"{lv['steps']:g}"),
        ("sampling ms per step", lambda lv: f"{lv['sample_ms_per_step']:.1f}" if "sample_ms_per_step" in lv else "-"),
        ("step / forward", lambda lv: f"{lv['step_over_forward']:.3f}" if "step_over_forward" in lv else "-"),
        ("sampling ms per image", lambda lv: f"{lv['sample_ms_per_image']:.1f}"),
    ]
    for name, cell in rows:
        table.add_row(name, *[cell(lv) for lv in result["priors"]])
    console.print(table)
    summary = Table(show_header=False)
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    summary.add_row(f"matmul peak ({peak['size']}^2, {peak['dtype']})", _si(peak["flops_per_second"], "FLOP/s"))
    summary.add_row("sampling ms per image (all levels)", f"{result['sample_ms_per_image']:.1f}")
    summary.add_row("decode ms per image", f"{result['decode_ms_per_image']:.1f}")
    summary.add_row("seconds per image (end to end)", f"{result['seconds_per_image']:.3f}")
    summary.add_row("images per second", f"{result['images_per_second']:.3f}")
    summary.add_row("peak memory", _si(result["peak_memory_bytes"], "B"))
    console.print(summary)
    console.print(f"[dim]memory: {result['peak_memory_kind']}[/dim]", highlight=False)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
