"""``genfw sample`` and ``genfw inpaint``: images from an exported bundle or a run directory.

The sampling is genfw.api's ``Model.generate`` / ``Model.inpaint``; this module parses the
options and prints what was written.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from genfw.cli.base import Device, SamplerOverrides, _overrides, _warn_plugin_problems, command, err, out
from genfw.errors import GenfwError


def _parse_size(size: str | None) -> tuple[int, int] | None:
    if not size:
        return None
    try:
        h, w = (int(v) for v in size.lower().split("x"))
        return h, w
    except ValueError:
        raise GenfwError(f"--size expects HxW code-grid sizes like 16x48, got '{size}'") from None


_OldOut = Annotated[str | None, typer.Option("--out", hidden=True)]


@command
def sample(
    model: Annotated[str, typer.Argument(help="Exported bundle (.safetensors, path or URL) or a run directory")],
    overrides: SamplerOverrides = None,
    n: Annotated[int, typer.Option("-n", help="Number of images")] = 16,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (priors that have them); = steps=N")] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature; constant unless --temperature-end is given")] = None,
    temperature_end: Annotated[float | None, typer.Option(
        help="Temperature at the last step (annealed linearly from --temperature)")] = None,
    proportion: Annotated[float | None, typer.Option(
        help="SUNDAE: fraction of positions updated per step; constant unless --proportion-end is given")] = None,
    proportion_end: Annotated[float | None, typer.Option(help="SUNDAE: proportion at the last step")] = None,
    label: Annotated[list[int] | None, typer.Option(help="Class label(s), cycled over the samples "
                                                         "(default: every class in turn)")] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="bf16, fp16 or fp32 (autocast on CUDA; CPU samples in fp32)")] = "bf16",
    batch_size: Annotated[int, typer.Option(help="Images per chunk")] = 16,
    size: Annotated[str | None, typer.Option(help="Code grid HxW larger than training (if the prior supports it)")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="Folder for the PNGs")] = "samples",
    out_dir: _OldOut = None,
    grid: Annotated[str | None, typer.Option(help="Also write a grid PNG here")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="A sampler override, as the positional ones")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs of the same names")] = False,
) -> None:
    """Generate images from an exported model or a run directory (mid-run: its latest snapshots).

    Images are written as they are made; Ctrl-C (or SIGTERM) keeps those already written. The
    Python API's Model.generate does the sampling.
    """
    from genfw import dist  # late: start-up time
    from genfw.api import load_model, sample_files  # late: start-up time
    from genfw.progress import announce  # late: start-up time
    from genfw.sampling import flag_overrides, resolve_device  # late: start-up time

    dist.init_from_env()  # under torchrun the chunks are split over the ranks, each image written once
    folder = out_dir or output
    dev = resolve_device(device)
    announce(dev, precision)
    _warn_plugin_problems()
    model_ = load_model(model, dev)
    for stage, step in (model_.extra.get("snapshots") or {}).items():
        err.print(f"[yellow]•[/yellow] {stage} is still training: using its snapshot at step {step}")
    flags = flag_overrides(steps, temperature, temperature_end, proportion, proportion_end)
    result = sample_files(model_, n, folder, labels=label, seed=seed, batch_size=batch_size, precision=precision,
                          size=_parse_size(size), overrides=_overrides(set_, overrides), flags=flags, grid=grid,
                          overwrite=overwrite)
    main = dist.is_main()
    dist.destroy()
    if not main:
        return
    processes = f", {dist_world} processes" if (dist_world := int(os.environ.get("WORLD_SIZE", "1"))) > 1 else ""
    out.print(f"[green]✓[/green] {n} images -> {folder} in {result.seconds:.2f}s "
              f"({result.images_per_second:.2f} images/s on {dev}{processes})")


@command
def inpaint(
    model: Annotated[str, typer.Argument(help="Exported bundle (.safetensors) or a run directory")],
    overrides: SamplerOverrides = None,
    image: Annotated[str, typer.Option(help="Input image")] = ...,
    mask: Annotated[str, typer.Option(help="Mask image: white (non-zero) pixels are regenerated")] = ...,
    n: Annotated[int, typer.Option("-n", help="Number of completions")] = 4,
    label: Annotated[int | None, typer.Option(help="Class label; required for class-conditional models")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    temperature: Annotated[float | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="Folder for the completions")] = "inpainted",
    out_dir: _OldOut = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="A sampler override, as the positional ones")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs of the same names")] = False,
) -> None:
    """Regenerate the masked region of an image (any mask shape), keeping the rest."""
    from genfw.api import inpaint_files  # late: start-up time
    from genfw.progress import announce  # late: start-up time
    from genfw.sampling import resolve_device  # late: start-up time

    dev = resolve_device(device)
    announce(dev, "bf16")
    _warn_plugin_problems()
    path = inpaint_files(model, image, mask, out_dir or output, n=n, label=label, seed=seed, temperature=temperature,
                         steps=steps, overrides=_overrides(set_, overrides), overwrite=overwrite, device=dev)
    out.print(f"[green]✓[/green] {n} completions -> {path}")
