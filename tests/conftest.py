"""Test setup: only genfw's own plugins load, so stray installed plugins cannot change results."""

import os

os.environ["GENFW_PLUGINS"] = "genfw"  # the allowlist: our distribution's entry points only

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def registry():
    """The process registry (built-in plugins only)."""
    from genfw.registry import get_registry

    return get_registry()
