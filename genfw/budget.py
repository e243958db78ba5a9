"""What a recipe's models will need, known from a build on the ``meta`` device before any allocation.

A recipe asking for ``dim: 1000000`` or ``depth: 20000`` must fail in one line at the start of
``genfw run``, not after minutes of building or in an out-of-memory kill. The tokenizer and
priors the recipe trains are built on ``meta`` under a module budget (``GENFW_MAX_MODULES``), and
their weights plus what training adds for each (a gradient and Adam's two moments; EMA adds one
more copy) must fit the device's memory (``GENFW_MAX_TRAIN_GIB`` overrides it). That figure is a
lower bound on training memory: activations come on top and are not estimated here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from genfw import checkpoint, io, limits
from genfw.context import model_file
from genfw.devices import device_memory_bytes, free_memory_bytes  # noqa: F401 - re-exported
from genfw.errors import ConfigError, GenfwError
from genfw.stages.training import check_warm_start


def _meta_build(what: str, build) -> torch.nn.Module:
    bound = limits.limit("modules")
    try:
        with limits.construction_budget(what, max_modules=bound,
                                        reason=f" (genfw's limit; raise it with {limits.env_var('modules')}=N)"), \
                torch.device("meta"):
            return build()
    except limits.BudgetExceeded as e:
        raise ConfigError(str(e)) from None


def recipe_models(run: Any) -> list[tuple[str, torch.nn.Module, Any]]:
    """(description, meta module, train spec) of each model the recipe trains from scratch."""
    recipe, resolved = run.recipe, run.resolved
    data = run.registry.build("dataset", recipe.data.name, resolved.data_params)
    channels, resolution = data.channels, tuple(data.resolution)
    try:
        num_classes = data.num_classes
    except GenfwError:
        num_classes = 0
    tok = _meta_build(f"tokenizer '{recipe.tokenizer.name}'", lambda: run.registry.build(
        "tokenizer", recipe.tokenizer.name, resolved.tokenizer_params, channels=channels, resolution=list(resolution)))
    out = []
    if not recipe.tokenizer.checkpoint and recipe.train.tokenizer.steps > 0:
        out.append((f"tokenizer '{recipe.tokenizer.name}'", tok, recipe.train.tokenizer))
    for i, spec in enumerate(resolved.prior_specs):
        if spec.checkpoint or recipe.train.prior.steps == 0:
            continue
        construct = run.prior_construct(tok, i, spec, resolution, num_classes)
        prior = _meta_build(f"prior {i} '{spec.name}'", lambda spec=spec, construct=construct, i=i: run.registry.build(
            "prior", spec.name, resolved.prior_params[i], **construct))
        out.append((f"prior {i} '{spec.name}'", prior, recipe.train.prior))
    return out


_checked: dict[str, int] = {}  # recipes already found to fit, in this process (ablations, tests)


def check_training_memory(run: Any) -> int:
    """Refuse a recipe whose models cannot be trained in this device's memory; returns the bytes needed."""
    key = json.dumps([run.resolved.raw, str(run.device), {k: v for k, v in os.environ.items()
                                                          if k.startswith("GENFW_MAX_")}], sort_keys=True, default=str)
    if key in _checked:
        return _checked[key]
    need, parameters, parts = 0, 0, []
    for what, module, spec in recipe_models(run):
        size = limits.tensor_bytes([*module.parameters(), *module.buffers()])
        params = sum(p.numel() for p in module.parameters())
        weights = limits.tensor_bytes(module.parameters())
        # weights and buffers, a gradient and Adam's two moments per parameter, an EMA copy
        total = size + 3 * weights + (size if spec.ema_decay else 0)
        need, parameters = need + total, parameters + params
        if params:
            parts.append(f"{what}: {params:,} parameters")
    bound_gib = limits.limit("train_gib")
    bound = bound_gib * 2**30 if bound_gib else device_memory_bytes(run.device)
    if bound is not None and need > bound:
        source = f"GENFW_MAX_TRAIN_GIB={bound_gib}" if bound_gib else f"the {bound / 2**30:.1f} GiB of {run.device}"
        raise ConfigError(
            f"training this recipe needs at least {need / 2**30:,.1f} GiB for weights, gradients and Adam state alone "
            f"({'; '.join(parts)}), more than {source}: make the model smaller, or raise the limit with "
            f"{limits.env_var('train_gib')}=N (GiB)")
    _checked[key] = need
    return need


def check_model_sources(run: Any, missing_ok: bool = False) -> None:
    """Refuse unreadable ``checkpoint`` files and an ``init_from`` of the wrong kind or shape, from
    the files' headers, before any stage runs.

    For ``init_from`` the recipe's models are built on the ``meta`` device and compared, tensor
    name by tensor name, with the header of the file to start from. ``missing_ok`` (``genfw
    validate``) skips a file that is not on this machine; a run refuses it.
    """
    recipe, resolved = run.recipe, run.resolved
    files = [("tokenizer.checkpoint", recipe.tokenizer.checkpoint)]
    files += [(f"prior level {i} checkpoint", spec.checkpoint) for i, spec in enumerate(resolved.prior_specs)]
    for key, path in files:
        if not path:
            continue
        if io.is_local(path) and not os.path.exists(io.local_path(path)):
            if missing_ok:
                continue
            raise ConfigError(f"{key}: {path} does not exist")
        checkpoint.read_meta(path)  # the header: a corrupt, truncated or unreachable file is one line now
    sources = [("tokenizer", recipe.tokenizer.init_from, "tokenizer.init_from")]
    sources += [(f"prior{i}", spec.init_from, f"prior level {i} init_from") for i, spec in enumerate(resolved.prior_specs)]
    sources = [(stage, src, key) for stage, src, key in sources if src]
    if not sources:
        return
    present = []
    for stage, src, key in sources:
        path = model_file(src, stage)
        if io.is_local(path) and not os.path.exists(io.local_path(path)):
            if missing_ok:
                continue
            raise ConfigError(f"{key}: {path} does not exist")
        present.append((stage, src, key))
    if not present:
        return
    data = run.registry.build("dataset", recipe.data.name, resolved.data_params)
    channels, resolution = data.channels, tuple(data.resolution)
    try:
        num_classes = data.num_classes if recipe.class_conditional else 0
    except GenfwError:
        num_classes = 0
    tok = _meta_build(f"tokenizer '{recipe.tokenizer.name}'", lambda: run.registry.build(
        "tokenizer", recipe.tokenizer.name, resolved.tokenizer_params, channels=channels, resolution=list(resolution)))
    for stage, src, key in present:
        if stage == "tokenizer":
            check_warm_start(tok, src, stage, key)
        elif not recipe.tokenizer.checkpoint:  # with a tokenizer file, the prior's grid comes from that file
            i = int(stage[len("prior"):])
            spec = resolved.prior_specs[i]
            construct = run.prior_construct(tok, i, spec, resolution, num_classes)
            prior = _meta_build(f"prior {i} '{spec.name}'", lambda spec=spec, i=i, construct=construct: (
                run.registry.build("prior", spec.name, resolved.prior_params[i], **construct)))
            check_warm_start(prior, src, stage, key)
