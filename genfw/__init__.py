"""genfw: two-stage discrete generative image models — tokenizers, priors and backbones as plugins.

The Python API (docs/python-api.md): ``genfw.load(path).sample(4)``, ``genfw.run("quickstart")``,
``genfw.ablate(...)``.

The core knows interfaces only; every concrete model comes from a plugin registered through the
``genfw`` entry-point group. Heavy imports are lazy so that ``genfw --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
# The plugin contract's version (CHANGELOG.md, "For plugin authors"): the minor number grows when
# the contract gains something or a conformance rule becomes stricter (a warning for one minor
# version first), the major number when something a plugin relies on is removed or changed.
PLUGIN_API = "1.1"

_LAZY = {
    "hookimpl": ("genfw.hookspecs", "hookimpl"),
    "load": ("genfw.api", "load"),
    "run": ("genfw.api", "run"),
    "ablate": ("genfw.ablate", None),  # the package, callable as genfw.api.ablate (see genfw/ablate/__init__.py)
    "Model": ("genfw.api", "Model"),
    "save": ("genfw.checkpoint", "save"),
    "Bundle": ("genfw.checkpoint", "Bundle"),
    "get_registry": ("genfw.registry", "get_registry"),
    "build": ("genfw.registry", "build"),
    "Tokenizer": ("genfw.interfaces", "Tokenizer"),
    "Backbone": ("genfw.interfaces", "Backbone"),
    "Prior": ("genfw.interfaces", "Prior"),
    "ImageDataset": ("genfw.interfaces", "ImageDataset"),
    "Params": ("genfw.interfaces", "Params"),
    "Level": ("genfw.interfaces", "Level"),
    "StepOutput": ("genfw.interfaces", "StepOutput"),
    "NLLOutput": ("genfw.interfaces", "NLLOutput"),
    "GenfwError": ("genfw.errors", "GenfwError"),
}

__all__ = ["__version__", "PLUGIN_API", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        value = getattr(value, attr) if attr else value
        globals()[name] = value
        return value
    raise AttributeError(f"module 'genfw' has no attribute {name!r}")
