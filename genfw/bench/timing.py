"""The clocks and counters of ``genfw bench``: precision, timed regions, spreads, FLOPs, memory.

:class:`Stopwatch` times regions (wall clock on CPU, CUDA events on CUDA); :func:`spread` keeps a
timing's median, min, max and every value; :func:`timed_backbone` times a prior's backbone calls
while it samples; :func:`forward_flops` counts a forward's FLOPs on inputs from
:func:`forward_inputs`; the memory and machine helpers describe where it ran. The matmul peak
is :mod:`genfw.bench.matmul`, the order of the measurements :mod:`genfw.bench.run`.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from genfw.errors import ConfigError
from genfw.interfaces import Prior

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
