"""What every stage of a run reads: the recipe, the run directory, the device, the data, and
how components are built from them. ``genfw.pipeline.Run`` adds the stages on top.

The stages, ``genfw.evaluate`` and ``genfw.report`` depend on this module only, never on
``genfw.pipeline``, so that the pipeline can import them without a circle.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from genfw import checkpoint
from genfw.config import PriorSpec, ResolvedRecipe
from genfw.data import split_halves, split_indices
from genfw.errors import ConfigError, DataError
from genfw.interfaces import Prior, Tokenizer
from genfw.registry import get_registry
from genfw.rundir import check_output_dir
from genfw.sampling import resolve_device


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_file(source: str, stage: str) -> str:
    """A genfw model file, or a run directory's ``<stage>/model.safetensors``."""
    if os.path.isdir(source):
        return os.path.join(source, stage, "model.safetensors")
    return source


class RunContext:
    """One recipe's run directory, device, dataset and component builders."""

    def __init__(self, resolved: ResolvedRecipe, output_dir: str | None = None, device: str | None = None) -> None:
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.dir = check_output_dir(os.fspath(output_dir or self.recipe.output_dir
                                              or os.path.join("runs", self.recipe.name)))
        self.device = resolve_device(device or self.recipe.device)
        self.registry = get_registry()
        self._dataset = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self.registry.build("dataset", self.recipe.data.name, self.resolved.data_params)
            if len(self._dataset) == 0:
                raise DataError(f"dataset '{self.recipe.data.name}' is empty")
        return self._dataset

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.dataset.resolution)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes if self.recipe.class_conditional else 0

    def train_seed(self, stage: str) -> int:
        """``train.<stage>.seed``, or the recipe's seed when that is not set."""
        seed = getattr(self.recipe.train, stage).seed
        return self.recipe.seed if seed is None else seed

    def split(self) -> tuple[list[int], list[int]]:
        """(train, held-out) image indices: fixed by the seed and ``latents.holdout``."""
        return split_indices(len(self.dataset), self.recipe.latents.holdout, self.recipe.seed)

    _split = split  # the older private name

    def heldout_halves(self) -> dict[str, list[int]]:
        """The held-out indices in two disjoint halves, ``validation`` and ``test``, fixed by the
        seed: neither trains the tokenizer, the prior or the evaluation classifier."""
        validation, test = split_halves(self.split()[1], self.recipe.seed)
        return {"validation": validation, "test": test}

    def sample_seed(self) -> int:
        return self.recipe.sample.seed if self.recipe.sample.seed is not None else self.recipe.seed

    def read_paths(self) -> list[tuple[str, str]]:
        """(recipe key, path) of every file the recipe reads: never moved aside or deleted."""
        spec = self.recipe
        out = [("tokenizer.checkpoint", spec.tokenizer.checkpoint),
               ("tokenizer.init_from", spec.tokenizer.init_from and model_file(spec.tokenizer.init_from, "tokenizer")),
               ("evaluate.inception_weights", spec.evaluate.inception_weights)]
        for i, p in enumerate(self.resolved.prior_specs):
            out += [(f"prior level {i} checkpoint", p.checkpoint),
                    (f"prior level {i} init_from", p.init_from and model_file(p.init_from, f"prior{i}"))]
        data_path = spec.data.params.get("path") if isinstance(spec.data.params, dict) else None
        if isinstance(data_path, str):
            out.append(("data.params.path", data_path))
        return [(k, v) for k, v in out if v]

    # -- building components ------------------------------------------------------------------

    def build_tokenizer(self) -> Tokenizer:
        spec = self.recipe.tokenizer
        if spec.checkpoint:
            tok = checkpoint.load(spec.checkpoint)
            if not isinstance(tok, Tokenizer):
                raise ConfigError(f"tokenizer.checkpoint {spec.checkpoint} holds a {getattr(tok, 'kind', '?')}, not a tokenizer")
            return tok
        return self.registry.build("tokenizer", spec.name, self.resolved.tokenizer_params,
                                   channels=self.dataset.channels, resolution=list(self.resolution))

    def prior_construct(self, tokenizer: Tokenizer, level: int, spec: PriorSpec,
                        resolution: tuple[int, int] | None = None, num_classes: int | None = None) -> dict[str, Any]:
        levels = tokenizer.levels
        grids = tokenizer.grid_shapes(*(resolution or self.resolution))
        if num_classes is None:
            num_classes = self.num_classes
        elif not self.recipe.class_conditional:
            num_classes = 0
        return {
            "codebook_size": levels[level].codebook_size,
            "grid": list(grids[level]),
            "num_classes": num_classes,
            "context": [[levels[j].codebook_size, *grids[j]] for j in range(level)],
            "backbone": spec.backbone.model_dump(),
        }

    def build_prior(self, tokenizer: Tokenizer, level: int) -> Prior:
        spec = self.resolved.prior_specs[level]
        construct = self.prior_construct(tokenizer, level, spec)
        if spec.checkpoint:
            prior = checkpoint.load(spec.checkpoint)
            got = getattr(prior, "construct", {})
            for key in ("codebook_size", "grid"):
                if got.get(key) != construct[key]:
                    raise ConfigError(
                        f"prior checkpoint {spec.checkpoint} has {key} {got.get(key)} but tokenizer level {level} "
                        f"needs {construct[key]}: use a prior trained on this tokenizer"
                    )
            return prior
        return self.registry.build("prior", spec.name, self.resolved.prior_params[level], **construct)

    def check_compatible(self, tokenizer: Tokenizer, resolution: tuple[int, int] | None = None) -> None:
        h, w = resolution or self.resolution
        for i, lv in enumerate(tokenizer.levels):
            if h % lv.factor or w % lv.factor:
                raise ConfigError(
                    f"resolution {h}x{w} is not divisible by tokenizer level {i}'s downsampling factor "
                    f"{lv.factor}: change data.params.resolution"
                )
