"""Plugin discovery: third-party distributions, broken plugins, name clashes, the allowlist."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from genfw.errors import PluginError
from genfw.hookspecs import hookimpl
from genfw.registry import Registry

FIXTURE = Path(__file__).parent / "fixtures" / "fake_plugin.py"


def make_distribution(root: Path, dist: str, module: str, source: str, ep_name: str, version: str = "1.0") -> None:
    """A minimal installed distribution: a module plus ``*.dist-info`` with a genfw entry point."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[genfw]\n{ep_name} = {module}\n")


def run_cli(args, extra_path: Path, allow: str = "*") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(extra_path), "GENFW_PLUGINS": allow, "GENFW_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "genfw", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    make_distribution(root, "genfw-thresholds", "genfw_thresholds", FIXTURE.read_text(), "thresholds")
    return root


def test_third_party_distribution_is_discovered_and_usable_in_recipes(site, tmp_path):
    result = run_cli(["plugins", "--json"], site, allow="genfw,genfw-thresholds")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    mine = [c for c in listing["components"] if c["name"] == "thresholds"]
    assert mine == [{"kind": "tokenizer", "name": "thresholds", "distribution": "genfw-thresholds",
                     "version": "1.0", "plugin": "thresholds",
                     "description": "Toy tokenizer from a third-party plugin"}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""
        name: third-party
        data: {name: synthetic, params: {resolution: 8, size: 16}}
        tokenizer: {name: thresholds, params: {offset: 0.5}}
        prior:
          name: sundae
          backbone: {name: transformer, params: {dim: 16, depth: 1, heads: 2}}
    """))
    ok = run_cli(["validate", str(recipe)], site, allow="genfw,genfw-thresholds")
    assert ok.returncode == 0, ok.stderr
    typo = run_cli(["validate", str(recipe), "--set", "tokenizer.params.ofset=1"], site, allow="genfw,genfw-thresholds")
    assert typo.returncode == 2 and "tokenizer.params.ofset" in typo.stderr


def test_allowlist_hides_plugins_not_listed(site):
    result = run_cli(["plugins", "--json"], site, allow="genfw")
    names = [c["name"] for c in json.loads(result.stdout)["components"]]
    assert "thresholds" not in names and "pixels" in names


def test_broken_plugin_is_reported_and_others_still_load(site):
    make_distribution(site, "genfw-broken", "genfw_broken", "raise RuntimeError('boom at import')\n", "broken")
    result = run_cli(["plugins", "--json"], site)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert {"thresholds", "pixels"} <= {c["name"] for c in listing["components"]}
    (broken,) = [b for b in listing["broken"] if b["plugin"] == "broken"]
    assert broken["dist"] == "genfw-broken" and "boom at import" in broken["error"]
    table = run_cli(["plugins"], site)
    assert "genfw-broken" in table.stderr and "boom at import" in table.stderr


def test_name_clash_is_an_error_naming_both_distributions(site, tmp_path):
    make_distribution(site, "genfw-thresholds-fork", "genfw_thresholds_fork", FIXTURE.read_text(), "thresholds-fork")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {name: synthetic}\ntokenizer: {name: thresholds}\n"
                      "prior: {name: sundae, backbone: {name: transformer}}\n")
    result = run_cli(["validate", str(recipe)], site)
    assert result.returncode != 0
    assert "genfw-thresholds " in result.stderr and "genfw-thresholds-fork" in result.stderr
    assert "Traceback" not in result.stderr


class _Plugin:
    def __init__(self, name):
        self.name = name

    @hookimpl
    def genfw_register(self, registry):
        registry.register("prior", self.name, "nowhere.module:Nothing", description="first line\nsecond")


def test_in_process_registration_records_provenance_and_clashes():
    registry = Registry()
    registry.add_plugin(_Plugin("alpha"), name="p1", dist="dist-one", version="2.0")
    entry = registry.get("prior", "alpha")
    assert (entry.dist, entry.version, entry.description) == ("dist-one", "2.0", "first line")
    registry.add_plugin(_Plugin("alpha"), name="p2", dist="dist-two", version="3.1")
    with pytest.raises(PluginError, match="dist-one 2.0.*dist-two 3.1"):
        registry.get("prior", "alpha")
    registry.remove_plugin("p2")
    assert registry.get("prior", "alpha").dist == "dist-one"
    with pytest.raises(PluginError, match="failed to import nowhere.module:Nothing"):
        registry.load("prior", "alpha")
    with pytest.raises(PluginError, match="unknown prior 'beta'; registered priors: alpha"):
        registry.get("prior", "beta")


def test_importing_genfw_imports_no_plugin():
    code = ("import sys, genfw, genfw.cli, genfw.config, genfw.checkpoint, genfw.pipeline, genfw.train;"
            "bad = [m for m in sys.modules if m.split('.')[0].startswith('genfw_')]; print(bad); assert not bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_never_imports_plugins_in_source():
    core = Path(__file__).parents[1] / "genfw"
    offenders = [str(p) for p in core.rglob("*.py") if "import genfw_" in p.read_text() or "from genfw_" in p.read_text()]
    assert not offenders
