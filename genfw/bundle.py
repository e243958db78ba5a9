"""Assemble a bundle from separate model files (converted or trained elsewhere).

A bundle is what ``genfw export`` writes from a run directory: one file with the tokenizer, one
prior per code level (coarsest first) and sampler defaults. ``genfw assemble`` builds the same
from a tokenizer file and prior files, after checking that they fit together: one prior per
level, each with its level's codebook size and context, and a grid the tokenizer produces.
Sampler defaults recorded in the prior files (converters store the authors' sampling settings)
go into the bundle, under any given on the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from genfw import checkpoint, limits
from genfw.config import parse_value
from genfw.errors import CheckpointError, ConfigError
from genfw.interfaces import Prior, Tokenizer


def _load(path: str, kind: type, what: str):
    module = checkpoint.load(path)
    if isinstance(module, checkpoint.Bundle):
        raise CheckpointError(f"{path} is already a bundle; give the {what} model file")
    if not isinstance(module, kind):
        raise CheckpointError(f"{path} holds a {getattr(module, 'kind', '?')}, not a {what}")
    return module


def check_fit(tokenizer: Tokenizer, priors: Sequence[Prior], names: Sequence[str]) -> None:
    """Raise a one-line error unless ``priors`` (coarsest first) fit ``tokenizer``'s levels."""
    levels = tokenizer.levels
    if len(priors) != len(levels):
        raise ConfigError(f"the tokenizer has {len(levels)} code level(s) but {len(priors)} prior(s) were given "
                          "(one per level, coarsest first)")
    h, w = tokenizer.construct.get("resolution") or (None, None)
    grids = tokenizer.grid_shapes(h, w) if h else [None] * len(levels)
    for i, (prior, name) in enumerate(zip(priors, names, strict=True)):
        if prior.codebook_size != levels[i].codebook_size:
            raise ConfigError(f"{name} has codebook_size {prior.codebook_size} but tokenizer level {i} has "
                              f"{levels[i].codebook_size}: it was not trained on this tokenizer's codes")
        want = [[levels[j].codebook_size, *grids[j]] for j in range(i)] if grids[0] else None
        if want is not None and prior.construct.get("context", []) != want:
            raise ConfigError(f"{name} is conditioned on {prior.construct.get('context')} but level {i} of this "
                              f"tokenizer needs {want}")
        if grids[i] is not None and tuple(prior.grid) != tuple(grids[i]):
            # Priors that sample larger grids by windows are fine; the grid must still divide sensibly.
            if prior.grid[0] > grids[i][0] or prior.grid[1] > grids[i][1]:
                raise ConfigError(f"{name} works on a {prior.grid[0]}x{prior.grid[1]} grid, larger than the "
                                  f"{grids[i][0]}x{grids[i][1]} grid of tokenizer level {i}")


def parse_sampler(items: Sequence[str], priors: Sequence[Prior], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``key=value`` items over ``defaults`` -> sampler defaults, each key known to a prior's sampler."""
    known = set().union(*(p.SamplerParams.model_fields for p in priors)) if priors else set()
    out: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if k in known}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--sampler expects key=value, got '{item}'")
        if key not in known:
            raise ConfigError(f"--sampler {key}: not a sampler parameter of these priors "
                              f"(they have: {', '.join(sorted(known)) or 'none'})")
        out[key] = parse_value(value)
    for p in priors:  # validated per prior, ignoring keys it does not have; bounded as sampling bounds them
        validated = p.sampler_params({k: v for k, v in out.items() if k in p.SamplerParams.model_fields})
        limits.check_sampler_steps(validated.model_dump(), "--sampler ")
    return out


def assemble(output: str | os.PathLike, tokenizer_path: str, prior_paths: Sequence[str],
             sampler: Sequence[str] = ()) -> None:
    """Write a bundle of ``tokenizer_path`` and ``prior_paths`` (coarsest level first) to ``output``."""
    tokenizer = _load(tokenizer_path, Tokenizer, "tokenizer")
    priors = [_load(p, Prior, "prior") for p in prior_paths]
    check_fit(tokenizer, priors, list(prior_paths))
    # Sampler settings a converter recorded (the authors' sampling config), then the command line's.
    recorded: dict[str, Any] = {}
    for path in prior_paths:
        recorded.update(checkpoint.read_meta(path)[1].get("extra", {}).get("sampler") or {})
    defaults = parse_sampler(sampler, priors, recorded)
    modules = {"tokenizer": tokenizer, **{f"prior.{i}": p for i, p in enumerate(priors)}}
    sources = [os.path.basename(tokenizer_path), *(os.path.basename(p) for p in prior_paths)]
    checkpoint.save(output, modules, extra={"sampler": defaults, "class_names": [], "assembled_from": sources})
