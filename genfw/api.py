"""The Python API: load a model and sample, inpaint, encode and decode; run or ablate a recipe.

The CLI commands ``genfw sample``, ``genfw inpaint``, ``genfw run`` and ``genfw ablate`` call
these same functions, so a notebook and the command line give the same images for the same
seed and model (docs/python-api.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from genfw import checkpoint
from genfw.ablate import ablate as ablate  # genfw.api.ablate: the function genfw.ablate(...) calls
from genfw.errors import CheckpointError, ConfigError
from genfw.sampling import SampleResult

# The CLI's defaults, shared so that both entry points sample alike.
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 16
DEFAULT_PRECISION = "bf16"


@dataclass(eq=False)
class Model(checkpoint.Bundle):
    """A tokenizer and its priors (one per level) with the sampler defaults they were trained with.

    ``genfw.load`` returns one for an exported bundle or a run directory.
    """

    device: torch.device = torch.device("cpu")

    # -- what the model is --------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Classes the priors are conditioned on (0 = unconditional)."""
        return self.priors[0].num_classes if self.priors else 0

    @property
    def class_names(self) -> list[str]:
        return list(self.extra.get("class_names") or [])

    @property
    def sampler_defaults(self) -> dict[str, Any]:
        """The recipe's ``sample.params`` stored with the model (the prior's defaults fill the rest)."""
        return dict(self.extra.get("sampler") or {})

    def to(self, device: str | torch.device) -> Model:
        from genfw.sampling import resolve_device

        self.device = resolve_device(str(device))
        for m in self.modules.values():
            m.to(self.device)
        return self

    # -- sampler settings ---------------------------------------------------------------------

    def sampler(self, overrides: list[str] | None = None, flags: dict[str, Any] | None = None,
                **params: Any) -> list[Any]:
        """Each prior's validated SamplerParams: stored defaults, then ``overrides``, ``params``, ``flags``.

        ``overrides`` use the recipe grammar (``steps=50``, ``~temperature_end``), addressed
        relative to ``sample.params`` (a leading ``sample.params.`` is accepted too); ``params``
        set keys the same way. ``flags`` are the CLI's ``--steps``/``--temperature``... as
        :func:`genfw.sampling.flag_overrides` makes them (a start value alone is a constant).
        """
        from genfw.config import apply_overrides
        from genfw.sampling import apply_flag_overrides

        values = apply_overrides(self.sampler_defaults, [_relative(o) for o in overrides or []])
        values.update(params)
        return apply_flag_overrides(self.priors, values, dict(flags or {}))

    def labels(self, n: int, labels: int | list[int] | None) -> torch.Tensor | None:
        """``n`` labels: the given ones cycled, or round-robin over the classes (as ``genfw sample``)."""
        from genfw.sampling import sample_labels

        if isinstance(labels, int):
            labels = [labels]
        return sample_labels(n, self.num_classes, list(labels) if labels is not None else None)

    # -- generating ---------------------------------------------------------------------------

    def generate(self, n: int = 16, *, labels: int | list[int] | None = None, seed: int | None = DEFAULT_SEED,
                 batch_size: int = DEFAULT_BATCH_SIZE, precision: str = DEFAULT_PRECISION,
                 size: tuple[int, int] | None = None, overrides: list[str] | None = None,
                 flags: dict[str, Any] | None = None, progress: str | None = "sampling",
                 on_chunk: Any = None, **sampler: Any) -> SampleResult:
        """Sample ``n`` images; the full result (images, codes, labels, seconds).

        ``seed=None`` draws a random seed; ``result.stats["seed"]`` records the one used.
        """
        from genfw.sampling import check_count, choose_seed, generate

        n, seed = check_count(n), choose_seed(seed)
        return generate(self.tokenizer, self.priors, n, labels=self.labels(n, labels), seed=seed,
                        batch_size=batch_size, sampler=self.sampler(overrides, flags, **sampler), device=self.device,
                        precision=precision, grid=size, progress=progress, on_chunk=on_chunk)

    def sample(self, n: int = 16, *, labels: int | list[int] | None = None, seed: int | None = DEFAULT_SEED,
               output: str = "pil", **kwargs: Any) -> list[Image.Image] | torch.Tensor:
        """``n`` images as PIL images (``output="pil"``) or one tensor [n, C, H, W] in [-1, 1].

        Keyword arguments: ``batch_size``, ``precision``, ``size`` and any sampler parameter of
        the prior (``steps=50``, ``temperature=0.7``...). Defaults are ``genfw sample``'s; ``seed``
        is an integer 0..2**63-1, or None for a random one.
        """
        result = self.generate(n, labels=labels, seed=seed, **kwargs)
        return _output(result.images, output)

    def inpaint(self, image: Image.Image | torch.Tensor | str, mask: Image.Image | torch.Tensor | str, n: int = 4, *,
                label: int | None = None, seed: int | None = DEFAULT_SEED, output: str = "pil",
                overrides: list[str] | None = None, flags: dict[str, Any] | None = None,
                **sampler: Any) -> list[Image.Image] | torch.Tensor:
        """Regenerate the masked region (mask: white/True = regenerate) of ``image``, ``n`` times.

        A class-conditional model needs ``label``: inpainting conditions every completion on it.
        """
        from genfw.inpaint import inpaint, prepare_inputs, require_label
        from genfw.sampling import check_count, choose_seed

        n, seed = check_count(n, "the number of completions"), choose_seed(seed)
        require_label(self.num_classes, label, self.class_names)
        img, pixel_mask = prepare_inputs(self.tokenizer, image, mask)
        labels = self.labels(n, label) if self.num_classes else None
        result = inpaint(self.tokenizer, self.priors, img, pixel_mask, n=n, labels=labels, seed=seed,
                         device=self.device, sampler=self.sampler(overrides, flags, **sampler))
        return _output(result.images, output)

    # -- the tokenizer ------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: torch.Tensor | Image.Image | list[Image.Image]) -> list[torch.Tensor]:
        """Images ([B, C, H, W] in [-1, 1], or PIL images) -> code grids, one per level."""
        x = _as_batch(images, self.tokenizer).to(self.device)
        return [c.cpu() for c in self.tokenizer.eval().encode(x)]

    @torch.inference_mode()
    def decode(self, codes: list[torch.Tensor], output: str = "tensor") -> torch.Tensor | list[Image.Image]:
        """Code grids (one per level) -> images [B, C, H, W] in [-1, 1] (or PIL with ``output="pil"``)."""
        images = self.tokenizer.eval().decode([c.to(self.device) for c in codes]).float().clamp(-1, 1).cpu()
        return _output(images, output)


def _relative(override: str) -> str:
    for prefix in ("sample.params.", "~sample.params."):
        if override.startswith(prefix):
            return ("~" if prefix.startswith("~") else "") + override[len(prefix):]
    return override


def _output(images: torch.Tensor, output: str) -> list[Image.Image] | torch.Tensor:
    if output == "tensor":
        return images
    if output == "pil":
        from genfw.images import to_pil

        return [to_pil(im) for im in images]
    raise ConfigError(f"output must be 'pil' or 'tensor', got '{output}'")


def _as_batch(images, tokenizer) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images if images.dim() == 4 else images[None]
    from genfw.data import to_tensor

    items = images if isinstance(images, list) else [images]
    channels = tokenizer.construct.get("channels", 3)
    resolution = tokenizer.construct.get("resolution")
    out = []
    for im in items:
        res = resolution or [im.height, im.width]
        res = [res, res] if isinstance(res, int) else res
        out.append(to_tensor(im, tuple(res), channels))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A model file, bundle or run directory (local path or fsspec URL) -> a ready module.

    A bundle (``genfw export``) or a run directory gives a :class:`Model` (``.sample``,
    ``.inpaint``, ``.encode``, ``.decode``); a single-component file gives that component
    (a tokenizer or a prior module).
    """
    from genfw.sampling import resolve_device

    dev = resolve_device(str(device))
    source = os.fspath(path)
    if os.path.isdir(source):
        from genfw.pipeline import load_run_models

        tokenizer, priors, extra = load_run_models(source, dev)
        modules = {"tokenizer": tokenizer, **{f"prior.{i}": p for i, p in enumerate(priors)}}
        return Model(modules, extra, dev)
    loaded = checkpoint.load(source, device=dev)
    if isinstance(loaded, checkpoint.Bundle):
        if "tokenizer" not in loaded.modules:
            raise CheckpointError(f"{source} is a bundle without a tokenizer")
        return Model(loaded.modules, loaded.extra, dev)
    return loaded


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Model:
    """Like :func:`load`, but only a bundle or run directory is accepted (what sampling needs)."""
    loaded = load(path, device)
    if not isinstance(loaded, Model):
        raise CheckpointError(f"{os.fspath(path)} holds a single {getattr(loaded, 'kind', 'model')}, not a pipeline "
                              "bundle: export one with `genfw export RUN_DIR -o model.safetensors`")
    return loaded


def run(recipe: str | os.PathLike | dict, overrides: list[str] | None = None, output_dir: str | None = None,
        stages: list[str] | None = None, device: str | None = None, overwrite: bool = False,
        check: bool = True) -> dict[str, Any]:
    """Run a recipe (a file, a shipped recipe name like ``"quickstart"``, or a dict) like ``genfw run``.

    Returns the metrics (empty when the evaluate stage is not among ``stages``). Pre-flight
    checks (data, weights, device) run first unless ``check=False``.
    """
    from genfw.config import apply_overrides, load_recipe, validate_recipe
    from genfw.pipeline import Run

    if isinstance(recipe, dict):
        resolved = validate_recipe(apply_overrides(recipe, overrides))
    else:
        from genfw.catalog import resolve

        resolved = load_recipe(resolve(os.fspath(recipe)), overrides)
    pipeline = Run(resolved, output_dir=output_dir, device=device, overwrite=overwrite)
    if check:
        from genfw.preflight import preflight

        preflight(resolved, pipeline.device, stages).raise_if_failed()
    return pipeline.run(stages)
