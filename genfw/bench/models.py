"""What ``genfw bench`` runs: a recipe's models with random weights, or a bundle / run directory.

:func:`load_models` returns :class:`BenchModels` (tokenizer, one prior per level, their sampler
params); :func:`compile_backbones` ``torch.compile``s the priors' backbones. Nothing is timed here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from genfw import checkpoint
from genfw.config import load_recipe
from genfw.errors import ConfigError, GenfwError
from genfw.interfaces import Prior, Tokenizer
from genfw.pipeline import load_run_models
from genfw.registry import get_registry


@dataclass
class BenchModels:
    """What is benchmarked: the tokenizer, one prior per level and their sampler params."""

    tokenizer: Tokenizer
    priors: list[Prior]
    samplers: list[BaseModel]
    weights: str  # "random" (built from a recipe) or "trained" (loaded)
    notes: list[str] = field(default_factory=list)


def _is_recipe(source: str) -> bool:
    return source.lower().endswith((".yaml", ".yml"))


def _from_recipe(source: str, overrides: list[str] | None, device: torch.device) -> BenchModels:
    """Tokenizer and priors of a recipe with random weights, built directly on ``device``."""
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
