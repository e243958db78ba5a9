"""Process-group helpers: genfw runs single-process or under ``torchrun``, never its own launcher.

Training wraps a module in PyTorch's own engines (``DistributedDataParallel``, or FSDP2's
``fully_shard`` when a recipe asks for ``distributed: fsdp``); sampling and evaluation split
their work over the ranks with :func:`shard` and collect it with :func:`gather`. Every helper
is a no-op in a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from genfw.errors import ConfigError


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
    """Leave the process group (at the end of a ``torchrun`` command), once every rank is there:
    a rank that left while another still used the group aborted it (gloo)."""
    if is_initialized():
        td.barrier()
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


# -- splitting work and collecting it -------------------------------------------------------------


def shard(count: int) -> list[int]:
    """The indices ``0..count-1`` this rank handles (round robin, so early items spread evenly)."""
    return list(range(rank(), count, world_size()))


def gather(items: list[Any], dst: int | None = 0) -> list[Any] | None:
    """Every rank's ``items`` (picklable, e.g. CPU tensors), concatenated in rank order.

    ``dst=None`` returns the result on every rank; otherwise on ``dst`` only (None elsewhere).
    Single-process: ``items`` itself.
    """
    if not is_initialized():
        return list(items)
    if dst is None:
        parts: list[Any] = [None] * world_size()
        td.all_gather_object(parts, list(items))
    else:
        parts = [None] * world_size() if rank() == dst else None
        td.gather_object(list(items), parts, dst=dst)
        if rank() != dst:
            return None
    return [x for part in parts for x in part]


def broadcast(obj: Any, src: int = 0) -> Any:
    """``src``'s picklable ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    td.broadcast_object_list(box, src=src)
    return box[0]


# -- training engines -----------------------------------------------------------------------------

ENGINES = ("ddp", "fsdp")


class TrainingStep(nn.Module):
    """Calls ``module.training_step`` as ``forward``, so that DDP sees the step as its forward pass.

    DDP prepares its gradient buckets in ``forward``: a loss computed outside it would be
    back-propagated without any reduction.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, step: int) -> Any:
        return self.module.training_step(batch, step)


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped for ``DistributedDataParallel``; call the result as ``wrapped(batch, step)``.

    DDP broadcasts rank 0's weights and buffers on construction, then all-reduces gradients in
    buckets while the backward pass is still running. ``find_unused_parameters``: a parameter a
    step did not use (a discriminator before it switches on, a branch taken for some inputs
    only) is marked ready rather than waited for.
    """
    ids = None
    if device.type == "cuda":  # "cuda" alone: the device torchrun's LOCAL_RANK selected
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(TrainingStep(module), device_ids=ids, find_unused_parameters=True)


def fully_sharded(module: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``module`` in place with FSDP2 (``fully_shard``): each element of every
    ``nn.ModuleList`` (transformer blocks, resolution levels) is its own unit, then the root.

    Parameters, gradients and optimizer state are split over the ranks; a unit's full weights
    exist only while it computes. ``training_step`` is registered as a forward method, so the
    root's parameters are gathered for it as for ``forward``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    scalars = [name for name, p in module.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(f"distributed: fsdp cannot shard 0-dimensional parameters ({', '.join(scalars[:3])}): "
                          "use distributed: ddp (or give them the shape (1,))")
    mesh = init_device_mesh(device.type, (world_size(),))
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    if hasattr(module, "training_step"):
        register_fsdp_forward_method(module, "training_step")
    return module


def _full_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP module: on rank 0 only (CPU), or on every rank.

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options(cpu_offload=not everywhere))


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (every rank holds it) into an FSDP module (a collective)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_full_options())


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded state of an optimizer over FSDP parameters, in the layout of a plain
    ``optimizer.state_dict()`` (parameters numbered), so it loads in one process too.

    Rank 0 only (others get ``{}``); a collective.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))
    if not full:
        return {}
    names = [name for group in full["param_groups"] for name in group["params"]]
    number = {name: i for i, name in enumerate(names)}
    return {"state": {number[k]: v for k, v in full["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a plain (numbered) optimizer state into an optimizer over FSDP parameters."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    name_of = {id(p): n for n, p in module.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(f"the saved optimizer has {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters, this one {len(names)}")
    named = {"state": {names[int(k)]: v for k, v in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, named, options=_full_options())
