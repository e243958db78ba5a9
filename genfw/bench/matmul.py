"""This machine's practical matmul peak: the best warm ``torch.mm(a, b, out=c)`` over several sizes.

``genfw bench`` measures it before and after the model, in every dtype on CUDA, and reports the
model's achieved FLOP/s as a fraction of the larger (:func:`matmul_peak`, :func:`peak_precisions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from genfw.bench.timing import DTYPES, PRECISIONS, _timed_runs, spread, synchronize
from genfw.errors import ConfigError, GenfwError

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

