"""Sampling fast paths that ``genfw bench`` does not measure directly (numbers in docs/benchmarks.md).

* ``sundae-stopping``: megapixel-SUNDAE section 3.4's sample-wise self-stopping at the FFHQ256
  configuration (hourglass 3-16-3, dim 1024, 16x16 codes of 1024). Random weights never settle,
  so the output head is set to a confident distribution (one code with probability 1 - eps): samples then
  freeze one by one, as a trained model's do. Target: the wall time saved is at least 80% of the
  fraction of backbone evaluations saved (frozen samples really leave the batch).
* ``ar-cache``: autoregressive sampling of a 16x16 grid with the key/value cache vs. recomputing
  the whole sequence every step, on the Unleashing Transformers prior (transformer 24 x 512,
  8 heads, 1024 codes). Target: at least 8x faster, and the same codes.
* ``absorbing-windows``: absorbing diffusion sampling of a 16x48 grid from a 16x16 model
  (Unleashing Transformers section 3.3, eq. 8, all windows in one batch) in the same number of
  steps as a 16x16 sample, not one step per token.

Run on a quiet machine (the load average is printed before and after each measurement):

    .venv/bin/python benchmarks/sampling.py all --json benchmarks/sampling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from genfw.registry import build

HOURGLASS_FFHQ256 = {"name": "hourglass",
                     "params": {"dim": 1024, "depth": [3, 16, 3], "shorten_factors": [4], "heads": 8, "head_dim": 64}}
UT_TRANSFORMER = {"name": "transformer", "params": {"dim": 512, "depth": 24, "heads": 8, "positions": "learned"}}
K, GRID = 1024, [16, 16]


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def timed(fn, repeats: int = 1):
    """(median seconds, last result) of ``fn()`` under inference mode."""
    times, out = [], None
    for _ in range(repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def sundae_stopping(batch_size: int = 16, steps: int = 30, eps: float = 0.01) -> dict:
    """Self-stopping vs. the plain sampler at the same seed: evaluations and wall time saved."""
    torch.manual_seed(0)
    prior = build("prior", "sundae", {}, codebook_size=K, grid=GRID, backbone=HOURGLASS_FFHQ256).eval()
    with torch.no_grad():
        # Every position: code 0 with probability 1 - eps, the others uniform.
        prior.backbone.head.weight.zero_()
        prior.backbone.head.bias.zero_()
        prior.backbone.head.bias[0] = math.log((1 - eps) / eps * (K - 1))
    sampler = {"steps": steps, "temperature": 1.0, "temperature_end": 1.0, "sample_proportion": 0.5,
               "sample_proportion_end": 0.5, "min_steps": 10}

    def run(**kw):
        out = prior.sample(batch_size, generator=torch.Generator().manual_seed(0), **{**sampler, **kw})
        return out, dict(prior.last_sample_stats)

    timed(lambda: prior.backbone(torch.zeros(batch_size, *GRID, dtype=torch.long)))  # warm-up
    before = load()
    plain_s, (plain, plain_stats) = timed(lambda: run(self_stopping=False))
    stop_s, (stopped, stop_stats) = timed(lambda: run(self_stopping=True))
    evals_saved = 1 - stop_stats["backbone_evaluations"] / plain_stats["backbone_evaluations"]
    time_saved = 1 - stop_s / plain_s
    frozen_at = stop_stats["frozen_at"]
    return {"config": "sundae, hourglass 3-16-3 dim 1024 (FFHQ256), 16x16 of 1024, random weights, confident head",
            "eps": eps, "batch_size": batch_size, "sampler": sampler,
            "plain_seconds": plain_s, "stopping_seconds": stop_s,
            "plain_evaluations": plain_stats["backbone_evaluations"],
            "stopping_evaluations": stop_stats["backbone_evaluations"],
            "frozen_at": frozen_at, "evaluations_saved": evals_saved, "time_saved": time_saved,
            "time_saved_over_evaluations_saved": time_saved / evals_saved if evals_saved else None,
            "plain_ms_per_step": 1e3 * plain_s / steps,
            "load_before": before, "load_after": load()}


def ar_cache(batch_size: int = 1) -> dict:
    """Cached vs. uncached raster-order sampling of a 16x16 grid: time and identical codes."""
    torch.manual_seed(0)
    prior = build("prior", "autoregressive", {}, codebook_size=K, grid=GRID, backbone=UT_TRANSFORMER).eval()

    def run(use_cache: bool):
        return prior.sample(batch_size, generator=torch.Generator().manual_seed(0), use_cache=use_cache)

    timed(lambda: prior.backbone(torch.zeros(batch_size, *GRID, dtype=torch.long), causal=True))  # warm-up
    before = load()
    cached_s, cached = timed(lambda: run(True))
    uncached_s, uncached = timed(lambda: run(False))
    return {"config": "autoregressive, transformer 24 x 512, 8 heads, learned positions (Unleashing Transformers), "
                      "16x16 of 1024, random weights",
            "batch_size": batch_size, "cached_seconds": cached_s, "uncached_seconds": uncached_s,
            "speedup": uncached_s / cached_s, "cached_ms_per_token": 1e3 * cached_s / math.prod(GRID),
            "same_codes": bool(torch.equal(cached, uncached)),
            "load_before": before, "load_after": load()}


def absorbing_windows(batch_size: int = 1, steps: int = 16, stride: int = 8, big: tuple[int, int] = (16, 48)) -> dict:
    """A 16x48 sample from a 16x16 absorbing model in the same number of steps as a 16x16 one."""
    torch.manual_seed(0)
    prior = build("prior", "absorbing", {}, codebook_size=K, grid=GRID, backbone=UT_TRANSFORMER).eval()

    def run(grid):
        out = prior.sample(batch_size, generator=torch.Generator().manual_seed(0), steps=steps, grid=grid,
                           window_stride=stride, unmasking="fixed")  # exactly `steps` forwards, as measured
        return out, dict(prior.last_sample_stats)

    timed(lambda: prior.backbone(torch.zeros(batch_size, *GRID, dtype=torch.long)))  # warm-up
    before = load()
    normal_s, (normal, normal_stats) = timed(lambda: run(None))
    big_s, (large, big_stats) = timed(lambda: run(big))
    return {"config": "absorbing, transformer 24 x 512 (Unleashing Transformers), trained grid 16x16 of 1024, "
                      "random weights", "batch_size": batch_size, "sampler_steps": steps, "window_stride": stride,
            "grid": list(big), "normal_steps": normal_stats["steps"], "big_steps": big_stats["steps"],
            "windows": big_stats["windows"], "tokens_big": big[0] * big[1],
            "all_revealed": bool((large < K).all()), "normal_seconds": normal_s, "big_seconds": big_s,
            "big_seconds_per_step": big_s / big_stats["steps"],
            "normal_seconds_per_step": normal_s / normal_stats["steps"],
            "load_before": before, "load_after": load()}


BENCHMARKS = {"sundae-stopping": sundae_stopping, "ar-cache": ar_cache, "absorbing-windows": absorbing_windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    for name in names:
        print(f"{name} ...", flush=True)
        results[name] = BENCHMARKS[name]()
        print(json.dumps(results[name], indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
