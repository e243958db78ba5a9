"""``genfw plugins --check``: every registered component imported and checked against its kind.

The registry finds and builds components by name and knows kinds only by name; this module,
one layer above the component interfaces, checks that each registered class subclasses its
kind's base class (:mod:`genfw.interfaces`) and declares a pydantic ``Params`` model, and that
converters are callable.
"""

from __future__ import annotations

from pydantic import BaseModel

from genfw import interfaces
from genfw.errors import PluginError
from genfw.registry import KNOWN_KINDS, Registry

_BASES = {"tokenizer": "Tokenizer", "backbone": "Backbone", "prior": "Prior", "dataset": "ImageDataset",
          "logger": "Logger"}


def check_entries(registry: Registry) -> list[str]:
    """Import every registered component (lazy targets too); one line per problem found.

    Problems: plugins that failed to load (outside their plugin-API range, an unknown kind, an
    import error), names registered by several distributions, targets that fail to import, and
    components that do not subclass their kind's base class (or have no pydantic ``Params``).
    Converters must be callable, and their ``Params``, when declared, a pydantic model.
    """
    bases = {kind: getattr(interfaces, name) for kind, name in _BASES.items()}
    problems = [f"{b.describe()} failed to load: {b.error}" for b in registry.broken]
    problems += [registry.clash_message(k, n) for (k, n) in registry.conflicts]
    for entry in registry.entries():
        where = f"{entry.kind} '{entry.name}' ({entry.dist} {entry.version})"
        try:
            obj = entry.load()
        except PluginError as e:
            problems.append(str(e))
            continue
        if entry.kind not in KNOWN_KINDS:
            problems.append(f"{where}: genfw knows no kind '{entry.kind}' (kinds: {', '.join(KNOWN_KINDS)})")
            continue
        cls = bases.get(entry.kind)
        if cls is not None:
            if not (isinstance(obj, type) and issubclass(obj, cls)):
                problems.append(f"{where}: {entry.target if isinstance(entry.target, str) else obj!r} is not a "
                                f"subclass of {cls.__module__}.{cls.__name__}")
            elif not (isinstance(obj.Params, type) and issubclass(obj.Params, BaseModel)):
                problems.append(f"{where}: its Params is not a pydantic model")
        elif entry.kind == "converter":
            if not isinstance(obj, interfaces.Converter):
                problems.append(f"{where}: a converter must be callable")
            elif getattr(obj, "Params", None) is not None and not (
                    isinstance(obj.Params, type) and issubclass(obj.Params, BaseModel)):
                problems.append(f"{where}: its Params is not a pydantic model")
    return problems
