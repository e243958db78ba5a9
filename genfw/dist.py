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


def destroy() -> None:
    """Leave the process group (at the end of a ``torchrun`` command)."""
    if is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        td.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (no-op single-process)."""
    if is_initialized():
        td.all_reduce(t)
        t /= world_size()
    return t


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank must call it)."""
    if not is_initialized():
        return flag
    t = torch.tensor([float(flag)], device="cuda" if td.get_backend() == "nccl" else "cpu")
    td.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            td.broadcast(t.data, src=0)


BUCKET_ELEMENTS = 1 << 25  # gradients are averaged in flat buckets of at most this many elements


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over ranks, as one process would see the global batch.

    A parameter can have a gradient on some ranks and none on others (a data-dependent branch
    was taken only there): it gets the average with zeros standing in for the missing ones, and
    keeps ``grad = None`` only when no rank has a gradient, so every rank's optimizer takes the
    same step. Gradients travel in flat buckets, with one flag per parameter in the first.
    """
    if not is_initialized():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    world = world_size()
    device, dtype = params[0].device, params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device, dtype=dtype)
    buckets: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size + p.numel() > BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    index = {id(p): i for i, p in enumerate(params)}
    for b, bucket in enumerate(buckets):
        parts = [p.grad.reshape(-1).to(dtype) if p.grad is not None
                 else torch.zeros(p.numel(), device=device, dtype=dtype) for p in bucket]
        flat = torch.cat(([flags] if b == 0 else []) + parts)
        td.all_reduce(flat)
        if b == 0:
            flags, flat = flat[: len(params)], flat[len(params) :]
        flat /= world
        offset = 0
        for p in bucket:
            g = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if flags[index[id(p)]] == 0:
                continue  # no rank has a gradient for it
            if p.grad is None:
                p.grad = g.to(p.dtype).clone()
            else:
                p.grad.copy_(g)
