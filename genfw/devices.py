"""What a device offers: its memory (total and free now) and the autocast context for a precision.

Used by the memory checks before training and sampling and by the training and sampling loops;
nothing here knows a model or a recipe.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; CPU trains in fp32."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device``: GPU memory for CUDA, the machine's RAM otherwise (None if unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on ``device`` now: free GPU memory for CUDA, else the RAM the
    kernel reports available (MemAvailable), else the machine's total. None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (ValueError, OSError, RuntimeError, IndexError):
        pass
    return device_memory_bytes(device)
