"""The plugin contract authors rely on: versioned (genfw.PLUGIN_API, CHANGELOG.md), stricter rules
warn for one minor version before they fail, the previous release's documented plugins still pass,
unknown kinds and broken plugins are named precisely, every component's params can be listed."""

import re
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import genfw
from genfw.cli import app
from genfw.errors import PluginError
from genfw.hookspecs import hookimpl
from genfw.interfaces import Backbone, Params
from genfw.registry import ComponentClash, Registry, get_registry, reset_registry
from genfw.testing import RULES, ConformanceWarning, check_backbone, check_converter

ROOT = Path(__file__).parents[1]
# docs/writing-plugins.md as released at plugin API 1.0 (commit e513cae), unchanged
PREVIOUS = (Path(__file__).parent / "fixtures" / "writing-plugins-0.1.0.md").read_text()
runner = CliRunner()


def _distribution(root: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[genfw]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


#: genfw's own plugins (entry points), from pyproject.toml
BUILTIN_PLUGINS = list(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
                       ["project"]["entry-points"]["genfw"])

@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for throwaway distributions; ``use(*dists)`` rediscovers with them allowed."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)

    def use(*dists: str, include_genfw: bool = True) -> Registry:
        monkeypatch.setenv("GENFW_PLUGINS", ",".join(["genfw", *dists] if include_genfw else dists))
        reset_registry()
        return get_registry()

    yield root, use
    reset_registry()
    for name in set(sys.modules) - before:
        if name.startswith(("genfw_example", "genfw_widgets", "genfw_future", "genfw_lazy", "genfw_missing")):
            del sys.modules[name]


def _install_previous_example(root: Path) -> str:
    """The previous release's example package, from its page, as pip would install it."""
    pyproject = tomllib.loads(next(b for b in re.findall(r"```toml\n(.*?)```", PREVIOUS, flags=re.S)
                                   if "[build-system]" in b))
    (root / "genfw_example").mkdir()
    (root / "genfw_example" / "__init__.py").write_text("")
    for block in re.findall(r"```python\n(.*?)```", PREVIOUS, flags=re.S):
        if block.startswith("# genfw_example/"):
            (root / block.splitlines()[0][2:].strip()).write_text(block)
    project = pyproject["project"]
    _distribution(root, project["name"], project["version"], project["entry-points"]["genfw"])
    return project["name"]


# --------------------------------------------------------------------------------------------
# the previous release's plugins


def test_previous_release_example_plugins_still_pass(site):
    root, use = site
    example = _install_previous_example(root)
    # genfw's own `maskgit` (plugin API 1.1) takes the name the 0.1.0 example used: a clash that
    # says what to do, and with genfw's maskgit left out the example works unchanged
    clash = use(example)
    with pytest.raises(ComponentClash, match=r"rename yours, or leave genfw's own plugin 'maskgit' out with GENFW_PLUGINS"):
        clash.get("prior", "maskgit")
    use(example, *(p for p in BUILTIN_PLUGINS if p != "maskgit"), include_genfw=False)
    checks = [b for b in re.findall(r"```python\n(.*?)```", PREVIOUS, flags=re.S) if b.startswith("from genfw.testing")]
    assert len(checks) >= 4
    for block in checks:  # warnings (a rule on its way to becoming an error) are allowed
        namespace: dict = {}
        exec(compile(block, "writing-plugins-0.1.0.md", "exec"), namespace)  # noqa: S102 - the page's test code
        (test,) = [f for name, f in namespace.items() if name.startswith("test_")]
        test()
    # its converter (no Params: the previous contract had none) passes check_converter
    mixer = genfw.build("backbone", "mixer", {"dim": 8, "depth": 2}, vocab_size=7, out_size=6, grid=[3, 3]).eval()
    theirs = {}
    for k, v in mixer.state_dict().items():
        k = {"embed.tokens.weight": "tok_emb"}.get(k, k).replace("head.", "out.")
        theirs[k.replace(".0.", ".norm.").replace(".1.", ".fc.")] = v.clone()
    save_file(theirs, root / "theirs.safetensors")
    tokens = torch.randint(0, 7, (2, 3, 3))
    with torch.no_grad():
        expected = mixer(tokens)
    check_converter("mixer", root / "theirs.safetensors", options={"resolution": 3}, inputs=tokens, reference=expected)
    assert runner.invoke(app, ["plugins", "--check"]).exit_code == 0
    shown = runner.invoke(app, ["plugins", "--params", "converter:mixer"])
    assert shown.exit_code == 0 and "not declared" in shown.stdout and "--resolution" in shown.stdout


# --------------------------------------------------------------------------------------------
# a stricter rule: a warning for one minor version, then an error


class LocalConv(Backbone):
    """A ConvMixer-like backbone: bidirectional, but its receptive field is 1 + depth * (kernel - 1)."""

    uses_labels = uses_context = False

    class Params(Params):
        depth: int = Field(2, ge=1)
        kernel: int = Field(3, ge=1)

    def __init__(self, params=None, **construct):
        super().__init__(params, **construct)
        self.embed = nn.Embedding(self.vocab_size, 8)
        k = self.params.kernel
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, k, padding=k // 2) for _ in range(self.params.depth))
        self.head = nn.Linear(8, self.out_size)

    def forward(self, tokens, labels=None, context=None, causal=False):
        x = self.embed(tokens).permute(0, 3, 1, 2)  # b d h w
        for conv in self.convs:
            x = x + torch.tanh(conv(x))
        return self.head(x.permute(0, 2, 3, 1))  # b h w out


def test_a_stricter_rule_warns_before_it_fails(monkeypatch):
    message = ("position (0, 0) never sees position (3, 3) on a 4x4 grid: priors that denoise the whole grid "
               "need a global receptive field")
    assert genfw.PLUGIN_API == "1.1"
    with pytest.warns(ConformanceWarning, match=re.escape(message)) as caught:
        check_backbone(LocalConv, {"depth": 2, "kernel": 3})
    text = str(caught[0].message)
    assert "grid=(3, 3)" in text and "global-receptive-field" in text and "an error from 1.2" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_backbone(LocalConv, {"depth": 2, "kernel": 3}, grid=(3, 3))  # the grid it spans: no warning
    monkeypatch.setattr(genfw, "PLUGIN_API", "1.2")
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_backbone(LocalConv, {"depth": 2, "kernel": 3})
    # a position-wise network is not bidirectional at all: an error under every plugin API
    monkeypatch.setattr(genfw, "PLUGIN_API", "1.1")
    with pytest.raises(AssertionError, match="must be bidirectional"):
        check_backbone(LocalConv, {"depth": 1, "kernel": 1})


def test_rules_follow_the_policy_and_are_in_the_changelog():
    from packaging.version import Version

    changelog = (ROOT / "CHANGELOG.md").read_text()
    for rule in RULES.values():
        warn, error = Version(rule.warn_from), Version(rule.error_from)
        assert (error.major, error.minor) == (warn.major, warn.minor + 1), rule
        assert Version(genfw.PLUGIN_API) >= warn
        assert f"`{rule.name}`" in changelog, f"CHANGELOG.md does not announce rule {rule.name}"
    assert f"plugin API {genfw.PLUGIN_API}" in changelog
    assert "CHANGELOG.md" in (ROOT / "docs" / "writing-plugins.md").read_text()


# --------------------------------------------------------------------------------------------
# plugin API ranges and registry strictness


def _plugin_module(root: Path, module: str, body: str, dist: str, ep: str) -> None:
    (root / f"{module}.py").write_text(body)
    _distribution(root, dist, "1.0", {ep: module})


REGISTER = "from genfw import hookimpl\n{head}\n@hookimpl\ndef genfw_register(registry):\n{body}"


def test_plugins_declare_the_plugin_api_they_support(site):
    root, use = site
    ok = "    registry.register('backbone', 'future-ok', 'genfw_future_ok:X')\n"
    _plugin_module(root, "genfw_future_ok", REGISTER.format(head="GENFW_PLUGIN_API = '>=1.0,<2'\n", body=ok),
                   "genfw-future-ok", "future-ok")
    late = "    registry.register('backbone', 'future', 'genfw_future:X')\n"
    _plugin_module(root, "genfw_future", REGISTER.format(head="GENFW_PLUGIN_API = '>=2.0'\n", body=late),
                   "genfw-future", "future")
    registry = use("genfw-future-ok", "genfw-future")
    assert "future-ok" in registry.names("backbone") and "future" not in registry.names("backbone")
    check = runner.invoke(app, ["plugins", "--check"])
    assert check.exit_code == 1
    (line,) = [ln for ln in check.stderr.splitlines() if "genfw-future " in ln]
    assert "entry point future = genfw_future" in line
    assert "supports genfw plugin API >=2.0, but this genfw provides 1.1" in line
    from genfw.registry import api_problem

    assert "not a version range like '>=1.0,<2'" in api_problem("one point one", "plugin 'x'")
    assert api_problem(None, "plugin 'x'") is None and api_problem("~=1.0", "plugin 'x'") is None


def test_unknown_kinds_are_refused_at_registration(site):
    root, use = site

    class Widgets:
        @hookimpl
        def genfw_register(self, registry):
            registry.register("prior", "fine", LocalConv)
            registry.register("widget", "w", LocalConv)

    registry = Registry()
    with pytest.raises(PluginError, match="registers 'w' as kind 'widget', which genfw does not know"):
        registry.add_plugin(Widgets(), name="widgets")
    assert registry.entries() == []  # all or nothing
    from genfw.plugincheck import check_entries
    from genfw.registry import Entry

    registry._add(Entry("widget", "w", LocalConv, "", "direct", "genfw-direct", "1.0"))  # bypassing register()
    assert any("genfw knows no kind 'widget'" in p for p in check_entries(registry))
    body = "    registry.register('backbone', 'ok', 'genfw_widgets:X')\n    registry.register('widget', 'w', 'genfw_widgets:X')\n"
    _plugin_module(root, "genfw_widgets", REGISTER.format(head="", body=body), "genfw-widgets", "widgets")
    use("genfw-widgets")
    check = runner.invoke(app, ["plugins", "--check"])
    assert check.exit_code == 1
    (line,) = [ln for ln in check.stderr.splitlines() if "genfw-widgets" in ln]
    assert "entry point widgets = genfw_widgets" in line and "kind 'widget'" in line
    assert f"{root / 'genfw_widgets.py'}:6)" in line and "importlib" not in line


def test_check_names_the_plugin_file_never_importlib(site):
    root, use = site
    _plugin_module(root, "genfw_lazy", REGISTER.format(head="", body="    registry.register('prior', 'lazy', "
                                                       "'genfw_lazy_impl:Prior')\n"), "genfw-lazy", "lazy")
    (root / "genfw_lazy_impl.py").write_text("import math\n\nimport genfw_not_installed_anywhere  # noqa\n")
    _distribution(root, "genfw-missing", "1.0", {"missing": "genfw_missing_module"})
    use("genfw-lazy", "genfw-missing")
    check = runner.invoke(app, ["plugins", "--check"])
    assert check.exit_code == 1 and "<frozen" not in check.stderr and "importlib" not in check.stderr
    lazy = next(ln for ln in check.stderr.splitlines() if "genfw_lazy_impl:Prior" in ln)
    assert f"{root / 'genfw_lazy_impl.py'}:3)" in lazy and "plugin 'lazy'" in lazy
    missing = next(ln for ln in check.stderr.splitlines() if "genfw-missing" in ln)
    assert "entry point missing = genfw_missing_module" in missing and "No module named" in missing


# --------------------------------------------------------------------------------------------
# every component's params; converters listed wherever components are


def test_plugins_params_works_for_every_registered_component(site):
    root, use = site
    registry = use(_install_previous_example(root))  # a third-party converter without Params included
    entries = registry.entries()
    assert {e.kind for e in entries} >= {"tokenizer", "backbone", "prior", "dataset", "logger", "converter"}
    for e in entries:
        result = runner.invoke(app, ["plugins", "--params", f"{e.kind}:{e.name}"])
        assert result.exit_code == 0, (e.kind, e.name, result.output)
        assert f"{e.kind} '{e.name}'" in " ".join(result.stdout.split()), (e.kind, e.name, result.stdout)
    taming = runner.invoke(app, ["plugins", "--params", "taming"])
    assert "perceptual_weight" in taming.stdout and "--resolution, --set" in taming.stdout


def test_convert_lists_converters_and_checks_the_name_first(site, tmp_path):
    root, use = site
    example = _install_previous_example(root)
    # genfw's own `maskgit` (plugin API 1.1) takes the name the 0.1.0 example used: a clash that
    # says what to do, and with genfw's maskgit left out the example works unchanged
    clash = use(example)
    with pytest.raises(ComponentClash, match=r"rename yours, or leave genfw's own plugin 'maskgit' out with GENFW_PLUGINS"):
        clash.get("prior", "maskgit")
    use(example, *(p for p in BUILTIN_PLUGINS if p != "maskgit"), include_genfw=False)
    shown = runner.invoke(app, ["convert", "--help"], terminal_width=200)
    assert shown.exit_code == 0
    flat = " ".join(shown.stdout.split())
    for name in ("mixer", "taming", "unleashing-vqgan", "vqvae2", "sundae"):
        assert re.search(rf"\b{re.escape(name)}\b", flat), name
    listing = runner.invoke(app, ["plugins", "--json"])
    assert {"kind": "converter", "name": "mixer"}.items() <= next(
        c for c in __import__("json").loads(listing.stdout)["components"]
        if c["kind"] == "converter" and c["name"] == "mixer").items()
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"mine")
    wrong = runner.invoke(app, ["convert", "nope", str(existing), "-o", str(existing)])
    assert wrong.exit_code == 1 and "unknown converter 'nope'" in wrong.stderr and "exists" not in wrong.stderr
    assert existing.read_bytes() == b"mine"


# --------------------------------------------------------------------------------------------
# a dataset whose data is absent: its DataError, and nothing else


class Absent(genfw.ImageDataset):
    """A plugin dataset as docs/writing-plugins.md describes it: cheap to build, DataError when read."""

    class Params(Params):
        root: str = "/nowhere/absent-data"

    channels, resolution = 1, (4, 4)

    @property
    def class_names(self):
        return ["a", "b"]

    def __len__(self):
        raise genfw.errors.DataError(f"absent-data not found at {self.params.root}: download it with absent-fetch")

    def __getitem__(self, index):
        len(self)


def test_absent_data_is_the_only_thing_reported(tmp_path, monkeypatch):
    """Without its data a labelled dataset's fidelity extractor is unknown: no Inception line beside the data's."""
    import yaml
    from helpers import TINY_RECIPE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no Inception weights either

    class Plugin:
        @hookimpl
        def genfw_register(self, registry):
            registry.register("dataset", "absent", Absent)

    registry = get_registry()
    registry.add_plugin(Plugin(), name="absent-test")
    try:
        recipe = {**TINY_RECIPE, "data": {"name": "absent"}, "evaluate": {"metrics": ["fidelity"]}}
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = runner.invoke(app, ["run", str(path), "-o", str(tmp_path / "out"), "--dry-run"])
    finally:
        registry.remove_plugin("absent-test")
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "absent-data not found at /nowhere/absent-data: download it with absent-fetch" in errors[0]
    assert "Inception" not in result.output


# --------------------------------------------------------------------------------------------
# docs generated from the code


def test_weight_names_page_is_generated_from_the_models():
    import importlib.util

    spec = importlib.util.spec_from_file_location("weight_names", ROOT / "docs" / "tools" / "weight_names.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    covered = {(kind, name) for kind, name, _, _ in tool.MODELS} | {("tokenizer", n) for n in tool.WITHOUT_WEIGHTS}
    builtins = {(e.kind, e.name) for e in get_registry().entries() if e.dist == "genfw"
                and e.kind in ("tokenizer", "backbone", "prior")}
    assert builtins <= covered, f"add {sorted(builtins - covered)} to docs/tools/weight_names.py"
    assert (ROOT / "docs" / "weight-names.md").read_text() == tool.render(), \
        "docs/weight-names.md is out of date: python docs/tools/weight_names.py > docs/weight-names.md"
