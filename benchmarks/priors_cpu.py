"""What the priors' fast paths save, measured on the CPU: a measurement, not a test.

* autoregressive: key/value-cached decoding vs. recomputing the prefix each step (same codes);
* SUNDAE: backbone evaluations and time with and without sample-wise self-stopping;
* absorbing: time per sample for S = 256, 64, 16 steps (step skipping);
* window aggregation (eq. 8): rows evaluated for a 2x-larger grid, stride 1 vs. 4.

Models are untrained (random weights) except where the number depends on learning: SUNDAE's
self-stopping needs a model whose samples settle, so it is trained for a few hundred steps on
the toy rows-alternate distribution of tests/test_priors.py. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/priors_cpu.py
"""

from __future__ import annotations

import json
import time

import torch

from genfw.registry import build

torch.set_num_threads(1)


def timed(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def draw(prior, n: int, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return prior.sample(n, generator=torch.Generator().manual_seed(0), **kw)


def autoregressive() -> dict:
    prior = build("prior", "autoregressive", {}, codebook_size=1024, grid=[16, 16],
                  backbone={"name": "transformer", "params": {"dim": 256, "depth": 8, "heads": 4}}).eval()
    out = {}
    for cache in (True, False):
        codes = None

        def run(cache=cache):
            nonlocal codes
            codes = draw(prior, 4, use_cache=cache)

        out["cached" if cache else "uncached"] = {"seconds_per_batch_of_4": round(timed(run), 3)}
        out.setdefault("codes", []).append(codes)
    same = torch.equal(*out.pop("codes"))
    out["same_codes"] = same
    out["speedup"] = round(out["uncached"]["seconds_per_batch_of_4"] / out["cached"]["seconds_per_batch_of_4"], 1)
    return out


def toy_codes(n: int, g: torch.Generator) -> torch.Tensor:
    a, b = torch.randint(0, 8, (2, n, 1), generator=g)
    return torch.where(torch.arange(8) % 2 == 0, a, b)[:, :, None].expand(n, 8, 8).clone()


def sundae() -> dict:
    torch.manual_seed(0)
    prior = build("prior", "sundae", {"unroll_steps": 2}, codebook_size=8, grid=[8, 8],
                  backbone={"name": "transformer", "params": {"dim": 64, "depth": 2, "heads": 4}})
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        loss = prior.loss(toy_codes(32, g)).losses["main"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    sampler = {"steps": 100, "temperature": 1.0, "temperature_end": 0.3, "sample_proportion": 0.8,
               "sample_proportion_end": 0.8, "min_steps": 10}
    out = {}
    for stopping in (True, False):
        seconds = timed(lambda stopping=stopping: draw(prior, 64, self_stopping=stopping, **sampler))
        stats = prior.last_sample_stats
        out["self_stopping" if stopping else "all_steps"] = {
            "seconds_per_64": round(seconds, 3), "steps": stats["steps"],
            "backbone_evaluations": stats["backbone_evaluations"]}
    return out


def absorbing() -> dict:
    prior = build("prior", "absorbing", {}, codebook_size=1024, grid=[16, 16],
                  backbone={"name": "transformer", "params": {"dim": 256, "depth": 8, "heads": 4}}).eval()
    out = {}
    for steps in (256, 64, 16):
        # unmasking: fixed, exactly S forwards, as docs/benchmarks.md measured it
        out[f"S={steps}"] = {"seconds_per_batch_of_4": round(timed(
            lambda steps=steps: draw(prior, 4, steps=steps, unmasking="fixed")), 3)}
    for stride in (1, 4):
        draw(prior, 1, steps=16, grid=(32, 32), window_stride=stride, unmasking="fixed")
        out[f"32x32 from 16x16, stride {stride}"] = dict(prior.last_sample_stats)
    return out


if __name__ == "__main__":
    print(json.dumps({"autoregressive": autoregressive(), "sundae": sundae(), "absorbing": absorbing()}, indent=2))
