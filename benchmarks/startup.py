"""How long ``genfw --help`` (and a few other no-work commands) take to start: a measurement.

Each command runs in a fresh interpreter ``--repeats`` times; the median and the fastest wall
time are printed, with the genfw modules and whether torch was imported (``-X importtime``
counts the modules each command loads). Usage::

    .venv/bin/python benchmarks/startup.py [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

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


def time_command(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "genfw", *args], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
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
