"""``genfw bench``: how fast a recipe's or a model's sampling runs, against this machine's limit.

The papers sell speed (megapixel-SUNDAE: a 1024x1024 sample in about 2 s on a GTX 1080Ti with
100 steps plus VQ-GAN decoding), so genfw measures it the same way on any machine:

* prior forward ms at batch B, its FLOPs (counted with ``FlopCounterMode``, attention included),
  the achieved FLOP/s, and that as a fraction of this process's practical matmul peak in the same
  dtype: the best warm, pre-allocated ``torch.mm(a, b, out=c)`` over several sizes, measured just
  before and just after the model (the larger counts; both are reported; every dtype on CUDA);
* sampling ms per step and per image at the recipe's step count (``prior.sample`` with the recipe's
  sampler params), split into the backbone's own time (every backbone call timed while sampling)
  and the sampler's overhead (the rest of the loop); the step over a forward measured in the same
  repeat; tokenizer decode ms per image, images per second end to end, and peak memory.

Forwards and sampling runs alternate: each repeat times one forward of every prior and then one
sampling run, so slow phases of a loaded machine hit both alike. Every time is reported as the
median with its min and max over ``repeats`` (all values are in the JSON), after a warm-up,
synchronised on CUDA (the backbone's time inside sampling and the matmuls: CUDA events). A recipe is
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
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


class Stopwatch:
    """Times regions of work on ``device``: the wall clock on CPU, CUDA events on CUDA.

    On CUDA each region is a pair of events recorded on the device's current stream, so a region
    measures the device's time between them and nothing synchronises while work is queued;
    :meth:`seconds` synchronises once and reads them all.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._regions: list[Any] = []

    @contextmanager
    def region(self) -> Iterator[None]:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._regions.append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._regions.append(time.perf_counter() - t0)

    def seconds(self) -> list[float]:
        """Every region's duration in seconds, in the order they were opened."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return [start.elapsed_time(end) / 1e3 for start, end in self._regions]  # elapsed_time: ms
        return list(self._regions)


def spread(values: list[float]) -> dict[str, Any]:
    """A timing over its repeats: median, min, max and every value (in the order measured)."""
    if not values:
        raise ValueError("spread of no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


def _inverse_spread(s: dict[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """The spread of ``scale / x`` from that of ``x`` (its median is ``scale / median``)."""
    return {"median": scale / s["median"], "min": scale / s["max"], "max": scale / s["min"], "n": s["n"],
            "values": [scale / v for v in s["values"]]}


def _timed_runs(fn: Callable[[], Any], device: torch.device, *, min_runs: int, max_runs: int,
                budget_s: float) -> list[float]:
    """Seconds of each of ``min_runs``..``max_runs`` runs of ``fn()``, stopping once ``budget_s`` is spent."""
    watch, t0 = Stopwatch(device), time.perf_counter()
    runs = 0
    while runs < max_runs and (runs < min_runs or time.perf_counter() - t0 < budget_s):
        with watch.region():
            fn()
        synchronize(device)  # so that the budget counts the device's time, not only the launches
        runs += 1
    return watch.seconds()


CPU_MATMUL_SIZES = (1024, 2048, 4096)
MAX_MATMUL_SIZE = 32768  # three fp32 operands of 4 GiB each
CUDA_MATMUL_SIZES = (4096, 8192, 16384)
MATMUL_METHOD = ("torch.mm(a, b, out=c) on pre-allocated square operands, 2 warm-up multiplies, then the best "
                 "(shortest) of {min_runs}-{max_runs} runs per size (at most ~{budget_s:g} s per size); "
                 "the peak is the largest rate over the sizes and over the measurements before and after the "
                 "model")


def _dtype_label(precision: str, device: torch.device) -> str:
    """The dtype name, with the TF32 mode of fp32 matmuls on CUDA (the model's fp32 matmuls share it)."""
    name = str(DTYPES[precision]).removeprefix("torch.")
    if precision == "fp32" and device.type == "cuda":
        mode = torch.get_float32_matmul_precision()
        return {"highest": name, "high": f"{name} (tf32)"}.get(mode, f"{name} (matmul precision {mode})")
    return name


def check_matmul_sizes(sizes: Sequence[int] | int | None) -> list[int]:
    """The asked matmul sizes as a list (empty: the device's defaults), each within 1..MAX_MATMUL_SIZE."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes or ())
    bad = [s for s in sizes if not 1 <= s <= MAX_MATMUL_SIZE]
    if bad:
        raise ConfigError(f"--matmul-size must be between 1 and {MAX_MATMUL_SIZE}, got {bad[0]}")
    return sizes


def _available_cpu_memory() -> float:
    """Linux's MemAvailable in bytes (infinite where unknown: nothing is refused then)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        kib = None
    return float("inf") if kib is None else kib * 1024.0


def matmul_rates(device: torch.device, precision: str, sizes: Sequence[int] | int | None = None, *,
                 min_runs: int = 5, max_runs: int = 50, budget_s: float = 2.0) -> list[dict[str, Any]]:
    """FLOP/s of warm square ``torch.mm(a, b, out=c)`` at each size in ``precision`` (best of the runs).

    The operands and the output are allocated once per size and multiplied twice before timing, so
    no run pays for allocation, page faults or first-call dispatch. A size that does not fit on a
    CUDA device is skipped (its record says so).
    """
    sizes = check_matmul_sizes(sizes) or list(CUDA_MATMUL_SIZES if device.type == "cuda" else CPU_MATMUL_SIZES)
    dtype, records = DTYPES[precision], []
    for size in sizes:
        skipped = {"dtype": _dtype_label(precision, device), "size": size}
        if device.type == "cpu" and 3 * size * size * dtype.itemsize > _available_cpu_memory() / 2:
            records.append({**skipped, "skipped": "operands would take over half the available memory"})
            continue
        try:
            a, b, c = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(3))
        except torch.cuda.OutOfMemoryError:
            records.append({**skipped, "skipped": "out of memory"})
            continue
        with torch.inference_mode():
            for _ in range(2):
                torch.mm(a, b, out=c)
            synchronize(device)
            seconds = _timed_runs(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), device,
                                  min_runs=min_runs, max_runs=max_runs, budget_s=budget_s)
        del a, b, c
        best = min(seconds)
        records.append({"dtype": _dtype_label(precision, device), "size": size, "runs": len(seconds),
                        "seconds": best, "flops_per_second": 2 * size**3 / best,
                        "seconds_spread": spread(seconds)})
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the largest operands would otherwise stay reserved while sampling
    return records


def matmul_peak(device: torch.device, precision: str, sizes: Sequence[int] | int | None = None,
                **runs: Any) -> dict[str, Any]:
    """This process's practical matmul peak in ``precision``: the best size of :func:`matmul_rates`."""
    records = matmul_rates(device, precision, sizes, **runs)
    measured = [r for r in records if "flops_per_second" in r]
    if not measured:
        raise GenfwError(f"no matmul size fitted on {device}: pass a smaller --matmul-size")
    best = max(measured, key=lambda r: r["flops_per_second"])
    return {"dtype": best["dtype"], "size": best["size"], "seconds": best["seconds"],
            "flops_per_second": best["flops_per_second"], "sizes": records}


def peak_precisions(device: torch.device, precision: str) -> list[str]:
    """The dtypes whose peak is measured: every one on CUDA, fp32 (and the asked one) on CPU."""
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]
    return sorted({"fp32", precision}, key=PRECISIONS.index)


def _peak_table(device: torch.device, precisions: list[str], sizes: Sequence[int] | None,
                **runs: Any) -> dict[str, dict[str, Any]]:
    return {p: matmul_peak(device, p, sizes, **runs) for p in precisions}


class _TimedBackbone(torch.nn.Module):
    """Stands in for a prior's backbone while sampling: times every forward and ``decode_step``.

    Everything else (``init_cache``, attributes) passes through to the backbone. It wraps the
    module from outside, so a ``torch.compile``d backbone runs its compiled code unchanged.
    """

    def __init__(self, inner: torch.nn.Module, watch: Stopwatch):
        super().__init__()
        self.inner = inner
        self.watch = watch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.watch.region():
            return self.inner(*args, **kwargs)

    def decode_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.watch.region():
            return self.inner.decode_step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


@contextmanager
def timed_backbone(prior: Prior, watch: Stopwatch) -> Iterator[bool]:
    """Time ``prior``'s backbone calls into ``watch`` while inside; yields whether it could."""
    inner = getattr(prior, "backbone", None)
    if not isinstance(inner, torch.nn.Module) or not isinstance(prior, torch.nn.Module):
        yield False
        return
    prior.backbone = _TimedBackbone(inner, watch)
    try:
        yield True
    finally:
        prior.backbone = inner


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


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


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
    matmul_size: Sequence[int] | int | None = None,
    seed: int = 0,
    matmul_runs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure a recipe's (random weights) or a model's sampling speed; returns the JSON record.

    Order: the matmul peak, then per repeat one forward of every prior and one sampling run (so a
    step and a forward of the same repeat are measured seconds apart), then the matmul peak again.
    """
    if batch_size < 1 or repeats < 1:
        raise ConfigError("--batch-size and --repeats must be at least 1")
    check_matmul_sizes(matmul_size)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    load_before = _load_average()
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
    labels = sample_labels(batch_size, priors[0].num_classes, None)
    labels = labels.to(dev) if labels is not None else None

    def forward_once(prior: Prior, x: dict[str, Any]) -> float:
        """Wall seconds of one backbone forward, synchronised, as a sampling step is timed."""
        with torch.inference_mode(), autocast(dev, precision):
            synchronize(dev)
            t0 = time.perf_counter()
            prior.backbone(**x)
            synchronize(dev)
        return time.perf_counter() - t0

    def sample_once(repeat: int, warm: bool = False) -> dict[str, Any]:
        """One chunk as generate() makes it: every level top-down, then decode."""
        gen = torch.Generator(device=dev).manual_seed(seed + repeat)
        codes: list[torch.Tensor] = []
        record: dict[str, Any] = {"levels": []}
        with torch.inference_mode(), autocast(dev, precision):
            for prior, sp in zip(priors, models.samplers, strict=True):
                if warm and "steps" in type(sp).model_fields:
                    sp = prior.sampler_params(sp, steps=min(sp.steps, 2))
                network = Stopwatch(dev)
                with timed_backbone(prior, network) as timed:
                    synchronize(dev)
                    t0 = time.perf_counter()
                    c = prior.sample(batch_size, labels=labels, context=codes or None, generator=gen, params=sp)
                    synchronize(dev)
                    seconds = time.perf_counter() - t0
                stats = dict(getattr(prior, "last_sample_stats", {}) or {})
                record["levels"].append({"seconds": seconds, "steps": stats.get("steps"),
                                         "network_seconds": sum(network.seconds()) if timed else None,
                                         "backbone_evaluations": stats.get("backbone_evaluations")})
                codes.append(c)
            t0 = time.perf_counter()
            images = tokenizer.decode(codes).float().clamp(-1, 1).cpu()  # .cpu() synchronises
            record["decode_seconds"] = time.perf_counter() - t0
        record["images"] = images.shape[0]
        return record

    precisions = peak_precisions(dev, precision)
    _say(f"matmul peak before the model ({', '.join(precisions)})")
    peak_before = _peak_table(dev, precisions, matmul_size, **(matmul_runs or {}))

    _say("warm-up: forwards and a short sampling run")
    for prior, x in zip(priors, inputs, strict=True):
        for _ in range(2 if compile else 1):
            forward_once(prior, x)
    sample_once(-1, warm=True)
    memory_start = _memory_start(dev)
    forwards: list[list[float]] = [[] for _ in priors]  # [level][repeat]
    runs = []
    for r in range(repeats):
        _say(f"repeat {r + 1}/{repeats}: one forward per prior (batch {batch_size}), then sampling {batch_size} images")
        for level, (prior, x) in enumerate(zip(priors, inputs, strict=True)):
            forwards[level].append(forward_once(prior, x))
        runs.append(sample_once(r))
    memory = _memory_report(dev, memory_start)

    _say("matmul peak after the model")
    peak_after = _peak_table(dev, precisions, matmul_size, **(matmul_runs or {}))
    rate = max(peak_before[precision]["flops_per_second"], peak_after[precision]["flops_per_second"])
    peak = dict(peak_before[precision] if peak_before[precision]["flops_per_second"] == rate
                else peak_after[precision])
    peak.pop("sizes")
    peak["measured"] = "before" if peak_before[precision]["flops_per_second"] == rate else "after"
    runs_kw = {"min_runs": 5, "max_runs": 50, "budget_s": 2.0, **(matmul_runs or {})}
    peak["method"] = MATMUL_METHOD.format(**runs_kw)
    peak["before"], peak["after"] = peak_before, peak_after

    levels = []
    for level, (prior, fl, sp) in enumerate(zip(priors, flops, models.samplers, strict=True)):
        per = [run["levels"][level] for run in runs]
        fwd = forwards[level]
        timings: dict[str, list[float]] = {
            "forward_ms": [1e3 * s for s in fwd],
            "achieved_flops_per_second": [fl / s for s in fwd],
            "fraction_of_matmul_peak": [fl / s / rate for s in fwd],
            "sample_ms_per_image": [1e3 * p["seconds"] / batch_size for p in per],
        }
        steps_run = [p["steps"] for p in per]
        if all(steps_run):
            timings["sample_ms_per_step"] = [1e3 * p["seconds"] / n for p, n in zip(per, steps_run, strict=True)]
            # Each repeat's step over the forward measured just before it (same repeat).
            timings["step_over_forward"] = [1e3 * p["seconds"] / n / f_ms for p, n, f_ms
                                            in zip(per, steps_run, timings["forward_ms"], strict=True)]
            if all(p["network_seconds"] is not None for p in per):
                timings["network_ms_per_step"] = [1e3 * p["network_seconds"] / n
                                                  for p, n in zip(per, steps_run, strict=True)]
                timings["sampler_overhead_ms_per_step"] = [1e3 * (p["seconds"] - p["network_seconds"]) / n
                                                           for p, n in zip(per, steps_run, strict=True)]
        if all(p["network_seconds"] is not None for p in per):
            timings["sampler_overhead_fraction"] = [1 - p["network_seconds"] / p["seconds"] for p in per]
        spreads = {k: spread(v) for k, v in timings.items()}
        levels.append({
            "level": level, "prior": _component_name(prior), "backbone": _component_name(prior.backbone),
            "parameters": sum(p.numel() for p in prior.parameters()), "grid": list(prior.grid),
            "codebook_size": prior.codebook_size, "sampler": sp.model_dump(),
            "forward_flops": fl,
            "steps": statistics.median(steps_run) if all(steps_run) else None,
            "backbone_evaluations": per[0]["backbone_evaluations"],
            **{k: s["median"] for k, s in spreads.items()},
            "spread": spreads,
        })

    decode = spread([1e3 * run["decode_seconds"] / batch_size for run in runs])
    per_image = spread([(sum(lv["seconds"] for lv in run["levels"]) + run["decode_seconds"]) / batch_size
                        for run in runs])
    sampling = spread([sum(1e3 * lv["seconds"] for lv in run["levels"]) / batch_size for run in runs])
    spreads = {"sample_ms_per_image": sampling, "decode_ms_per_image": decode, "seconds_per_image": per_image,
               "images_per_second": _inverse_spread(per_image)}
    return {
        "source": source, "weights": models.weights, "notes": models.notes,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "precision": precision, "compile": compile,
        "batch_size": batch_size, "repeats": repeats,
        "load_average": {"before": load_before, "after": _load_average()},
        "matmul_peak": peak, "priors": levels,
        **{k: s["median"] for k, s in spreads.items()},
        "spread": spreads,
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


def _spread_cell(s: dict[str, Any] | None, fmt: Callable[[float], str]) -> str:
    """``median (min-max)`` of a timing's spread."""
    if s is None:
        return "-"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def _si_spread(s: dict[str, Any] | None, unit: str) -> str:
    """``median (min-max) unit`` with one SI prefix, the median's."""
    if s is None:
        return "-"
    factor, prefix = next(((f, p) for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
                           if abs(s["median"]) >= f), (1.0, ""))

    def num(v: float) -> str:  # about 3 significant digits, never in e-notation
        v /= factor
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"

    if s["n"] == 1:
        return f"{num(s['median'])} {prefix}{unit}"
    return f"{num(s['median'])} ({num(s['min'])}-{num(s['max'])}) {prefix}{unit}"


def print_table(result: dict[str, Any], console: Console) -> None:
    """The benchmark as rich tables: per prior level, the summary, and the matmul peaks."""
    peak = result["matmul_peak"]
    title = (f"genfw bench {result['source']} — {result['device_name']}, {result['precision']}, "
             f"batch {result['batch_size']}{', compiled' if result['compile'] else ''}, "
             f"{result['weights']} weights, median (min-max) of {result['repeats']} repeats")
    table = Table(title=title)
    table.add_column("measure")
    for lv in result["priors"]:
        table.add_column(f"level {lv['level']}: {lv['prior']} / {lv['backbone']}", justify="right")

    def timed(key: str, fmt: Callable[[float], str]) -> Callable[[dict[str, Any]], str]:
        return lambda lv: _spread_cell(lv["spread"].get(key), fmt)

    def ms(v: float) -> str:
        return f"{v:.1f}"

    rows = [
        ("parameters", lambda lv: f"{lv['parameters'] / 1e6:.1f} M"),
        ("grid / codes", lambda lv: f"{lv['grid'][0]}x{lv['grid'][1]} of {lv['codebook_size']}"),
        ("prior forward ms (batch)", timed("forward_ms", ms)),
        ("FLOPs per forward", lambda lv: _si(lv["forward_flops"], "FLOP")),
        ("achieved FLOP/s", lambda lv: _si_spread(lv["spread"].get("achieved_flops_per_second"), "FLOP/s")),
        (f"fraction of matmul peak ({peak['dtype']})", timed("fraction_of_matmul_peak", lambda v: f"{v:.1%}")),
        ("sampler steps run", lambda lv: "-" if lv.get("steps") is None else f"{lv['steps']:g}"),
        ("sampling ms per step", timed("sample_ms_per_step", ms)),
        ("  network (backbone) ms per step", timed("network_ms_per_step", ms)),
        ("  sampler overhead ms per step", timed("sampler_overhead_ms_per_step", ms)),
        ("sampler overhead share of sampling", timed("sampler_overhead_fraction", lambda v: f"{v:.1%}")),
        ("step / forward (same repeat)", timed("step_over_forward", lambda v: f"{v:.3f}")),
        ("sampling ms per image", timed("sample_ms_per_image", ms)),
    ]
    for name, cell in rows:
        table.add_row(name, *[cell(lv) for lv in result["priors"]])
    console.print(table)

    sp = result["spread"]
    summary = Table(show_header=False)
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    summary.add_row("sampling ms per image (all levels)", _spread_cell(sp["sample_ms_per_image"], ms))
    summary.add_row("decode ms per image", _spread_cell(sp["decode_ms_per_image"], ms))
    summary.add_row("seconds per image (end to end)", _spread_cell(sp["seconds_per_image"], lambda v: f"{v:.3f}"))
    summary.add_row("images per second", _spread_cell(sp["images_per_second"], lambda v: f"{v:.3f}"))
    summary.add_row("peak memory", _si(result["peak_memory_bytes"], "B"))
    load = result.get("load_average") or {}
    if load.get("before") and load.get("after"):
        summary.add_row("load average before / after (1, 5, 15 min)",
                        f"{', '.join(map(str, load['before']))} / {', '.join(map(str, load['after']))}")
    console.print(summary)

    peaks = Table(title=f"matmul peak: best warm torch.mm(out=) per size; the fraction uses the larger "
                        f"({_si(peak['flops_per_second'], 'FLOP/s')}, {peak['dtype']}, {peak['size']}^2, "
                        f"{peak['measured']})")
    peaks.add_column("dtype")
    peaks.add_column("size", justify="right")
    peaks.add_column("before the model", justify="right")
    peaks.add_column("after the model", justify="right")
    for precision, table_before in peak["before"].items():
        after = {r["size"]: r for r in peak["after"][precision]["sizes"]}
        for rec in table_before["sizes"]:
            cells = []
            for r in (rec, after.get(rec["size"])):
                if r is None or "flops_per_second" not in r:
                    cells.append((r or {}).get("skipped", "-"))
                else:
                    cells.append(f"{_si(r['flops_per_second'], 'FLOP/s')} (best of {r['runs']})")
            peaks.add_row(rec["dtype"], str(rec["size"]), *cells)
    console.print(peaks)
    console.print(f"[dim]memory: {result['peak_memory_kind']}[/dim]", highlight=False)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
