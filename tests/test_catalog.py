"""Recipes ship inside the wheel; genfw recipes list/copy; a bare name runs a shipped recipe."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools
from packaging.version import Version
from typer.testing import CliRunner

from genfw import catalog
from genfw.cli import app
from genfw.errors import ConfigError

ROOT = Path(__file__).parents[1]
SHIPPED = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.skipif(Version(setuptools.__version__) < Version("70.1") and importlib.util.find_spec("wheel") is None,
                    reason="building a wheel needs setuptools >= 70.1 or the 'wheel' package (in genfw[dev])")
def test_wheel_holds_every_recipe(tmp_path):
    # A copy of the tracked files: the build writes build/ and *.egg-info, never into the checkout.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / f).is_symlink():  # genfw/recipes -> ../recipes
            os.symlink(os.readlink(ROOT / f), src / f)
        elif (ROOT / f).is_file():
            (src / f).write_bytes((ROOT / f).read_bytes())
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PIP_NO_INDEX": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("genfw-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(SHIPPED) >= 15
    for recipe in SHIPPED:
        assert f"genfw/recipes/{recipe}" in names, recipe


def test_list_names_every_shipped_recipe():
    names = {i.name for i in catalog.list_recipes()}
    assert names == {r.removesuffix(".yaml") for r in SHIPPED}
    result = CliRunner().invoke(app, ["recipes", "list"], terminal_width=200)
    assert result.exit_code == 0 and "quickstart" in result.output and "ablations/priors" in result.output
    quick = next(i for i in catalog.list_recipes() if i.name == "quickstart")
    assert quick.description.startswith("The first thing to run")


def test_copy_refuses_to_overwrite(tmp_path):
    result = CliRunner().invoke(app, ["recipes", "copy", "quickstart", str(tmp_path)])
    assert result.exit_code == 0, result.output
    copied = tmp_path / "quickstart.yaml"
    assert copied.read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    copied.write_text("# mine\n")
    again = CliRunner().invoke(app, ["recipes", "copy", "quickstart", str(tmp_path)])
    assert again.exit_code != 0 and "--overwrite" in again.output and copied.read_text() == "# mine\n"
    forced = CliRunner().invoke(app, ["recipes", "copy", "quickstart", str(tmp_path), "--force"])
    assert forced.exit_code == 0 and copied.read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    # an ablation comes with its base recipe
    result = CliRunner().invoke(app, ["recipes", "copy", "ablations/priors", str(tmp_path / "abl")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "abl" / "priors.yaml").exists() and (tmp_path / "abl" / "base_mnist.yaml").exists()
    bad = CliRunner().invoke(app, ["recipes", "copy", "nope"])
    assert bad.exit_code != 0 and "genfw recipes list" in bad.output


def test_a_bare_name_resolves_to_a_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve("quickstart") == str(ROOT / "recipes" / "quickstart.yaml")
    assert catalog.resolve("ablations/priors") == str(ROOT / "recipes" / "ablations" / "priors.yaml")
    (tmp_path / "quickstart").write_text("name: mine\n")  # a local file wins
    assert catalog.resolve("quickstart") == "quickstart"
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe"):
        catalog.resolve("quickstrat")
    result = CliRunner().invoke(app, ["run", "mnist_sundae", "--dry-run", "-o", str(tmp_path / "run"),
                                      "train.prior.steps=1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "plan ->" in result.output and not (tmp_path / "run").exists()
