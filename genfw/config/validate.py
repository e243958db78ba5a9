"""A recipe validated against the registry: every component exists, every params block is valid,
sizes and conditioning agree, required plugins are installed; ``load_recipe`` does it all from a file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from genfw import limits
from genfw.config.overrides import apply_overrides, check_expansion, load_yaml
from genfw.config.recipe import PriorSpec, Recipe
from genfw.errors import ConfigError, GenfwError
from genfw.loggers import validate_log
from genfw.params import format_validation_error, validate_params
from genfw.registry import Registry, get_registry

# --------------------------------------------------------------------------------------------
# validation against the registry


@dataclass
class ResolvedRecipe:
    """A recipe whose components exist and whose params are validated models."""

    recipe: Recipe
    raw: dict[str, Any]
    data_params: BaseModel
    tokenizer_params: BaseModel
    prior_specs: list[PriorSpec]  # one per tokenizer level, coarsest first
    prior_params: list[BaseModel]
    backbone_params: list[BaseModel]
    sampler_params: list[BaseModel]


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _load_class(registry: Registry, kind: str, name: str, path: str):
    try:
        return registry.load(kind, name)
    except GenfwError as e:
        raise type(e)(f"{path}: {e}") from None


def validate_recipe(raw: dict[str, Any], registry: Registry | None = None,
                    num_levels: int | None = None) -> ResolvedRecipe:
    """Check the schema, every component name, every params block and the combination.

    ``num_levels`` is the tokenizer's level count; when None it is read off a tokenizer built
    on the meta device (no memory is allocated).
    """
    registry = registry or get_registry()
    check_expansion(raw, "recipe (with its --set overrides)")
    recipe = parse_recipe(raw)
    _check_required_plugins(recipe, registry)
    validate_log(recipe.log, registry)

    data_cls = _load_class(registry, "dataset", recipe.data.name, "data.name")
    data_params = validate_params(data_cls.Params, recipe.data.params, "data.params")
    tok_cls = _load_class(registry, "tokenizer", recipe.tokenizer.name, "tokenizer.name")
    tok_params = validate_params(tok_cls.Params, recipe.tokenizer.params, "tokenizer.params")

    if num_levels is None:
        num_levels = _count_levels(tok_cls, tok_params, data_cls, data_params)

    specs, prior_params, backbone_params, sampler_params = [], [], [], []
    for i in range(num_levels):
        spec = recipe.prior.for_level(i, num_levels)
        base = f"prior.levels.{i}" if recipe.prior.levels is not None else "prior"
        prior_cls = _load_class(registry, "prior", spec.name, f"{base}.name")
        bb_cls = _load_class(registry, "backbone", spec.backbone.name, f"{base}.backbone.name")
        prior_params.append(validate_params(prior_cls.Params, spec.params, f"{base}.params"))
        backbone_params.append(validate_params(bb_cls.Params, spec.backbone.params, f"{base}.backbone.params"))
        sampler_params.append(validate_params(prior_cls.SamplerParams, recipe.sample.params, "sample.params"))
        if prior_cls.needs_causal and not bb_cls.supports_causal:
            why = f" ({bb_cls.causal_unsupported_reason})" if bb_cls.causal_unsupported_reason else ""
            causal = [n for n in registry.names("backbone") if getattr(registry.load("backbone", n), "supports_causal", False)]
            raise ConfigError(
                f"{base}: prior '{spec.name}' needs a causal backbone but '{spec.backbone.name}' cannot be "
                f"causal{why}; use one of: {', '.join(causal) or 'none installed'}"
            )
        _check_conditioning(recipe, bb_cls, spec.backbone.name, base, i, data_cls, data_params)
        specs.append(spec)
    _check_sizes(recipe, sampler_params)
    return ResolvedRecipe(recipe, raw, data_params, tok_params, specs, prior_params, backbone_params, sampler_params)


def _check_sizes(recipe: Recipe, sampler_params: list[BaseModel]) -> None:
    """The limits sampling and training would enforce later (genfw.limits), checked before any work."""
    limits.check("samples", recipe.sample.n, "sample.n: the number of samples")
    limits.check("samples", recipe.evaluate.n_samples, "evaluate.n_samples: the number of samples")
    limits.check("batch", recipe.sample.batch_size, "sample.batch_size: the batch size")
    limits.check("batch", recipe.evaluate.batch_size, "evaluate.batch_size: the batch size")
    for stage in ("tokenizer", "prior"):
        limits.check("batch", getattr(recipe.train, stage).batch_size, f"train.{stage}.batch_size: the batch size")
    for sp in sampler_params:  # the same sample.params, with each level's defaults
        limits.check_sampler_steps(sp.model_dump(), "sample.params.")


def _check_conditioning(recipe: Recipe, bb_cls, name: str, base: str, level: int, data_cls, data_params) -> None:
    """A backbone that declares it cannot use labels or coarser grids is refused where they would be given."""
    if level > 0 and not getattr(bb_cls, "uses_context", True):
        raise ConfigError(f"{base}.backbone: '{name}' cannot be conditioned on coarser code grids, which level {level} "
                          "of a hierarchical tokenizer needs; use another backbone for this level")
    if recipe.class_conditional and not getattr(bb_cls, "uses_labels", True):
        try:
            num_classes = data_cls(data_params).num_classes
        except Exception:  # noqa: BLE001 - a dataset that cannot count its classes cheaply: checked at build
            return
        if num_classes:
            raise ConfigError(f"{base}.backbone: '{name}' cannot be conditioned on labels, and the data has "
                              f"{num_classes} classes: set class_conditional: false, or use another backbone")


def _count_levels(tok_cls, tok_params, data_cls, data_params) -> int:
    try:
        data = data_cls(data_params)
        channels, resolution = data.channels, list(data.resolution)
    except GenfwError:
        raise
    except Exception:  # noqa: BLE001 - a dataset that cannot describe itself cheaply
        channels, resolution = 3, [256, 256]
    import torch

    try:
        with torch.device("meta"):
            tok = tok_cls(tok_params, channels=channels, resolution=resolution)
        return len(tok.levels)
    except GenfwError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tokenizer '{tok_cls.__name__}' cannot be built with these params: "
                          f"{type(e).__name__}: {e}") from None


def _check_required_plugins(recipe: Recipe, registry: Registry) -> None:
    if not recipe.plugins:
        return
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    installed = registry.distributions()
    for dist, spec in recipe.plugins.items():
        if dist not in installed:
            broken = registry.broken_hint(dist)
            if broken:
                raise ConfigError(f"recipe needs plugin distribution '{dist}' {spec}, which is installed but failed to "
                                  f"load{broken}")
            raise ConfigError(f"recipe needs plugin distribution '{dist}' {spec}, which is not installed: pip install '{dist}{spec}'")
        try:
            ok = installed[dist] in SpecifierSet(spec)
        except InvalidSpecifier:
            raise ConfigError(f"plugins.{dist}: invalid version specifier '{spec}'") from None
        if not ok:
            raise ConfigError(f"recipe needs {dist}{spec} but {installed[dist]} is installed: pip install '{dist}{spec}'")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                registry: Registry | None = None, notes: list[str] | None = None) -> ResolvedRecipe:
    """Read, override and validate a recipe file (override notes are appended to ``notes``)."""
    raw = apply_overrides(load_yaml(path), overrides, notes)
    return validate_recipe(raw, registry)
