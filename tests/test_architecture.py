"""The architecture is checked, not hoped for: declared layers (import-linter contracts in
pyproject.toml), no import cycle, small modules, and late imports that say why they are late.

docs/architecture.md draws the same layers; a test below checks the two agree.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genfw"
MAX_LINES = 500
LINT_IMPORTS = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _lint(source_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package at ``source_root``/genfw with the repository's contracts."""
    return _lint_at(source_root, ROOT / "plugins")


def _lint_at(source_root: Path, plugins: Path) -> subprocess.CompletedProcess:
    if source_root != ROOT:
        shutil.copy(ROOT / "pyproject.toml", source_root / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source_root), str(plugins)])}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=source_root, env=env, capture_output=True, text=True,
                          timeout=120)


needs_linter = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (pip install -e '.[dev]')")


@needs_linter
def test_the_layer_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout or "broken" not in result.stdout.split("Contracts:")[-1], result.stdout


@needs_linter
@pytest.mark.parametrize("importer, imported", [
    ("config.recipe", "from genfw import pipeline"),  # a recipe schema reaching up to the pipeline
    ("errors", "import genfw.cli"),  # the bottom reaching the top
    ("interfaces", "from genfw.data import ImageFolder"),  # kinds reaching an implementation
])
def test_an_upward_import_breaks_the_contracts(tmp_path, importer, imported):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "genfw", ignore=shutil.ignore_patterns("__pycache__"))
    module = copy / "genfw" / (importer.replace(".", "/") + ".py")
    module.write_text(module.read_text() + f"\n\ndef _upward():\n    {imported}  # late: deliberately upward\n")
    result = _lint(copy)
    assert result.returncode != 0, result.stdout
    layer = importer.split(".")[0]
    assert f"genfw.{layer} is not allowed to import" in result.stdout, result.stdout[-3000:]
    assert f"genfw.{importer} -> " in result.stdout, result.stdout[-3000:]


@needs_linter
def test_a_plugin_importing_an_internal_module_breaks_the_contracts(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "genfw", ignore=shutil.ignore_patterns("__pycache__"))
    plugins = tmp_path / "plugins"
    shutil.copytree(ROOT / "plugins", plugins, ignore=shutil.ignore_patterns("__pycache__"))
    target = plugins / "genfw_sundae" / "sundae.py"
    target.write_text(target.read_text() + "\n\nfrom genfw.pipeline import Run  # noqa: E402 - deliberately internal\n")
    result = _lint_at(copy, plugins)
    assert result.returncode != 0, result.stdout
    assert "genfw_sundae is not allowed to import genfw.pipeline" in result.stdout, result.stdout[-3000:]
    assert "genfw_sundae.sundae -> genfw.pipeline" in result.stdout


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported genfw module, statement, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in tree.body:  # imports under a module-level if/try also run at import
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    modules = _modules()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target in modules and target not in (name, "genfw"):
                found.append((target, node, id(node) in top))
    return found


def test_no_import_cycle_between_modules():
    """Every import counts, also one inside a function: a late import hides a cycle, it does not break it."""
    graph = {name: {t for t, _, _ in _imports(name, path)} for name, path in _modules().items()}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other (one late) are a cycle."""
    package = tmp_path / "genfw"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from genfw import b\n")
    (package / "b.py").write_text("def f():\n    from genfw.a import g  # late\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"\['genfw.a', 'genfw.b'\]"):
        test_no_import_cycle_between_modules()


def test_late_imports_say_why():
    """A function-level import of a genfw module is kept only with a reason: ``# late: ...``."""
    unexplained = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for target, node, at_top in _imports(name, path):
            if at_top:
                continue
            text = " ".join(lines[node.lineno - 2: node.end_lineno])  # the comment may stand on the line above
            if "# late:" not in text:
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert unexplained == [], "late imports without a `# late: reason` comment:\n" + "\n".join(unexplained)


def test_no_source_file_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"files over {MAX_LINES} lines: {long}"


def test_every_module_is_public_or_forbidden_to_plugins():
    """A new module must be classified: public (plugins may import it) or in the public-core contract."""
    contract = next(c for c in _config()["contracts"] if c["id"] == "public-core")
    forbidden = set(contract["forbidden_modules"])
    public = {"genfw." + m.strip() for m in contract["name"].split("(")[1].rstrip(")").split(",")}
    top_level = {".".join(n.split(".")[:2]) for n in _modules() if n != "genfw"}
    assert top_level - public - forbidden == set(), "unclassified modules"
    assert forbidden <= top_level, f"contract names modules that do not exist: {forbidden - top_level}"
    assert not forbidden & public


def test_the_layers_name_every_module_once():
    contract = next(c for c in _config()["contracts"] if c["id"] == "layers")
    named = [m.strip() for layer in contract["layers"] for m in layer.replace("|", ":").split(":")]
    top_level = sorted({n.split(".")[1] for n in _modules() if n != "genfw"})
    assert sorted(named) == top_level


def test_docs_architecture_draws_the_same_layers():
    """docs/architecture.md's layer table is the contract's list, in the same order."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \|", text, flags=re.M)
    documented = [" ".join(layer.replace("\\|", "|").split()) for _, layer in rows]
    contract = next(c for c in _config()["contracts"] if c["id"] == "layers")
    assert documented == [" ".join(layer.split()) for layer in contract["layers"]]
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1))


def test_commands_do_not_load_the_metrics_until_they_evaluate():
    """Every command imports genfw.api and genfw.pipeline; torch-fidelity (~1 s) waits until evaluation."""
    code = ("import sys, genfw.api, genfw.pipeline, genfw.preflight, genfw.report; "
            "print(sorted(m for m in ('torch_fidelity', 'genfw.metrics', 'genfw.evaluate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
