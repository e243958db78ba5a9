"""docs/python-api.md runs as written, and the Python API samples what the CLI samples."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_RECIPE
from PIL import Image
from typer.testing import CliRunner

import genfw
from genfw.cli import app
from genfw.errors import ConfigError
from genfw.registry import build

DOC = Path(__file__).parents[1] / "docs" / "python-api.md"
RECIPE = {**TINY_RECIPE, "name": "api",
          "data": {"name": "synthetic", "params": {"size": 16, "resolution": 4, "num_classes": 2}}}



def tiny_bundle(path: Path, num_classes: int = 3) -> Path:
    torch.manual_seed(0)
    tokenizer = build("tokenizer", "pixels", {"levels": 8}, channels=1, resolution=[4, 4])
    prior = build("prior", "sundae", {}, codebook_size=8, grid=[4, 4], num_classes=num_classes, context=[],
                  backbone={"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}})
    genfw.save(path, {"tokenizer": tokenizer, "prior.0": prior},
               extra={"sampler": {"steps": 5, "min_steps": 2}, "class_names": ["a", "b", "c"][:num_classes]})
    return path


def test_doc_code_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    recipe = tmp_path / "api.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    scope = {"MODEL": str(tiny_bundle(tmp_path / "m.safetensors")), "OUT": tmp_path, "RECIPE": str(recipe)}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), scope)  # noqa: S102 - our own documentation
    assert (tmp_path / "first.png").exists()
    assert len(scope["completions"]) == 3
    assert isinstance(scope["metrics"]["prior0/nll_kind"], str)
    assert (tmp_path / "run" / "metrics.json").exists()


def test_samples_equal_the_clis(tmp_path):
    bundle = tiny_bundle(tmp_path / "m.safetensors")
    result = CliRunner().invoke(app, ["sample", str(bundle), "-n", "5", "--seed", "3", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    model = genfw.load(bundle)
    ours = model.sample(5, seed=3)
    files = sorted((tmp_path / "cli").glob("0*.png"))
    assert len(files) == 5 and "_class-a" in files[0].name and "_class-b" in files[1].name
    for im, f in zip(ours, files):
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(f)))
    # the stored sampler defaults are used by both: other steps give other images
    other = model.sample(5, seed=3, steps=1, min_steps=1, output="tensor")
    assert not torch.equal(other, model.sample(5, seed=3, output="tensor"))
    # and a sampler override on the command line equals the keyword argument
    result = CliRunner().invoke(app, ["sample", str(bundle), "-n", "5", "--seed", "3", "-o", str(tmp_path / "cli1"),
                                      "steps=1", "min_steps=1"])
    assert result.exit_code == 0, result.output
    for im, f in zip(other, sorted((tmp_path / "cli1").glob("0*.png"))):
        assert np.array_equal(np.asarray(genfw.data.to_pil(im)), np.asarray(Image.open(f)))


def test_inpaint_needs_a_label_for_conditional_models(tmp_path):
    bundle = tiny_bundle(tmp_path / "m.safetensors")
    model = genfw.load(bundle)
    image = torch.zeros(1, 4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2:] = True
    with pytest.raises(ConfigError, match="class-conditional .*--label N"):
        model.inpaint(image, mask)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "img.png")
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    args = ["inpaint", str(bundle), "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"),
            "-n", "2", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "--label N" in result.output and "0=a, 1=b, 2=c" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, [*args, "--label", "1"])
    assert result.exit_code == 0, result.output
    assert "class 1 (b)" in result.output
    done = [np.asarray(Image.open(tmp_path / "out" / f"{i:03d}.png")) for i in range(2)]
    assert all((d[:2] == 0).all() for d in done)  # the known top half is kept
    unconditional = genfw.load(tiny_bundle(tmp_path / "u.safetensors", num_classes=0))
    assert len(unconditional.inpaint(image, mask, n=2)) == 2


def test_load_gives_the_component_of_a_single_model_file(tmp_path):
    prior = build("prior", "sundae", {}, codebook_size=8, grid=[4, 4], num_classes=0, context=[],
                  backbone={"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}})
    genfw.save(tmp_path / "p.safetensors", prior)
    assert genfw.load(tmp_path / "p.safetensors").kind == "prior"
