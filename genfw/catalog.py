"""The recipes shipped with genfw: listing, copying, and resolving a bare name like ``quickstart``.

The repository's ``recipes/`` folder is the one source. ``genfw/recipes`` is a symlink to it, so
setuptools finds it as a package and the wheel carries every recipe as package data at
``genfw/recipes/`` (pyproject.toml lists the file patterns); a source checkout or an editable
install reads the same files through the link (or the repository folder, where a checkout has
no symlinks). So ``recipes/quickstart.yaml`` keeps working from a clone, and
``genfw run quickstart`` works from ``pip install genfw`` alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from genfw import io
from genfw.errors import ConfigError
from genfw.rundir import check_write_target

_PACKAGE = Path(__file__).resolve().parent


def recipes_root() -> Path:
    """The folder holding the shipped recipes: inside the installed package, else the repository's."""
    for candidate in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate.resolve()
    raise ConfigError("genfw's recipes are not installed (no genfw/recipes/ folder): reinstall genfw")


@dataclass
class RecipeInfo:
    name: str  # what `genfw run NAME` accepts: the path below the recipes folder, without .yaml
    path: Path
    description: str  # first line of the file's opening comment that is not the command


def _describe(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#"):
            break
        if text and not text.startswith("genfw "):
            return text
    return ""


def list_recipes() -> list[RecipeInfo]:
    """Every shipped recipe and ablation file, sorted by name."""
    root = recipes_root()
    out = []
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        out.append(RecipeInfo(name, path, _describe(path)))
    return out


def find_recipe(name: str) -> Path | None:
    """The shipped recipe called ``name`` (``quickstart``, ``ablations/priors``; ``.yaml`` optional)."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    stem = stem.removeprefix("recipes/")
    for info in list_recipes():
        if info.name == stem:
            return info.path
    return None


def resolve(recipe: str) -> str:
    """A recipe argument -> a path: an existing file or URL as given, else a shipped recipe's name.

    A local file always wins, so a user's ``quickstart.yaml`` in the working folder is never
    shadowed by the packaged one.
    """
    if "://" in recipe or os.path.exists(recipe):
        return recipe
    found = find_recipe(recipe)
    if found is not None:
        return str(found)
    if os.sep in recipe or recipe.endswith((".yaml", ".yml")):
        return recipe  # the loader then says "recipe not found: PATH"
    names = ", ".join(i.name for i in list_recipes() if "/" not in i.name)
    raise ConfigError(f"recipe not found: '{recipe}' is neither a file nor a shipped recipe "
                      f"(genfw recipes list): {names}")


def copy_recipe(name: str, target: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Copy a shipped recipe to ``target`` (a folder or a .yaml path; default: the working folder).

    An existing file is never overwritten without ``force``. An ablation's ``base:`` recipe is
    copied beside it too (as torchtune's ``tune cp`` copies one config; an ablation needs both).
    """
    source = find_recipe(name)
    if source is None:
        raise ConfigError(f"no shipped recipe named '{name}': see genfw recipes list")
    target_path = Path(target) if target is not None else Path(".")
    if target_path.suffix not in (".yaml", ".yml"):
        target_path = target_path / source.name
    files = [(source, target_path)]
    base = (yaml.safe_load(source.read_text(encoding="utf-8")) or {}).get("base")
    if isinstance(base, str) and ".." not in Path(base).parts and not Path(base).is_absolute():
        base_source = (source.parent / base).resolve()
        if base_source.is_file():
            files.append((base_source, (target_path.parent / base).resolve()))

    for _, dst in files:
        check_write_target(dst, force, "recipe")
    for src, dst in files:
        io.write_bytes(dst, src.read_bytes())  # atomic, and never through a link
    return target_path
