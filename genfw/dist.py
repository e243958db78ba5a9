"""Process-group helpers: genfw runs single-process or under ``torchrun`` (DDP), never its own launcher."""

from __future__ import annotations

import os

import torch
import torch.distributed as td


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); returns whether it did."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend)
    return True


def barrier() -> None:
    if is_initialized():
        td.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (no-op single-process)."""
    if is_initialized():
        td.all_reduce(t)
        t /= world_size()
    return t


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            td.broadcast(t.data, src=0)


def average_gradients(params) -> None:
    """All-reduce and average the gradients of ``params`` (one flat buffer per call)."""
    if not is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    td.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
