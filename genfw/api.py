"""The Python API: load a model and sample, inpaint, encode and decode; run or ablate a recipe.

The CLI's commands (genfw/cli/) call these same functions, so a notebook and the command line
give the same images for the same seed and model (docs/python-api.md); what a command does
beyond parsing and printing (``genfw eval``, ``export``, ``inspect``, writing samples...) is a
function here too. Printing tables and errors stays in the CLI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from genfw import checkpoint, dist, io
from genfw.ablate import ablate as ablate  # genfw.api.ablate: the function genfw.ablate(...) calls
from genfw.catalog import resolve
from genfw.config import apply_overrides, load_recipe, load_yaml, validate_recipe
from genfw.data import to_tensor
from genfw.errors import CheckpointError, ConfigError, GenfwError
from genfw.images import to_pil
from genfw.inpaint import inpaint, inpaint_file, prepare_inputs, require_label
from genfw.progress import console
from genfw.rundir import check_write_target, describe_holder, holder_if_running
from genfw.samples import image_name, write_grid, write_images
from genfw.sampling import (
    SampleResult,
    apply_flag_overrides,
    check_count,
    choose_seed,
    generate,
    resolve_device,
    sample_labels,
)

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

        values = apply_overrides(self.sampler_defaults, [_relative(o) for o in overrides or []])
        values.update(params)
        return apply_flag_overrides(self.priors, values, dict(flags or {}))

    def labels(self, n: int, labels: int | list[int] | None) -> torch.Tensor | None:
        """``n`` labels: the given ones cycled, or round-robin over the classes (as ``genfw sample``)."""

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

        return [to_pil(im) for im in images]
    raise ConfigError(f"output must be 'pil' or 'tensor', got '{output}'")


def _as_batch(images, tokenizer) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images if images.dim() == 4 else images[None]

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

    dev = resolve_device(str(device))
    source = os.fspath(path)
    if os.path.isdir(source):
        from genfw.pipeline import load_run_models  # late: start-up time (loads the metrics, torch-fidelity)

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
    from genfw.pipeline import Run  # late: start-up time (loads the metrics, torch-fidelity)

    if isinstance(recipe, dict):
        resolved = validate_recipe(apply_overrides(recipe, overrides))
    else:

        resolved = load_recipe(resolve(os.fspath(recipe)), overrides)
    pipeline = Run(resolved, output_dir=output_dir, device=device, overwrite=overwrite)
    if check:
        from genfw.preflight import preflight  # late: start-up time (loads the metrics, torch-fidelity)

        preflight(resolved, pipeline.device, stages).raise_if_failed()
    return pipeline.run(stages)


# -- what the CLI's commands do, for the Python API too ------------------------------------------


def check_recipe(resolved) -> Any:
    """``genfw validate``'s checks of a validated recipe; this machine's pre-flight report.

    Model files the recipe names (``init_from``, ``checkpoint``) are checked first when they
    exist (kind and shapes, from their headers); a missing one is left to the report, whose
    checks (device, data, weights) fail nothing until ``report.raise_if_failed()``.
    """
    from genfw.preflight import (  # late: start-up time (loads the metrics, torch-fidelity)
        check_device,
        preflight,
    )

    specs = [resolved.recipe.tokenizer, *resolved.prior_specs]
    if any(spec.init_from or spec.checkpoint for spec in specs):
        from genfw.budget import (
            check_model_sources,  # late: start-up time (loads the metrics, torch-fidelity)
        )
        from genfw.context import RunContext  # late: start-up time (loads the metrics, torch-fidelity)

        usable = check_device(resolved.recipe.device) is None
        check_model_sources(RunContext(resolved, device=None if usable else "cpu"), missing_ok=True)
    return preflight(resolved)


def plan(resolved) -> dict[str, Any]:
    """A validated recipe's plan (``genfw validate --summary``): parameter counts, FLOPs, stages.

    Planned on the recipe's device, or on the CPU where that device is missing here.
    """
    from genfw.pipeline import Run  # late: start-up time (loads the metrics, torch-fidelity)
    from genfw.preflight import check_device  # late: start-up time (loads the metrics, torch-fidelity)

    usable = check_device(resolved.recipe.device) is None
    return Run(resolved, device=None if usable else "cpu").plan()


def prepare_run(resolved, stages: list[str] | None = None, output_dir: str | None = None, device: str | None = None,
                overwrite: bool = False, force: bool = False):
    """The checks ``genfw run`` makes before its first stage, and the :class:`~genfw.pipeline.Run` they allow.

    Checked: the stage names, the device (``None``: the recipe's), and this machine's pre-flight
    report for ``stages``. Nothing is written; ``run.run(stages)`` starts the stages.
    """
    from genfw.pipeline import STAGES, Run  # late: start-up time (loads the metrics, torch-fidelity)
    from genfw.preflight import (  # late: start-up time (loads the metrics, torch-fidelity)
        check_device,
        preflight,
    )

    unknown = [s for s in stages or [] if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
    bad_device = check_device(device or resolved.recipe.device)
    if bad_device:
        raise GenfwError(f"device: {bad_device}")
    pipeline = Run(resolved, output_dir=output_dir, device=device, overwrite=overwrite, force=force)
    preflight(resolved, pipeline.device, stages).raise_if_failed()
    return pipeline


def dry_run(pipeline) -> dict[str, Any]:
    """``genfw run --dry-run``: a prepared run's training memory and model files checked; its plan."""
    from genfw.budget import (  # late: start-up time (loads the metrics, torch-fidelity)
        check_model_sources,
        check_training_memory,
    )

    check_training_memory(pipeline)
    check_model_sources(pipeline)
    return pipeline.plan()


def evaluate(run_dir: str, overrides: list[str] | None = None, device: str | None = None, force: bool = False,
             on_start: Any = None) -> tuple[dict[str, Any], str]:
    """(Re)compute a run's metrics like ``genfw eval``; the metrics and the ``metrics.json`` written.

    ``overrides`` apply to this evaluation only (the run's recipe.yaml is never rewritten; each
    evaluation is appended to metrics_history.jsonl). While the run still trains, its latest
    snapshots are evaluated in ``RUN/evaluations/`` (a note on stderr says which); otherwise
    ``on_start(run)`` is called after the checks, before the stages start; ``force`` recomputes.
    """
    from genfw.pipeline import Run  # late: start-up time (loads the metrics, torch-fidelity)
    from genfw.preflight import (  # late: start-up time (loads the metrics, torch-fidelity)
        check_device,
        preflight,
    )

    recipe_file = os.path.join(run_dir, "recipe.yaml")
    if not os.path.exists(recipe_file):
        raise GenfwError(f"{run_dir} is not a genfw run directory (no recipe.yaml)")
    overrides = list(overrides or [])
    resolved = validate_recipe(apply_overrides(load_yaml(recipe_file), overrides))
    bad_device = check_device(device or resolved.recipe.device)
    if bad_device:
        raise GenfwError(f"device: {bad_device}")

    holder = holder_if_running(run_dir)
    if holder is not None:  # mid-run: the latest snapshots, evaluated beside the run
        from genfw.pipeline import (  # late: start-up time (loads the metrics, torch-fidelity)
            SnapshotEvaluation,
            load_run_models,
        )

        dev = resolve_device(device)
        tokenizer, priors, extra = load_run_models(run_dir, dev)
        steps = ", ".join(f"{stage} snapshot at step {step}" for stage, step in extra["snapshots"].items())
        console.print(f"[yellow]•[/yellow] the run is still going ({describe_holder(holder)}): evaluating "
                      f"{steps or 'its finished models'}", soft_wrap=True)
        pipeline = SnapshotEvaluation(resolved, run_dir, tokenizer, priors, extra["snapshots"], device=str(dev),
                                      changed_from_recipe=overrides)
        return pipeline.run(["sample", "evaluate"]), pipeline.path("metrics.json")
    pipeline = Run(resolved, output_dir=run_dir, device=device, force=force, write_recipe=False,
                   changed_from_recipe=overrides)
    if force:
        pipeline.stage("evaluate").redo = True
    preflight(resolved, pipeline.device, ["sample", "evaluate", "report"]).raise_if_failed()
    if on_start is not None:
        on_start(pipeline)
    return pipeline.run(["sample", "evaluate", "report"]), pipeline.path("metrics.json")


def sample_files(model: Model, n: int, folder: str, *, labels: list[int] | None = None, seed: int = DEFAULT_SEED,
                 batch_size: int = DEFAULT_BATCH_SIZE, precision: str = DEFAULT_PRECISION,
                 size: tuple[int, int] | None = None, overrides: list[str] | None = None,
                 flags: dict[str, Any] | None = None, grid: str | None = None, overwrite: bool = False) -> SampleResult:
    """``genfw sample``: ``n`` images from ``model`` written to ``folder`` as they are made (one PNG each).

    Also a grid PNG at ``grid``. Every file it would write is checked before any work; an interrupt
    keeps the images already written and says how many. Under torchrun the chunks are split over
    the ranks, each image written once (call ``genfw.dist.init_from_env`` first).
    """

    chosen = model.labels(n, labels)
    class_names = model.class_names
    # every file this command would write is checked before any work
    targets = [os.path.join(folder, image_name(i, int(chosen[i]) if chosen is not None else None, class_names))
               for i in range(n)] + ([grid] if grid else [])
    for target in targets:
        check_write_target(target, overwrite, "images")
    if os.path.isdir(folder) and dist.is_main():
        io.remove_temp_files(folder)  # left by an earlier interrupted write (before any rank writes)
    dist.barrier()
    written: list[str] = []

    def keep(start: int, images, _codes) -> None:
        chunk = chosen[start : start + images.shape[0]] if chosen is not None else None
        written.extend(write_images(folder, images, chunk, class_names, start=start))

    try:
        result = model.generate(n, labels=labels, seed=seed, batch_size=batch_size, precision=precision, size=size,
                                overrides=overrides, flags=flags, on_chunk=keep)
    except KeyboardInterrupt:
        raise GenfwError(f"interrupted: {len(written)} of {n} images were written to {folder} and are kept"
                         + (f" (by rank {dist.rank()})" if dist.is_initialized() else "")) from None
    if grid and dist.is_main():
        write_grid(grid, result.images)
    return result


def inpaint_files(model: Model | str | os.PathLike, image: str, mask: str, folder: str, *, n: int = 4,
                  label: int | None = None, seed: int = DEFAULT_SEED, temperature: float | None = None,
                  steps: int | None = None, overrides: list[str] | None = None, overwrite: bool = False,
                  device: str | torch.device = "cpu") -> str:
    """``genfw inpaint``: ``n`` completions (``000.png``...) and ``side_by_side.png`` in ``folder``; its path.

    Every file it would write is checked before any work; ``model`` is a :class:`Model`, or a
    bundle or run directory, then loaded (onto ``device``) after those checks.
    """

    for target in [*(os.path.join(folder, f"{i:03d}.png") for i in range(n)), os.path.join(folder, "side_by_side.png")]:
        check_write_target(target, overwrite, "images")
    if not isinstance(model, Model):
        model = load_model(model, device)
    return inpaint_file(model, image, mask, n=n, label=label, seed=seed, temperature=temperature, steps=steps,
                        out_dir=folder, overrides=overrides)


def export(run_dir: str, output: str, overwrite: bool = False) -> None:
    """``genfw export``: a run's models in one self-describing bundle (sampler defaults, label names, recipe).

    Mid-run, a stage still training is exported from its latest snapshot (a note on stderr says so).
    """
    from genfw.pipeline import load_run_models  # late: start-up time (loads the metrics, torch-fidelity)

    check_write_target(output, overwrite, "bundle")
    tokenizer, priors, extra = load_run_models(run_dir)
    for stage, step in extra.get("snapshots", {}).items():
        console.print(f"[yellow]•[/yellow] {stage} is still training: exporting its snapshot at step {step}")
    modules = {"tokenizer": tokenizer, **{f"prior.{i}": p for i, p in enumerate(priors)}}
    keep = {k: extra[k] for k in ("sampler", "class_names", "recipe") if k in extra}
    checkpoint.save(output, modules, extra=keep)


def inspect_file(path: str) -> dict[str, Any]:
    """``genfw inspect``: a model file's header alone (no tensor is read), summarised.

    ``metadata``: the file's metadata, each component with its ``parameters`` (floating-point
    elements) and ``tensors`` counted; ``tensors``: how many; ``elements``: elements per dtype.
    """
    header, meta = checkpoint.read_meta(path)
    floating = {"F64", "F32", "F16", "BF16"}
    numel = {k: _numel(v["shape"]) for k, v in header.items()}
    comps = []
    for c in meta.get("components", []):
        prefix = c.get("prefix", "")
        own = [k for k in header if k.startswith(prefix)]
        comps.append({**c, "parameters": sum(numel[k] for k in own if header[k]["dtype"] in floating),
                      "tensors": len(own)})
    by_dtype: dict[str, int] = {}
    for k, v in header.items():
        name = str(checkpoint._DTYPES[v["dtype"]])
        by_dtype[name] = by_dtype.get(name, 0) + numel[k]
    return {"metadata": {**{k: v for k, v in meta.items() if k != "components"}, "components": comps},
            "tensors": len(header), "elements": by_dtype}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
