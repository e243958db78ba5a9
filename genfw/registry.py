"""Plugin discovery and the component registry.

Plugins come from the ``genfw`` entry-point group, loaded one by one so that a broken plugin is
reported and the others still load. ``GENFW_PLUGINS`` (comma-separated entry-point or
distribution names) restricts loading to an allowlist; tests use it so that stray installed
plugins cannot change results. Two components of the same kind and name are an error naming
both distributions.

Strictness: a plugin may declare the plugin-API versions it supports with a module attribute
``GENFW_PLUGIN_API = ">=1.0,<2"`` (a PEP 440 range, compared with ``genfw.PLUGIN_API``); outside
it, or registering a kind genfw does not know, the plugin is refused as a whole and reported in
one line that names its entry point and the file:line in the plugin where it failed.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import traceback
from dataclasses import dataclass
from typing import Any

import pluggy

import genfw
from genfw import hookspecs
from genfw.errors import PluginError

ENTRY_POINT_GROUP = "genfw"
API_ATTRIBUTE = "GENFW_PLUGIN_API"  # a plugin module's declared range of supported plugin-API versions
# The component kinds, by name; their base classes are in genfw.interfaces (the registry needs only names).
KINDS = ("tokenizer", "backbone", "prior", "dataset", "logger")
KNOWN_KINDS = (*KINDS, "converter")


class UnknownComponent(PluginError):
    """No installed plugin registers this kind and name."""


class ComponentClash(PluginError):
    """Several distributions register this kind and name."""

ALLOWLIST_ENV = "GENFW_PLUGINS"


@dataclass
class Entry:
    """One registered component: where it lives and which distribution registered it."""

    kind: str
    name: str
    target: Any  # "module:attr" or the class itself
    description: str
    plugin: str  # entry-point (or test plugin) name
    dist: str
    version: str

    def load(self) -> type:
        """Import and return the component class."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as e:  # noqa: BLE001 - reported with the plugin's name
            raise PluginError(
                f"{self.kind} '{self.name}' from {self.dist} {self.version} (plugin '{self.plugin}') failed to import "
                f"{self.target}: {type(e).__name__}: {e}{_plugin_location(e, (self.target,))}"
            ) from e
        return obj

    def summary(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.dist,
            "version": self.version,
            "plugin": self.plugin,
            "description": self.description,
        }


@dataclass
class BrokenPlugin:
    """A plugin that failed to load, kept for ``genfw plugins`` to report."""

    plugin: str
    dist: str
    version: str
    error: str
    entry_point: str = ""  # "name = module" as declared, when it came from an entry point

    def describe(self) -> str:
        """``plugin 'x' (dist 1.0, entry point x = mod.plugin)``: who failed, for one-line messages."""
        ep = f", entry point {self.entry_point}" if self.entry_point else ""
        return f"plugin '{self.plugin}' ({self.dist} {self.version}{ep})"


def plugin_api() -> str:
    """The plugin-API version this genfw provides (``genfw.PLUGIN_API``, read at call time)."""
    return genfw.PLUGIN_API


def api_problem(declared: Any, who: str) -> str | None:
    """Why a plugin declaring ``GENFW_PLUGIN_API = declared`` cannot load here, or None if it can."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import Version

    if declared is None:
        return None
    try:
        spec = SpecifierSet(str(declared))
    except InvalidSpecifier:
        return f"{who} declares {API_ATTRIBUTE} = {declared!r}, which is not a version range like '>=1.0,<2'"
    provided = plugin_api()
    if Version(provided) in spec:
        return None
    return (f"{who} supports genfw plugin API {spec}, but this genfw provides {provided}: install a release "
            f"of the plugin for plugin API {provided}, or a genfw whose plugin API is {spec} (CHANGELOG.md)")


def _plugin_location(e: BaseException, modules: tuple[str, ...] = ()) -> str:
    """`` (file:line)`` of where ``e`` arose inside the plugin, never inside importlib or genfw.

    Frames in the plugin's own package (``modules``' top-level packages) are preferred; else the
    innermost frame outside importlib, pluggy and genfw's core; a SyntaxError names its own line.
    """
    if isinstance(e, SyntaxError) and e.filename:
        return f" ({e.filename}:{e.lineno})"
    frames = traceback.extract_tb(e.__traceback__)
    roots = []
    for module in modules:
        try:
            spec = importlib.util.find_spec(module.partition(":")[0].split(".")[0])
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:  # a package: files under its folders
            roots += [os.path.abspath(r) + os.sep for r in spec.submodule_search_locations]
        elif spec is not None and spec.origin:  # a single-module plugin: that file
            roots.append(os.path.abspath(spec.origin))
    core = os.path.dirname(os.path.abspath(__file__)) + os.sep
    skip = (core, os.path.dirname(os.path.abspath(pluggy.__file__)) + os.sep,
            os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep)
    ours = [f for f in frames if any(os.path.abspath(f.filename) == r or os.path.abspath(f.filename).startswith(r)
                                     for r in roots)]
    rest = [f for f in frames if not f.filename.startswith("<") and not os.path.abspath(f.filename).startswith(skip)]
    for candidates in (ours, rest):
        if candidates:
            return f" ({candidates[-1].filename}:{candidates[-1].lineno})"
    return ""


class _Registrar:
    """What a plugin's ``genfw_register`` hook receives: registers under that plugin's name."""

    def __init__(self, registry: Registry, plugin: str, dist: str, version: str) -> None:
        self._registry, self._plugin, self._dist, self._version = registry, plugin, dist, version
        self.entries: list[Entry] = []  # added to the registry only once the whole hook succeeded

    def register(self, kind: str, name: str, target: Any, description: str = "") -> None:
        """Register ``target`` (a class or ``"module:attr"``) as component ``name`` of ``kind``."""
        if kind not in KNOWN_KINDS:
            raise PluginError(f"plugin '{self._plugin}' registers {name!r} as kind {kind!r}, which genfw does "
                              f"not know (kinds: {', '.join(KNOWN_KINDS)})")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{self._plugin}' registered a {kind} without a name")
        self.entries.append(
            Entry(kind, name, target, description.strip().splitlines()[0] if description else "",
                  self._plugin, self._dist, self._version)
        )


class Registry:
    """Name -> component class, per kind, with provenance."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("genfw")
        self.pm.add_hookspecs(hookspecs)
        self._entries: dict[tuple[str, str], Entry] = {}
        self.conflicts: dict[tuple[str, str], list[Entry]] = {}
        self.broken: list[BrokenPlugin] = []

    # -- registration ----------------------------------------------------------------------

    def _add(self, entry: Entry) -> None:
        if not entry.kind or not entry.name:
            raise PluginError(f"plugin {entry.plugin} registered a component without kind or name")
        key = (entry.kind, entry.name)
        if key in self.conflicts:
            self.conflicts[key].append(entry)
        elif key in self._entries:
            self.conflicts[key] = [self._entries.pop(key), entry]
        else:
            self._entries[key] = entry

    def add_plugin(self, plugin: Any, name: str, dist: str = "", version: str = "") -> None:
        """Register a plugin object (module or instance with ``@hookimpl genfw_register``).

        All or nothing: a plugin outside its declared plugin-API range, or whose hook fails (an
        unknown kind, say), registers no component.
        """
        problem = api_problem(getattr(plugin, API_ATTRIBUTE, None),
                              f"plugin '{name}' ({dist or name} {version or '0'})")
        if problem:
            raise PluginError(problem)
        self.pm.register(plugin, name=name)
        registrar = _Registrar(self, name, dist or name, version or "0")
        try:
            for impl in self.pm.hook.genfw_register.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(registry=registrar)
        except BaseException:
            self.pm.unregister(plugin)
            raise
        for entry in registrar.entries:
            self._add(entry)

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin and every component it registered."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != name}
        for key, entries in list(self.conflicts.items()):
            kept = [e for e in entries if e.plugin != name]
            del self.conflicts[key]
            for e in kept:
                self._add(e)

    def load_entry_points(self, allowlist: set[str] | None = None) -> None:
        """Load every ``genfw`` entry point (restricted to ``allowlist`` when given)."""
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if allowlist is not None and ep.name not in allowlist and dist not in allowlist:
                continue
            declared = f"{ep.name} = {ep.value}"
            if self.pm.get_plugin(ep.name) is not None:
                # Two distributions using one entry-point name: pluggy would drop one silently.
                self.broken.append(BrokenPlugin(ep.name, dist, version,
                                                "entry-point name already used by another distribution", declared))
                continue
            try:
                module = ep.load()
                self.add_plugin(module, name=ep.name, dist=dist, version=version)
            except Exception as e:  # noqa: BLE001 - one broken plugin must not take others down
                what = str(e) if isinstance(e, PluginError) else f"{type(e).__name__}: {e}"
                self.broken.append(BrokenPlugin(ep.name, dist, version,
                                                f"{what}{_plugin_location(e, (ep.value,))}", declared))

    # -- lookup ----------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(n for (k, n) in self._entries if k == kind)

    def entries(self, kind: str | None = None) -> list[Entry]:
        return sorted((e for e in self._entries.values() if kind in (None, e.kind)),
                      key=lambda e: (KINDS.index(e.kind) if e.kind in KINDS else 99, e.kind, e.name))

    def get(self, kind: str, name: str) -> Entry:
        """The entry for a component; clear errors for unknown or clashing names."""
        key = (kind, name)
        if key in self.conflicts:
            raise ComponentClash(self.clash_message(kind, name))
        if key not in self._entries:
            known = ", ".join(self.names(kind)) or "none"
            raise UnknownComponent(f"unknown {kind} '{name}'; registered {kind}s: {known}{self.broken_hint()}")
        return self._entries[key]

    def clash_message(self, kind: str, name: str) -> str:
        """What to say about a kind and name that several distributions register."""
        entries = self.conflicts[(kind, name)]
        who = " and ".join(f"{e.dist} {e.version} (plugin '{e.plugin}')" for e in entries)
        own = [e.plugin for e in entries if e.dist == "genfw"]
        if own:  # a built-in added in a later release took a name a plugin already used
            return (f"{kind} '{name}' is registered by both {who}: rename yours, or leave genfw's own plugin "
                    f"'{own[0]}' out with {ALLOWLIST_ENV}=<the plugins to load, without {own[0]}>")
        return f"{kind} '{name}' is registered by both {who}: uninstall one of them"

    def broken_hint(self, dist: str | None = None) -> str:
        """`` (plugins that failed to load: ...)`` with their errors, or '' when none did."""
        broken = [b for b in self.broken if dist in (None, b.dist)]
        if not broken:
            return ""
        what = "; ".join(f"{b.plugin} ({b.dist} {b.version}): {b.error}" for b in broken)
        return f" (plugins that failed to load: {what}; see `genfw plugins`)"

    def distributions(self) -> dict[str, str]:
        """Version of every distribution that registered a component (clashing ones included)."""
        out = {e.dist: e.version for e in self._entries.values()}
        for entries in self.conflicts.values():
            out.update({e.dist: e.version for e in entries})
        return out

    def load(self, kind: str, name: str) -> type:
        return self.get(kind, name).load()

    def build(self, kind: str, name: str, params: Any = None, **construct: Any) -> Any:
        """Instantiate a registered component with validated params and construction args."""
        entry = self.get(kind, name)
        module = entry.load()(params, **construct)
        # Provenance, so that checkpoints can name the component and the plugin it needs.
        module._genfw_name, module._genfw_dist, module._genfw_version = name, entry.dist, entry.version
        return module


def _allowlist_from_env() -> set[str] | None:
    value = os.environ.get(ALLOWLIST_ENV, "").strip()
    if not value or value == "*":
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        registry = Registry()
        registry.load_entry_points(_allowlist_from_env())
        _REGISTRY = registry
    return _REGISTRY


def reset_registry() -> None:
    """Forget the discovered registry (tests; after installing a plugin at run time)."""
    global _REGISTRY
    _REGISTRY = None


def build(kind: str, name: str, params: Any = None, **construct: Any) -> Any:
    """Build a registered component from the process-wide registry."""
    return get_registry().build(kind, name, params, **construct)


def build_backbone(spec: dict | Any, **construct: Any) -> Any:
    """Build a prior's backbone from its ``{"name", "params"}`` spec (dict or ComponentSpec)."""
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    return build("backbone", spec["name"], spec.get("params") or {}, **construct)


def component_name(module: Any) -> str:
    """The registry name a module was built under (or its class's ``registry_name``)."""
    name = getattr(module, "_genfw_name", None) or getattr(type(module), "registry_name", None)
    if name is None:
        raise PluginError(f"{type(module).__name__} was not built through the registry")
    return name
