"""Parameter counts of the paper backbones, and the CPU forward time of the FFHQ256 hourglass.

A measurement, not a test. Counts are taken by building each configuration on the meta device
(no memory) with the paper's vocabulary, grid and classes (megapixel-SUNDAE Table 3; Unleashing
Transformers' 24x512x8 prior with 1024 codes + the mask token). ``--time`` also runs the
FFHQ256 3-16-3 dim-1024 hourglass forward at batch 4 in fp32 and, interleaved with it (so both
see the same machine load), a 2048^3 fp32 matmul, and reports the forward's achieved FLOP/s as a
fraction of that matmul throughput. Usage::

    .venv/bin/python benchmarks/backbones.py [--time] [--repeats 6]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from genfw.registry import build

#: name -> (backbone, params, input vocab, codes, grid, classes)
PAPER: dict[str, tuple[str, dict, int, int, tuple[int, int], int]] = {
    "FFHQ256 3-16-3": ("hourglass", {"depth": [3, 16, 3]}, 1024, 1024, (16, 16), 0),
    "FFHQ1024 2-12-2": ("hourglass", {"depth": [2, 12, 2]}, 8192, 8192, (32, 32), 0),
    "CelebA 2-12-2": ("hourglass", {"depth": [2, 12, 2]}, 1024, 1024, (16, 16), 0),
    "MNIST/FashionMNIST 2-8-2": ("hourglass", {"depth": [2, 8, 2]}, 256, 256, (28, 28), 10),
    "ImageNet 3-14-3 (12 heads)": ("hourglass", {"depth": [3, 14, 3], "heads": 12}, 1024, 1024, (16, 16), 1000),
    "Unleashing 24x512x8": ("transformer", {}, 1025, 1024, (16, 16), 0),
}


def build_config(name: str, device: str = "meta") -> torch.nn.Module:
    """One paper backbone, built through the registry."""
    backbone, params, vocab, codes, grid, classes = PAPER[name]
    with torch.device(device):
        return build("backbone", backbone, params, vocab_size=vocab, out_size=codes, grid=list(grid),
                     num_classes=classes, context=[])


def counts() -> None:
    """Markdown table: total parameters and those outside the embeddings/head."""
    print("| configuration | backbone | vocab | grid | classes | parameters | without embeddings/head |")
    print("|---|---|---|---|---|---|---|")
    for name, (backbone, _, vocab, _, grid, classes) in PAPER.items():
        bb = build_config(name)
        total = sum(p.numel() for p in bb.parameters())
        io = sum(p.numel() for n, p in bb.named_parameters() if n.startswith(("embed.", "head.", "positions")))
        print(f"| {name} | {backbone} | {vocab} | {grid[0]}x{grid[1]} | {classes} | {total / 1e6:.1f}M "
              f"| {(total - io) / 1e6:.1f}M |")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_time(repeats: int) -> None:
    """FFHQ256 forward at batch 4, fp32, against the same process's fp32 matmul throughput."""
    torch.manual_seed(0)
    bb = build_config("FFHQ256 3-16-3", "cpu").eval()
    tokens = torch.randint(0, 1024, (4, 16, 16))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            bb(tokens)
        flops = counter.get_total_flops()
        forward, matmul = [], []
        for _ in range(repeats):
            forward.append(_timed(lambda: bb(tokens)))
            matmul.append(min(_timed(lambda: a @ b) for _ in range(4)))
    peak = 2 * 2048**3 / min(matmul)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"forward: {flops / 1e9:.1f} GFLOP, best {min(forward) * 1e3:.0f} ms, "
          f"median {sorted(forward)[len(forward) // 2] * 1e3:.0f} ms -> {flops / min(forward) / 1e9:.1f} GFLOP/s")
    print(f"matmul 2048^3 fp32: {peak / 1e9:.1f} GFLOP/s (best of {4 * repeats})")
    print(f"forward / matmul throughput: {flops / min(forward) / peak:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also time the FFHQ256 forward on this CPU")
    parser.add_argument("--repeats", type=int, default=6, help="timed forward passes")
    args = parser.parse_args()
    counts()
    if args.time:
        forward_time(args.repeats)


if __name__ == "__main__":
    main()
