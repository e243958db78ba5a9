"""The benchmark itself: :func:`bench` loads the models, measures and returns the JSON record.

Order: the matmul peak, then per repeat one forward of every prior and one sampling run, then
the peak again; the method is described in :mod:`genfw.bench`. The clocks are
:mod:`genfw.bench.timing`, the tables :mod:`genfw.bench.tables`.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from genfw.bench.matmul import MATMUL_METHOD, _peak_table, check_matmul_sizes, peak_precisions
from genfw.bench.models import compile_backbones, load_models
from genfw.bench.timing import (
    Stopwatch,
    _device_name,
    _inverse_spread,
    _load_average,
    _memory_report,
    _memory_start,
    autocast,
    forward_flops,
    forward_inputs,
    resolve_precision,
    spread,
    synchronize,
    timed_backbone,
)
from genfw.errors import ConfigError, GenfwError
from genfw.interfaces import Prior
from genfw.progress import console as progress_console
from genfw.progress import enabled as progress_enabled
from genfw.registry import component_name
from genfw.sampling import prepare_for_sampling, resolve_device, sample_labels


def _say(text: str) -> None:
    if progress_enabled():
        progress_console.print(f"[dim]bench:[/dim] {text}", highlight=False)


def bench(
    source: str,
    *,
    batch_size: int = 4,
    steps: int | None = None,
    device: str | None = "auto",
    precision: str = "auto",
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    repeats: int = 3,
    overrides: list[str] | None = None,
    matmul_size: Sequence[int] | int | None = None,
    seed: int = 0,
    matmul_runs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure a recipe's (random weights) or a model's sampling speed; returns the JSON record.

    Order: the matmul peak, then per repeat one forward of every prior and one sampling run (so a
    step and a forward of the same repeat are measured seconds apart), then the matmul peak again.
    """
    if batch_size < 1 or repeats < 1:
        raise ConfigError("--batch-size and --repeats must be at least 1")
    check_matmul_sizes(matmul_size)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    load_before = _load_average()
    _say(f"loading {source} on {dev}")
    models = load_models(source, dev, overrides, steps)
    tokenizer, priors = models.tokenizer, models.priors
    prepare_for_sampling(tokenizer, priors, dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    inputs = [forward_inputs(p, batch_size, dev, g) for p in priors]
    flops = [forward_flops(p.backbone, x) for p, x in zip(priors, inputs, strict=True)]  # before compiling
    if compile:
        _say("compiling the backbones (torch.compile)")
        compile_backbones(priors)
    labels = sample_labels(batch_size, priors[0].num_classes, None)
    labels = labels.to(dev) if labels is not None else None

    def forward_once(prior: Prior, x: dict[str, Any]) -> float:
        """Wall seconds of one backbone forward, synchronised, as a sampling step is timed."""
        with torch.inference_mode(), autocast(dev, precision):
            synchronize(dev)
            t0 = time.perf_counter()
            prior.backbone(**x)
            synchronize(dev)
        return time.perf_counter() - t0

    def sample_once(repeat: int, warm: bool = False) -> dict[str, Any]:
        """One chunk as generate() makes it: every level top-down, then decode."""
        gen = torch.Generator(device=dev).manual_seed(seed + repeat)
        codes: list[torch.Tensor] = []
        record: dict[str, Any] = {"levels": []}
        with torch.inference_mode(), autocast(dev, precision):
            for prior, sp in zip(priors, models.samplers, strict=True):
                if warm and "steps" in type(sp).model_fields:
                    sp = prior.sampler_params(sp, steps=min(sp.steps, 2))
                network = Stopwatch(dev)
                with timed_backbone(prior, network) as timed:
                    synchronize(dev)
                    t0 = time.perf_counter()
                    c = prior.sample(batch_size, labels=labels, context=codes or None, generator=gen, params=sp)
                    synchronize(dev)
                    seconds = time.perf_counter() - t0
                stats = dict(getattr(prior, "last_sample_stats", {}) or {})
                record["levels"].append({"seconds": seconds, "steps": stats.get("steps"),
                                         "network_seconds": sum(network.seconds()) if timed else None,
                                         "backbone_evaluations": stats.get("backbone_evaluations")})
                codes.append(c)
            t0 = time.perf_counter()
            images = tokenizer.decode(codes).float().clamp(-1, 1).cpu()  # .cpu() synchronises
            record["decode_seconds"] = time.perf_counter() - t0
        record["images"] = images.shape[0]
        return record

    precisions = peak_precisions(dev, precision)
    _say(f"matmul peak before the model ({', '.join(precisions)})")
    peak_before = _peak_table(dev, precisions, matmul_size, **(matmul_runs or {}))

    _say("warm-up: forwards and a short sampling run")
    for prior, x in zip(priors, inputs, strict=True):
        for _ in range(2 if compile else 1):
            forward_once(prior, x)
    sample_once(-1, warm=True)
    memory_start = _memory_start(dev)
    forwards: list[list[float]] = [[] for _ in priors]  # [level][repeat]
    runs = []
    for r in range(repeats):
        _say(f"repeat {r + 1}/{repeats}: one forward per prior (batch {batch_size}), then sampling {batch_size} images")
        for level, (prior, x) in enumerate(zip(priors, inputs, strict=True)):
            forwards[level].append(forward_once(prior, x))
        runs.append(sample_once(r))
    memory = _memory_report(dev, memory_start)

    _say("matmul peak after the model")
    peak_after = _peak_table(dev, precisions, matmul_size, **(matmul_runs or {}))
    rate = max(peak_before[precision]["flops_per_second"], peak_after[precision]["flops_per_second"])
    peak = dict(peak_before[precision] if peak_before[precision]["flops_per_second"] == rate
                else peak_after[precision])
    peak.pop("sizes")
    peak["measured"] = "before" if peak_before[precision]["flops_per_second"] == rate else "after"
    runs_kw = {"min_runs": 5, "max_runs": 50, "budget_s": 2.0, **(matmul_runs or {})}
    peak["method"] = MATMUL_METHOD.format(**runs_kw)
    peak["before"], peak["after"] = peak_before, peak_after

    levels = []
    for level, (prior, fl, sp) in enumerate(zip(priors, flops, models.samplers, strict=True)):
        per = [run["levels"][level] for run in runs]
        fwd = forwards[level]
        timings: dict[str, list[float]] = {
            "forward_ms": [1e3 * s for s in fwd],
            "achieved_flops_per_second": [fl / s for s in fwd],
            "fraction_of_matmul_peak": [fl / s / rate for s in fwd],
            "sample_ms_per_image": [1e3 * p["seconds"] / batch_size for p in per],
        }
        steps_run = [p["steps"] for p in per]
        if all(steps_run):
            timings["sample_ms_per_step"] = [1e3 * p["seconds"] / n for p, n in zip(per, steps_run, strict=True)]
            # Each repeat's step over the forward measured just before it (same repeat).
            timings["step_over_forward"] = [1e3 * p["seconds"] / n / f_ms for p, n, f_ms
                                            in zip(per, steps_run, timings["forward_ms"], strict=True)]
            if all(p["network_seconds"] is not None for p in per):
                timings["network_ms_per_step"] = [1e3 * p["network_seconds"] / n
                                                  for p, n in zip(per, steps_run, strict=True)]
                timings["sampler_overhead_ms_per_step"] = [1e3 * (p["seconds"] - p["network_seconds"]) / n
                                                           for p, n in zip(per, steps_run, strict=True)]
        if all(p["network_seconds"] is not None for p in per):
            timings["sampler_overhead_fraction"] = [1 - p["network_seconds"] / p["seconds"] for p in per]
        spreads = {k: spread(v) for k, v in timings.items()}
        levels.append({
            "level": level, "prior": _component_name(prior), "backbone": _component_name(prior.backbone),
            "parameters": sum(p.numel() for p in prior.parameters()), "grid": list(prior.grid),
            "codebook_size": prior.codebook_size, "sampler": sp.model_dump(),
            "forward_flops": fl,
            "steps": statistics.median(steps_run) if all(steps_run) else None,
            "backbone_evaluations": per[0]["backbone_evaluations"],
            **{k: s["median"] for k, s in spreads.items()},
            "spread": spreads,
        })

    decode = spread([1e3 * run["decode_seconds"] / batch_size for run in runs])
    per_image = spread([(sum(lv["seconds"] for lv in run["levels"]) + run["decode_seconds"]) / batch_size
                        for run in runs])
    sampling = spread([sum(1e3 * lv["seconds"] for lv in run["levels"]) / batch_size for run in runs])
    spreads = {"sample_ms_per_image": sampling, "decode_ms_per_image": decode, "seconds_per_image": per_image,
               "images_per_second": _inverse_spread(per_image)}
    return {
        "source": source, "weights": models.weights, "notes": models.notes,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "precision": precision, "compile": compile,
        "batch_size": batch_size, "repeats": repeats,
        "load_average": {"before": load_before, "after": _load_average()},
        "matmul_peak": peak, "priors": levels,
        **{k: s["median"] for k, s in spreads.items()},
        "spread": spreads,
        **memory,
    }


def _component_name(module: torch.nn.Module) -> str:
    try:
        return component_name(module)
    except GenfwError:  # built outside the registry: the class name is label enough
        return type(module).__name__
