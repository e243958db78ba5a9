"""What every conformance check shares: the rules that arrive gently, the component under test
(registered for the duration of a check when given as a class), a save/load round trip."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from genfw import checkpoint
from genfw.errors import ConfigError
from genfw.hookspecs import hookimpl
from genfw.params import validate_params
from genfw.registry import get_registry, plugin_api


class ConformanceWarning(UserWarning):
    """A conformance rule this plugin API only warns about; it becomes an error one minor version later.

    Make it an error today with ``pytest -W error::genfw.testing.ConformanceWarning``.
    """


@dataclass(frozen=True)
class Rule:
    """A conformance rule that arrived after plugin API 1.0: a warning first, then an error."""

    name: str
    warn_from: str  # the plugin API version that introduced it, as a warning
    error_from: str  # one minor version later: an AssertionError

    def enforce(self, message: str) -> None:
        """Warn or fail (depending on ``genfw.PLUGIN_API``) with ``message`` and the rule's name and schedule."""
        from packaging.version import Version

        text = (f"{message} [rule '{self.name}': a warning in plugin API {self.warn_from}, "
                f"an error from {self.error_from}]")
        if Version(plugin_api()) >= Version(self.error_from):
            raise AssertionError(text)
        warnings.warn(text, ConformanceWarning, stacklevel=4)


RULES = {
    # check_backbone: every output position sees every input position without causal=True
    # (SUNDAE, absorbing diffusion and MaskGIT denoise the whole grid at once)
    "global-receptive-field": Rule("global-receptive-field", warn_from="1.1", error_from="1.2"),
}


@contextlib.contextmanager
def _registered(kind: str, component: str | type) -> Iterator[str]:
    """Yield a registry name for ``component``, registering a class temporarily if needed."""
    if isinstance(component, str):
        get_registry().get(kind, component)
        yield component
        return
    name = f"_genfw_testing_{component.__name__.lower()}"

    class _Plugin:
        @hookimpl
        def genfw_register(self, registry):
            registry.register(kind, name, component, description="under test")

    registry = get_registry()
    registry.add_plugin(_Plugin(), name=name, dist="genfw-testing")
    try:
        yield name
    finally:
        registry.remove_plugin(name)


def _roundtrip(module: torch.nn.Module) -> torch.nn.Module:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        checkpoint.save(path, module)
        return checkpoint.load(path)


def _check_params_reject_typos(cls: type) -> None:
    try:
        validate_params(cls.Params, {"surely_not_a_param": 1}, "params")
    except ConfigError as e:
        assert "params.surely_not_a_param" in str(e), f"typo error does not name the key: {e}"
    else:
        raise AssertionError(f"{cls.__name__}.Params accepted an unknown key")


def _cuda_available() -> bool:
    return torch.cuda.is_available()
