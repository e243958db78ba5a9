"""Where the time of one prior forward goes (torch.profiler), against this process's matmul peak.

The FFHQ256 SUNDAE prior (hourglass 3-16-3, dim 1024, 8 heads of 64, shorten 4, 16x16 codes of
1024) at batch 4 by default. Splits the forward's CPU time into the model's matrix multiplies
(with their own achieved FLOP/s), attention, normalisation, activations, other elementwise
ops and copies, which says what limits the fraction of the matmul peak ``genfw bench`` reports.

    .venv/bin/python benchmarks/forward_profile.py [--batch-size 4] [--compile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from genfw.bench import compile_backbones, forward_flops, forward_inputs, matmul_peak
from genfw.registry import build

CATEGORIES = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "mkl_linear"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "normalisation": ("layer_norm",),
    "activation": ("gelu",),
    "copy": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index_select", "aten::embedding"),
    "elementwise": ("aten::add", "aten::mul", "aten::view_as_complex", "aten::sub", "aten::div"),
}


def category(name: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "compiled kernels / other" if "graph" in name or "cpp_fused" in name or "Torch-Compiled" in name else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior = build("prior", "sundae", {}, codebook_size=1024, grid=[16, 16],
                  backbone={"name": "hourglass", "params": {"dim": 1024, "depth": [3, 16, 3], "shorten_factors": [4],
                                                            "heads": 8, "head_dim": 64}}).eval()
    x = forward_inputs(prior, args.batch_size, torch.device("cpu"), torch.Generator().manual_seed(0))
    flops = forward_flops(prior.backbone, x)
    if args.compile:
        compile_backbones([prior])
    load_before = [round(v, 2) for v in os.getloadavg()]
    peak_before = matmul_peak(torch.device("cpu"), "fp32")
    with torch.inference_mode():
        prior.backbone(**x)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            prior.backbone(**x)
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            prior.backbone(**x)
    peak_after = matmul_peak(torch.device("cpu"), "fp32")
    peak = max(peak_before["flops_per_second"], peak_after["flops_per_second"])  # as genfw bench: the larger
    seconds = statistics.median(times)

    # Self time per top-level op category; matmul FLOPs from the recorded shapes.
    by_cat: dict[str, float] = {}
    matmul_flops = 0
    for event in prof.key_averages(group_by_input_shape=True):
        cat = category(event.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + event.self_cpu_time_total / 1e6
        shapes = event.input_shapes
        if event.key == "aten::addmm" and len(shapes) >= 3 and shapes[1] and shapes[2]:
            (m, k), (_, n) = shapes[1], shapes[2]
            matmul_flops += 2 * m * k * n * event.count
        elif event.key == "aten::mm" and len(shapes) >= 2 and shapes[0] and shapes[1]:
            (m, k), (_, n) = shapes[0], shapes[1]
            matmul_flops += 2 * m * k * n * event.count
    total = sum(by_cat.values())
    result = {
        "config": "sundae / hourglass 3-16-3, dim 1024, 8 heads x 64, shorten 4, 16x16 of 1024 (FFHQ256)",
        "batch_size": args.batch_size, "compile": args.compile, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "forward_seconds": seconds, "forward_flops": flops,
        "achieved_flops_per_second": flops / seconds, "matmul_peak_flops_per_second": peak,
        "matmul_peak_before_after": [peak_before["flops_per_second"], peak_after["flops_per_second"]],
        "fraction_of_matmul_peak": flops / seconds / peak,
        "profiled_seconds": total,
        "time_fraction": {k: v / total for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "model_matmul_flops_per_second": matmul_flops / by_cat.get("matmul", float("nan")),
        "model_matmul_fraction_of_peak": matmul_flops / by_cat.get("matmul", float("nan")) / peak,
        "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
