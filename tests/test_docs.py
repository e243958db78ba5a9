"""docs/writing-plugins.md is real: its example package installs (a ``.dist-info`` on sys.path),
every component passes the check the page shows, the converter converts, the page's mini-maskgit
command runs verbatim; and the installed plugin shows nested provenance, clash and
failed-import messages and ``genfw plugins --check``."""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import genfw
from genfw.cli import app
from genfw.registry import reset_registry

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "writing-plugins.md"
TEXT = DOC.read_text()
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
FILES = {b.splitlines()[0][2:].strip(): b for b in PYTHON if b.startswith("# genfw_example/")}
CHECKS = [b for b in PYTHON if re.search(r"^from genfw.testing import", b, flags=re.M) and not b.startswith("#")]


def _distribution(root: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[genfw]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The page's package, installed as pip would (module files plus a .dist-info from its pyproject)."""
    pyproject = tomllib.loads(next(b for b in re.findall(r"```toml\n(.*?)```", TEXT, flags=re.S) if "[build-system]" in b))
    assert pyproject["build-system"]["build-backend"]
    project = pyproject["project"]
    site = tmp_path / "site"
    (site / "genfw_example").mkdir(parents=True)
    (site / "genfw_example" / "__init__.py").write_text("")
    for rel, source in FILES.items():
        (site / rel).write_text(source)
    _distribution(site, project["name"], project["version"], project["entry-points"]["genfw"])
    monkeypatch.syspath_prepend(str(site))
    allow = ["genfw", project["name"]]

    def use(*extra: str, example: bool = True) -> None:
        monkeypatch.setenv("GENFW_PLUGINS", ",".join([*(allow if example else allow[:1]), *extra]))
        reset_registry()

    use()
    yield use, tmp_path
    reset_registry()
    for name in [m for m in sys.modules if m.startswith("genfw_example") or m.startswith("genfw_broken")]:
        del sys.modules[name]


def test_the_page_has_an_example_and_a_check_for_every_kind():
    assert set(FILES) >= {f"genfw_example/{m}.py" for m in ("plugin", "tokenizer", "backbone", "mini_maskgit",
                                                             "dataset", "convert")}
    assert {re.search(r"import (check_\w+)", c).group(1) for c in CHECKS} >= {
        "check_tokenizer", "check_backbone", "check_prior", "check_dataset", "check_converter"}


def test_every_example_passes_its_check(installed):
    for block in CHECKS:
        namespace: dict = {}
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the page's own test code
        tests = [f for name, f in namespace.items() if name.startswith("test_")]
        assert len(tests) == 1
        tests[0]()


def test_the_converter_example_converts(installed):
    _, tmp = installed
    mixer = genfw.build("backbone", "mixer", {"dim": 8, "depth": 2}, vocab_size=7, out_size=6, grid=[3, 3])
    theirs = {}
    for k, v in mixer.state_dict().items():  # the names the outside code used
        k = {"embed.tokens.weight": "tok_emb"}.get(k, k).replace("head.", "out.")
        theirs[k.replace(".0.", ".norm.").replace(".1.", ".fc.")] = v.clone()
    save_file(theirs, tmp / "theirs.safetensors")
    runner = CliRunner()
    missing = runner.invoke(app, ["convert", "mixer", str(tmp / "theirs.safetensors"), "-o", str(tmp / "m.safetensors")])
    assert missing.exit_code == 1 and "pass --resolution" in missing.output
    result = runner.invoke(app, ["convert", "mixer", str(tmp / "theirs.safetensors"), "-o", str(tmp / "m.safetensors"),
                                 "--resolution", "3"])
    assert result.exit_code == 0, result.output
    loaded = genfw.load(tmp / "m.safetensors")
    tokens = torch.randint(0, 7, (2, 3, 3))
    mixer.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), mixer(tokens))


def test_the_mini_maskgit_command_runs_verbatim(installed, monkeypatch):
    _, tmp = installed
    line = next(x for x in TEXT.splitlines() if x.startswith("genfw run") and "prior.name=mini-maskgit" in x)
    argv = shlex.split(line)[1:]
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, [*argv, "--dry-run", "--output-dir", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    assert "mini-maskgit /" in result.stdout and "hourglass" in result.stdout  # the cell wraps at 80 columns
    assert "drops the params of 'sundae' (label_drop, unroll_steps)" in result.stderr


def test_installed_plugin_provenance_clash_broken_and_check(installed):
    use, tmp = installed
    runner = CliRunner()
    ok = runner.invoke(app, ["plugins", "--check"])
    assert ok.exit_code == 0, ok.output
    # a genfw prior over the plugin's backbone: the file credits the plugin for the backbone
    prior = genfw.build("prior", "sundae", {"unroll_steps": 2}, codebook_size=5, grid=[2, 2],
                        backbone={"name": "mixer", "params": {"dim": 8, "depth": 1}})
    path = tmp / "prior.safetensors"
    genfw.save(path, prior)
    shown = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    (nested,) = shown["components"][0]["nested"]
    assert (nested["name"], nested["dist"], nested["version"]) == ("mixer", "genfw-example", "0.1.0")

    # uninstalled: the nested plugin is named
    use(example=False)
    gone = runner.invoke(app, ["sample", str(path)])
    assert gone.exit_code == 1
    assert ("needs backbone 'mixer' from the distribution 'genfw-example' (version 0.1.0), which is not installed: "
            "pip install genfw-example") in gone.stderr

    # a second distribution registering the same names: a clash, not "not installed"
    fork = tmp / "fork"
    fork.mkdir()
    (fork / "genfw_example_fork.py").write_text(FILES["genfw_example/plugin.py"])
    _distribution(fork, "genfw-example-fork", "1.0", {"example-fork": "genfw_example_fork"})
    sys.path.insert(0, str(fork))
    try:
        use("genfw-example-fork")
        clash = runner.invoke(app, ["sample", str(path)])
        assert clash.exit_code == 1 and "not installed" not in clash.stderr
        assert "needs backbone 'mixer', but backbone 'mixer' is registered by both genfw-example 0.1.0" in clash.stderr
        assert "genfw-example-fork 1.0" in clash.stderr
        check = runner.invoke(app, ["plugins", "--check"])
        assert check.exit_code == 1 and "registered by both" in check.stderr
    finally:
        sys.path.remove(str(fork))
        sys.modules.pop("genfw_example_fork", None)

    # a plugin that fails to import, and one with a typo in a lazy target
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "genfw_broken.py").write_text("raise RuntimeError('boom at import')\n")
    _distribution(broken, "genfw-broken", "2.0", {"broken": "genfw_broken"})
    (broken / "genfw_broken_typo.py").write_text(
        "from genfw import hookimpl\n\n@hookimpl\ndef genfw_register(registry):\n"
        "    registry.register('prior', 'typo', 'genfw_example.mini_maskgt:MiniMaskGIT')\n")
    _distribution(broken, "genfw-broken-typo", "3.0", {"typo": "genfw_broken_typo"})
    sys.path.insert(0, str(broken))
    try:
        use("genfw-broken", "genfw-broken-typo")
        check = runner.invoke(app, ["plugins", "--check"])
        assert check.exit_code == 1
        assert "boom at import" in check.stderr and "failed to import genfw_example.mini_maskgt:MiniMaskGIT" in check.stderr
        recipe = tmp / "r.yaml"
        body = ("name: r\ndata: {name: stripes, params: {size: 4, resolution: 8}}\n"
                "tokenizer: {name: patches, params: {factor: 2, levels: 4}}\n"
                "prior: {name: mini-maskgit, backbone: {name: mixer, params: {dim: 8, depth: 1}}}\n"
                # 4 images leave no held-out references for fidelity metrics (refused before work)
                "evaluate: {metrics: [reconstruction, nll]}\n")
        recipe.write_text(body + "plugins: {genfw-broken: '>=1'}\n")
        pinned = runner.invoke(app, ["validate", str(recipe)])
        assert pinned.exit_code == 2
        assert "needs plugin distribution 'genfw-broken' >=1, which is installed but failed to load" in pinned.stderr
        assert "boom at import" in pinned.stderr
        recipe.write_text(body)
        use("genfw-broken", "genfw-broken-typo")  # a fresh process's discovery
        run = runner.invoke(app, ["run", str(recipe), "--dry-run", "--output-dir", str(tmp / "run")])
        assert run.exit_code == 0, run.output
        assert run.stderr.count("warning:") == 1 and "boom at import" in run.stderr
    finally:
        sys.path.remove(str(broken))
        for m in ("genfw_broken", "genfw_broken_typo"):
            sys.modules.pop(m, None)


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comparison_page_numbers_are_recomputed_from_its_csv():
    """docs/comparison-round1.md quotes what benchmarks/comparison_round1.py computes from the committed CSV."""
    root = Path(__file__).resolve().parents[1]
    module = _benchmark("comparison_round1")
    page = (root / "docs" / "comparison-round1.md").read_text()
    rows = module.load()
    claim = module.proportion_claim(rows)
    assert [r["steps"] for r in claim] == [8, 16, 32]
    for r in claim:
        diffs = ", ".join(str(d).replace("-", "−") for d in r["differences"])
        line = (f"| {r['steps']} | {diffs} | {r['paired_t_p']:.3f} | {r['sign_flip_p']:.3f} | "
                f"{r['holm_p']:.3f} |")
        assert line in page, line
    # two pairs: the exact sign-flip test can never reject, as the page says
    assert min(r["sign_flip_p"] for r in claim) == 0.5
    t4 = module.table4(rows)
    assert f"the bound is {t4['difference']:.3f} above" in page
    assert f"Welch p = {t4['welch_p']:.3f}" in page
    # per-seed values only: no "±" interval in any table (the text quotes round 1's impossible ones)
    assert not [line for line in page.splitlines() if line.startswith("|") and "±" in line]


def test_study_page_tables_are_the_output_of_the_tables_command():
    """docs/comparison.md's results are exactly what `study_mnist.py tables` computes from docs/data."""
    root = Path(__file__).resolve().parents[1]
    module = _benchmark("study_mnist")
    page = (root / "docs" / "comparison.md").read_text()
    start = page.index("<!-- study tables")
    block = page[page.index("\n", start) + 1: page.index("<!-- end of study tables -->")]
    assert block.strip() == module.tables(root / "docs" / "data").strip()
    assert "±" not in block  # intervals are [low, high] inside the metric's range, never mean ± t
