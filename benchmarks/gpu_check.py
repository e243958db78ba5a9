"""The GPU check: what genfw's CUDA paths do on a real GPU, in one run of a few minutes, one JSON.

For each prior (SUNDAE, absorbing diffusion, autoregressive) on the FFHQ1024 recipe's shapes
(recipes/ffhq1024_sundae.yaml: VQ-GAN f = 32 with 8192 codes, a 32x32 code grid, the 2-12-2
hourglass of dim 1024; the autoregressive prior, which needs a causal backbone, gets a
transformer of the same width and 16 layers), all with random weights:

* ``logits``: bf16 autocast vs fp32 logits of one backbone forward (batch 4): max and mean
  absolute difference, relative L2 error, argmax agreement, mean KL(fp32 || bf16);
* ``sampling``: ``genfw bench`` at batch 16 in bf16, without and with ``torch.compile``: images/s,
  ms per step, peak CUDA memory, achieved FLOP/s and its fraction of the measured bf16 matmul peak
  (the sampler's steps are capped by ``--steps`` so that the whole check fits its budget; the
  autoregressive prior always makes its 1024 tokens);
* ``nccl``: ``torchrun --nproc-per-node 1`` of this script's ``--nccl-worker``: NCCL all-reduce,
  gather and broadcast through genfw.dist, and a few DistributedDataParallel training steps.

Run it on the GPU machine (budget: under 8 minutes on one GPU):

    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/gpu_check.json

``--dry-run`` (CPU, seconds) builds the models on the meta device and lists what would be measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "recipes", "ffhq1024_sundae.yaml")
#: Overrides turning the FFHQ1024 SUNDAE recipe into each prior on the same shapes.
PRIORS: dict[str, list[str]] = {
    "sundae": [],
    "absorbing": ["prior.name=absorbing", "~sample.params"],
    "autoregressive": ["prior.name=autoregressive", "prior.backbone.name=transformer",
                       "prior.backbone.params={dim: 1024, depth: 16, heads: 8}", "~sample.params"],
}
BATCH = 16
LOGITS_BATCH = 4
MEASUREMENTS = [
    "logits: bf16 autocast vs fp32 logits of one backbone forward (batch 4): max/mean |diff|, relative L2, "
    "argmax agreement, KL(fp32 || bf16)",
    "sampling: images/s at batch 16, bf16, eager (genfw bench: ms per step, peak CUDA memory, fraction of the "
    "bf16 matmul peak)",
    "sampling: images/s at batch 16, bf16, torch.compile",
]


def _say(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def plan(steps: int) -> dict[str, Any]:
    """What the check would measure: the models (built on the meta device) and the measurements."""
    from genfw.bench import load_models

    out: dict[str, Any] = {"recipe": os.path.relpath(RECIPE), "batch_size": BATCH, "priors": {}}
    for name, overrides in PRIORS.items():
        models = load_models(RECIPE, torch.device("meta"), overrides)
        prior = models.priors[0]
        sampler = models.samplers[0]
        sampler_steps = getattr(sampler, "steps", None)
        out["priors"][name] = {
            "overrides": overrides,
            "prior": type(prior).__name__, "backbone": type(prior.backbone).__name__,
            "parameters": sum(p.numel() for p in prior.parameters()),
            "tokenizer_parameters": sum(p.numel() for p in models.tokenizer.parameters()),
            "grid": list(prior.grid), "codebook_size": prior.codebook_size,
            "sampler_steps": min(sampler_steps, steps) if sampler_steps else f"{prior.grid[0] * prior.grid[1]} tokens",
            "measurements": MEASUREMENTS,
        }
    out["nccl"] = "torchrun --standalone --nproc-per-node 1 benchmarks/gpu_check.py --nccl-worker OUT: NCCL " \
                  "all-reduce, gather, broadcast (genfw.dist) and 3 DistributedDataParallel training steps"
    return out


@torch.inference_mode()
def logits_agreement(overrides: list[str], device: torch.device, seed: int = 0) -> dict[str, Any]:
    """bf16 autocast vs fp32 logits of one backbone forward on random codes."""
    from genfw.bench import forward_inputs, load_models

    torch.manual_seed(seed)
    models = load_models(RECIPE, device, overrides)
    prior = models.priors[0].eval()
    g = torch.Generator(device=device).manual_seed(seed)
    x = forward_inputs(prior, LOGITS_BATCH, device, g)
    ref = prior.backbone(**x).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = prior.backbone(**x).float()
    diff = (low - ref).abs()
    logp_ref, logp_low = ref.log_softmax(-1), low.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_low)).sum(-1)
    result = {
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "relative_l2": float((low - ref).norm() / ref.norm()),
        "argmax_agreement": float((low.argmax(-1) == ref.argmax(-1)).float().mean()),
        "mean_kl_fp32_bf16": float(kl.mean()), "logits_std": float(ref.std()),
        "finite": bool(torch.isfinite(low).all()),
    }
    del models, prior, ref, low
    torch.cuda.empty_cache()
    return result


def sampling(overrides: list[str], compile_: bool, steps: int) -> dict[str, Any]:
    """``genfw bench`` at batch 16, bf16 (random weights), the sampler's steps capped at ``steps``."""
    from genfw.bench import bench, load_models

    cap = []
    models = load_models(RECIPE, torch.device("meta"), overrides)
    if "steps" in type(models.samplers[0]).model_fields:
        cap = [f"sample.params.steps={min(steps, models.samplers[0].steps)}"]
    torch.cuda.reset_peak_memory_stats()
    record = bench(RECIPE, batch_size=BATCH, device="cuda", precision="bf16", compile=compile_, repeats=2,
                   overrides=overrides + cap, matmul_runs={"min_runs": 3, "max_runs": 20, "budget_s": 1.0})
    level = record["priors"][0]
    return {
        "images_per_second": record["images_per_second"], "seconds_per_image": record["seconds_per_image"],
        "sample_ms_per_image": record["sample_ms_per_image"], "decode_ms_per_image": record["decode_ms_per_image"],
        "steps": level.get("steps"), "sample_ms_per_step": level.get("sample_ms_per_step"),
        "forward_ms": level["forward_ms"], "forward_flops": level["forward_flops"],
        "achieved_flops_per_second": level["achieved_flops_per_second"],
        "fraction_of_bf16_matmul_peak": level["fraction_of_matmul_peak"],
        "bf16_matmul_peak_flops_per_second": record["matmul_peak"]["flops_per_second"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        **{k: v for k, v in record.items() if "memory" in k},
    }


def nccl_smoke(timeout: int = 180) -> dict[str, Any]:
    """``torchrun --nproc-per-node 1`` of ``--nccl-worker``; its JSON, or the failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "nccl.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               os.path.abspath(__file__), "--nccl-worker", out]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout}s"}
        result: dict[str, Any] = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode}
        if proc.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                result |= json.load(f)
        else:
            result |= {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
        return result


def nccl_worker(out: str) -> None:
    """Inside torchrun: NCCL collectives through genfw.dist and DDP training steps."""
    import torch.distributed as td
    from torch import nn

    from genfw import dist
    from genfw.config import TrainSpec
    from genfw.interfaces import Component, StepOutput
    from genfw.train import Trainer

    if not dist.init_from_env():  # a world of one: genfw joins no group by itself, the smoke does
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl")

    t = torch.ones(4, device="cuda") * (dist.rank() + 1)
    dist.all_reduce_mean(t)
    gathered = dist.gather([dist.rank()], dst=None)
    shared = dist.broadcast({"hello": 1})

    class Net(Component):
        def __init__(self, params=None, **construct):
            super().__init__(params, **construct)
            self.body = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))

        def training_step(self, batch, step):
            x, y = batch
            return StepOutput({"main": (self.body(x).squeeze(-1) - y).pow(2).mean()})

    x = torch.randn(64, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(-1))
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(Net(), data, TrainSpec(steps=3, batch_size=8, log_every=1), tmp, device="cuda").fit()
    result = {"ok": True, "backend": td.get_backend(), "world_size": dist.world_size(),
              "all_reduce": t.tolist(), "gather": gathered, "broadcast": shared, "ddp_steps": 3,
              "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}
    td.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="Where to write the JSON")
    parser.add_argument("--dry-run", action="store_true", help="List what would be measured (CPU, no GPU needed)")
    parser.add_argument("--steps", type=int, default=20, help="Cap on the sampler's steps (SUNDAE, absorbing)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="Skip the remaining measurements past this many seconds (each one says so)")
    parser.add_argument("--per-measurement-s", type=float, default=150.0,
                        help="Stop any one measurement after this many seconds (it records so)")
    parser.add_argument("--nccl-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        nccl_worker(args.nccl_worker)
        return 0
    result: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "torch": torch.__version__, "plan": plan(args.steps)}
    if args.dry_run:
        result["dry_run"] = True
        for name, p in result["plan"]["priors"].items():
            print(f"{name}: {p['prior']} over {p['backbone']} ({p['parameters'] / 1e6:.1f}M parameters), grid "
                  f"{p['grid'][0]}x{p['grid'][1]} of {p['codebook_size']} codes, sampler steps {p['sampler_steps']}")
            for m in p["measurements"]:
                print(f"  - {m}")
        print(f"nccl: {result['plan']['nccl']}")
        _write(args.out, result)
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to list what would be measured)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference logits in true fp32
    torch.backends.cudnn.allow_tf32 = False
    result["device_name"] = torch.cuda.get_device_name()
    result["cuda"] = torch.version.cuda
    t0 = time.perf_counter()

    class OverTime(Exception):
        pass

    def alarm(signum, frame):  # noqa: ARG001
        raise OverTime

    signal.signal(signal.SIGALRM, alarm)

    def timed(label: str, fn, *a) -> dict[str, Any]:
        left = args.budget_s - (time.perf_counter() - t0)
        if left <= 5:
            _say(f"{label}: skipped (past the {args.budget_s:.0f}s budget)")
            return {"skipped": f"past the {args.budget_s:.0f}s budget"}
        _say(label)
        start = time.perf_counter()
        # no one measurement may eat the rest of the budget (e.g. compiling autoregressive decoding)
        limit = int(min(left, args.per_measurement_s))
        signal.alarm(limit)
        try:
            out = fn(*a)
        except OverTime:
            out = {"error": f"stopped after {limit}s (per-measurement limit)"}
        except Exception as e:  # noqa: BLE001 - recorded in the JSON: the check goes on
            out = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        finally:
            signal.alarm(0)
        out["seconds"] = time.perf_counter() - start
        torch.cuda.empty_cache()
        return out

    result["nccl"] = timed("NCCL: torchrun --nproc-per-node 1", nccl_smoke)  # first: short, and never skipped
    result["priors"] = {}
    for name, overrides in PRIORS.items():
        result["priors"][name] = {
            "logits": timed(f"{name}: bf16 vs fp32 logits", logits_agreement, overrides, torch.device("cuda")),
            "sampling_eager": timed(f"{name}: sampling, eager", sampling, overrides, False, args.steps),
        }
    for name, overrides in PRIORS.items():  # compile last: the slowest, first to go if time runs out
        result["priors"][name]["sampling_compiled"] = timed(f"{name}: sampling, torch.compile", sampling,
                                                            overrides, True, args.steps)
    result["seconds"] = time.perf_counter() - t0
    _write(args.out, result)
    _say(f"wrote {args.out} ({result['seconds']:.0f}s)")
    return 0


def _write(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
