"""Pre-flight checks: run and --dry-run stop in seconds, before any stage writes; validate reports."""

import time

import pytest
import torch
import yaml
from helpers import TINY_RECIPE
from typer.testing import CliRunner

from genfw.cli import app
from genfw.config import validate_recipe
from genfw.preflight import check_device, preflight

BASE = {**TINY_RECIPE, "name": "pf"}
VQGAN = {"name": "vqgan", "params": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                                     "z_channels": 8, "embed_dim": 8, "codebook_size": 16}}


def _cases(tmp_path):
    missing_data = {**BASE, "data": {"name": "folder", "params": {"path": str(tmp_path / "no-data"), "resolution": 4}}}
    weights = {**BASE, "data": {"name": "synthetic", "params": {"size": 16, "resolution": 16, "num_classes": 2}},
               "tokenizer": VQGAN, "train": {"tokenizer": {"steps": 2}, "prior": {"steps": 2}}}
    device = {**BASE, "device": "cuda:99"}
    return {"data": (missing_data, "data: dataset path does not exist"),
            "weights": (weights, "tokenizer: LPIPS needs VGG16 weights at"),
            "device": (device, "device: device 'cuda:99' requested but")}


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no LPIPS/Inception weights here


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", ["data", "weights", "device"])
def test_run_stops_before_any_stage_in_one_line(tmp_path, case, dry_run):
    recipe, message = _cases(tmp_path)[case]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(out), *(["--dry-run"] if dry_run else [])])
    seconds = time.perf_counter() - t0
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()
    assert seconds < 20  # seconds, not a stage (generous: the test machine is shared)


def test_validate_reports_but_passes_a_recipe_for_another_machine(tmp_path):
    recipe, _ = _cases(tmp_path)["data"]
    recipe = {**recipe, "device": "cuda:99"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(path)], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output and "not ready on this machine: 2 check(s) failed" in result.output
    assert "✗ data: dataset path does not exist" in result.output and "✗ device:" in result.output
    strict = CliRunner().invoke(app, ["validate", str(path), "--strict"])
    assert strict.exit_code == 1
    assert sum(line.startswith("error:") for line in strict.output.splitlines()) == 2


def test_ready_recipe_counts_its_images(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    raw = {**BASE, "data": {"name": "folder", "params": {"path": str(tmp_path), "resolution": 4}}}
    report = preflight(validate_recipe(raw), "cpu")
    assert not report.failed
    assert any(c.name == "data" and c.message.startswith("5 images") for c in report.checks)


def test_device_check():
    assert check_device("cpu") is None and check_device("auto") is None
    assert "not a device" in check_device("gpu7")
    assert check_device("cuda:99") is not None
    if not torch.cuda.is_available():
        assert "CUDA is not available" in check_device("cuda")


def test_compile_is_honoured(monkeypatch, tmp_path):
    """train.prior.compile: true compiles the backbone in place (names and checkpoints unchanged)."""
    from genfw.config import TrainSpec
    from genfw.registry import build
    from genfw.train import Trainer

    compiled = []

    def fake_compile(fn, *args, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    prior = build("prior", "sundae", {}, codebook_size=4, grid=[2, 2], num_classes=0, context=[],
                  backbone={"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}})
    keys = list(prior.state_dict())
    Trainer(prior, [], TrainSpec(steps=1, compile=True), tmp_path)
    assert len(compiled) == 1 and compiled[0].__self__ is prior.backbone
    assert list(prior.state_dict()) == keys
    Trainer(prior, [], TrainSpec(steps=1, compile=False), tmp_path)
    assert len(compiled) == 1
