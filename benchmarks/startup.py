"""How long ``genfw --help`` (and a few other no-work commands) take to start: a measurement.

Each command runs in a fresh interpreter ``--repeats`` times; the median and the fastest wall
time are printed, with the genfw modules and whether torch was imported (``-X importtime``
counts the modules each command loads). ``--against DIR`` compares ``genfw --help`` with another
checkout of genfw (e.g. ``git worktree add /tmp/before <commit>``), the two interleaved run by
run so that the machine's load falls on both alike. Usage::

    .venv/bin/python benchmarks/startup.py [--repeats 15] [--json out.json] [--against /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "genfw --help": ["--help"],
    "genfw run --help": ["run", "--help"],
    "genfw plugins --help": ["plugins", "--help"],
}


def loaded_modules(args: list[str]) -> tuple[int, bool]:
    """(genfw modules imported, torch imported) by one run of ``genfw ARGS``."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "genfw", *args],
                         capture_output=True, text=True, check=True)
    names = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    return sum(1 for n in names if n.startswith("genfw")), any(n == "torch" for n in names)


def _env(tree: str | None) -> dict[str, str] | None:
    """The environment that makes ``python -m genfw`` import genfw (and its plugins) from ``tree``."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.path.join(tree, "plugins")])}


def time_command(args: list[str], repeats: int, tree: str | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "genfw", *args], capture_output=True, check=True, env=_env(tree))
        times.append(time.perf_counter() - start)
    return times


def compare(other: str, repeats: int) -> dict[str, dict[str, float]]:
    """``genfw --help`` of this checkout and of ``other``, interleaved run by run."""
    here = str(Path(__file__).resolve().parents[1])
    times: dict[str, list[float]] = {here: [], other: []}
    for _ in range(repeats):
        for tree in times:
            times[tree] += time_command(["--help"], 1, tree)
    return {tree: {"median_s": round(statistics.median(t), 4), "min_s": round(min(t), 4)} for tree, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--against", metavar="DIR", help="another genfw checkout to compare `genfw --help` with")
    args = parser.parse_args()
    if args.against:
        for tree, row in compare(os.path.abspath(args.against), max(args.repeats, 20)).items():
            print(f"genfw --help  {tree:40s} median {row['median_s']:.4f} s  min {row['min_s']:.4f} s")
        return
    time_command(["--help"], 2)  # warm the file cache
    rows = {}
    for label, argv in COMMANDS.items():
        times = time_command(argv, args.repeats)
        modules, torch_loaded = loaded_modules(argv)
        rows[label] = {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                       "genfw_modules": modules, "imports_torch": torch_loaded}
        print(f"{label:24s} median {rows[label]['median_s']:.3f} s  min {rows[label]['min_s']:.3f} s  "
              f"genfw modules {modules:3d}  torch {'yes' if torch_loaded else 'no'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
