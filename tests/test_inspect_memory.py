"""Reading a model file's header reads no tensor: genfw inspect on 1 GB costs no more than on 1 KB."""

import json
import os
import struct
import subprocess
import sys

import pytest

import genfw
from genfw.registry import build

ENV = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0"}
_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # KiB on Linux


def _peak_rss_bytes(*cmd) -> int:
    """Peak resident set size of one child process (measured by a parent that runs only it)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, *map(str, cmd)], capture_output=True, text=True,
                         env=ENV, timeout=300, check=True)
    return int(out.stdout.strip()) * 1024


def _sparse_model_file(path, tensor_bytes: int) -> None:
    """A valid genfw model file holding one zero tensor of ``tensor_bytes``, written sparse (instant)."""
    small = path.with_suffix(".small.safetensors")
    prior = build("prior", "sundae", {}, codebook_size=4, grid=[2, 2], num_classes=0, context=[],
                  backbone={"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}})
    genfw.save(small, prior)
    data = small.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["extra.big"] = {"dtype": "F32", "shape": [tensor_bytes // 4], "data_offsets": [end, end + tensor_bytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body[:end])
        f.truncate(8 + len(raw) + end + tensor_bytes)  # the zeros are a hole: nothing written
    small.unlink()


def test_inspect_peak_memory_does_not_grow_with_the_file(tmp_path):
    big, tiny = tmp_path / "big.safetensors", tmp_path / "tiny.safetensors"
    _sparse_model_file(big, 1 << 30)
    _sparse_model_file(tiny, 1 << 10)
    try:
        assert big.stat().st_size > 1 << 30
        peak_big = _peak_rss_bytes(sys.executable, "-m", "genfw", "inspect", big)
        peak_tiny = _peak_rss_bytes(sys.executable, "-m", "genfw", "inspect", tiny)
    finally:
        big.unlink()
    print(f"genfw inspect peak RSS: 1 GiB file {peak_big / 2**20:.0f} MiB, 1 KiB file {peak_tiny / 2**20:.0f} MiB")
    assert peak_big - peak_tiny < 200 * 2**20, (peak_big, peak_tiny)
    out = subprocess.run([sys.executable, "-m", "genfw", "inspect", tiny], capture_output=True, text=True, env=ENV)
    assert "prior" in out.stdout and "float32" in out.stdout


@pytest.mark.slow
def test_loading_needs_about_the_models_size(tmp_path):
    """genfw.load of a 192 MiB model raises peak RSS by about 1x its size (was 2x: whole file + module)."""
    make = ("import sys, genfw; from genfw.registry import build; d, n = int(sys.argv[2]), int(sys.argv[3]); "
            "p = build('prior', 'sundae', {}, codebook_size=16, grid=[4, 4], num_classes=0, context=[], "
            "backbone={'name': 'transformer', 'params': {'dim': d, 'depth': n, 'heads': 8}}); genfw.save(sys.argv[1], p)")
    big, tiny = tmp_path / "big.safetensors", tmp_path / "tiny.safetensors"
    subprocess.run([sys.executable, "-c", make, big, "512", "16"], check=True, env=ENV)
    subprocess.run([sys.executable, "-c", make, tiny, "16", "1"], check=True, env=ENV)
    size = big.stat().st_size
    load = [sys.executable, "-c", "import sys, genfw; genfw.load(sys.argv[1])"]
    extra = _peak_rss_bytes(*load, big) - _peak_rss_bytes(*load, tiny)
    print(f"genfw.load: model file {size / 2**20:.0f} MiB, peak RSS above a tiny model {extra / 2**20:.0f} MiB")
    assert extra < 1.3 * size, (extra, size)
