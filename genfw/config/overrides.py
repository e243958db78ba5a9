"""Reading recipe YAML within genfw's bounds, and ``key=value`` / ``~key`` overrides applied to it."""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

from genfw import io, limits
from genfw.errors import ConfigError

# --------------------------------------------------------------------------------------------
# loading and overrides


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file (local or fsspec URL) into a dict, with clear errors."""
    if io.is_local(path) and os.path.isfile(io.local_path(path)):
        limits.check("recipe_bytes", os.path.getsize(io.local_path(path)), f"recipe {os.fspath(path)}: its size",
                     " bytes")
    try:
        data = io.read_bytes(path)
        limits.check("recipe_bytes", len(data), f"recipe {os.fspath(path)}: its size", " bytes")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {os.fspath(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {os.fspath(path)}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{os.fspath(path)}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{os.fspath(path)}: YAML nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{os.fspath(path)}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    check_expansion(raw, os.fspath(path))
    return raw


def check_expansion(value: Any, where: str) -> int:
    """Count the values of a YAML document with its aliases expanded; refuse cycles and blow-ups.

    PyYAML shares an aliased node instead of copying it, so ten nested aliases of ten items each
    (a "billion laughs") load in microseconds and hang whatever walks them later (fingerprinting,
    JSON). Counting with one memo entry per distinct node costs the document's own size.
    """
    bound = limits.limit("recipe_nodes")
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(x: Any) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        key = id(x)
        if key in memo:
            return memo[key]
        if key in active:
            raise ConfigError(f"{where}: a YAML alias contains itself (a recursive structure): remove it")
        active.add(key)
        total = 1
        for v in x.values() if isinstance(x, dict) else x:
            total += size(v)
            if total > bound:
                raise ConfigError(f"{where}: more than {bound:,} values once YAML aliases are expanded (an alias "
                                  f"bomb?): genfw's limit, raise it with {limits.env_var('recipe_nodes')}=N")
        active.discard(key)
        memo[key] = total
        return total

    try:
        return size(value)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def swap_component(node: Any, key: str, value: Any, path: str, keep: set[str] | None = None) -> str | None:
    """Setting a component's ``name`` to another one drops the old component's ``params``.

    ``node`` is the mapping about to get ``node[key] = value``. Params the old component took
    mean nothing to the new one (``--set prior.name=maskgit`` on a SUNDAE recipe), so they go,
    except keys in ``keep`` (set explicitly by an earlier override of the same command). Returns
    the note to show, or None when nothing was dropped.
    """
    if key != "name" or not isinstance(node, dict) or "name" not in node or node.get("name") == value:
        return None
    params = node.get("params")
    if not isinstance(params, dict) or not params:
        return None
    kept = {k: v for k, v in params.items() if k in (keep or set())}
    dropped = sorted(k for k in params if k not in kept)
    node["params"] = kept
    if not dropped:
        return None
    where = path.rsplit(".", 1)[0]
    return (f"{path}: '{node['name']}' -> '{value}' drops the params of '{node['name']}' "
            f"({', '.join(dropped)}); set {where}.params.KEY=VALUE for '{value}'")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None,
                    notes: list[str] | None = None) -> dict[str, Any]:
    """Apply overrides to a copy of ``raw``, left to right (see docs/recipes.md, "Overrides").

    ``a.b.c=value`` sets a key (the value is parsed as YAML, as in a recipe file); ``~a.b.c``
    deletes one (its default then applies). List items are addressed by index (``levels.0``).
    A new key may be added only inside an existing mapping; validation then rejects keys the
    schema or the component does not know, naming the full path. Replacing a component's name
    drops its old params (:func:`swap_component`); the notes saying so go to ``notes``.
    """
    out = copy.deepcopy(raw)
    explicit: set[tuple[str, ...]] = set()
    for item in overrides or []:
        path, value, delete = parse_override(item)
        keys = path.split(".")
        node: Any = out
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {item}: '{'.'.join(keys[:i])}' is not a mapping")
            if key not in node:
                if delete:
                    raise ConfigError(f"override {item}: '{'.'.join(keys[:i + 1])}' is not in the recipe")
                node[key] = {}
            node = node[key]
        last = keys[-1]
        if delete:
            if isinstance(node, dict) and last in node:
                del node[last]
            elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
                del node[int(last)]
            else:
                raise ConfigError(f"override {item}: '{path}' is not in the recipe (nothing to delete)")
        elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            params_path = (*keys[:-1], "params")
            keep = {p[len(params_path)] for p in explicit
                    if len(p) > len(params_path) and p[: len(params_path)] == params_path}
            if params_path in explicit and isinstance(node.get("params"), dict):
                keep |= set(node["params"])
            note = swap_component(node, last, value, ".".join(keys), keep)
            if note is not None and notes is not None:
                notes.append(note)
            node[last] = value
            explicit.add(tuple(keys))
        else:
            raise ConfigError(f"override {item}: '{'.'.join(keys[:-1])}' is not a mapping")
    return out


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text: str) -> Any:
    """A command-line value: YAML (``10``, ``[3, 7]``, ``null``), ``1e-3`` a number too (YAML 1.1
    would read it as text); text that is not valid YAML (``{a``) stays text, for validation to judge."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = text
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    return value


def parse_override(item: str) -> tuple[str, Any, bool]:
    """``a.b=value`` -> ("a.b", parsed value, False); ``~a.b`` -> ("a.b", None, True).

    The value is YAML (``10``, ``0.001``, ``[3, 7]``, ``{steps: 50}``, ``null``), and ``1e-3``
    is a number too (YAML 1.1 would read it as text); text that is not valid YAML stays text.
    """
    text = item.strip()
    if text.startswith("~"):
        path, value, delete = text[1:], None, True
        if "=" in path:
            raise ConfigError(f"an override expects key.path=value (set) or ~key.path (delete, no value), got '{item}'")
    elif "=" in text:
        path, _, raw_value = text.partition("=")
        delete = False
        value = parse_value(raw_value)
    else:
        raise ConfigError(f"an override expects key.path=value (set) or ~key.path (delete), got '{item}'")
    keys = path.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"an override expects key.path=value (set) or ~key.path (delete), got '{item}'")
    return ".".join(k.strip() for k in keys), value, delete
