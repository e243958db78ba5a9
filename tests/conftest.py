"""Test setup: only genfw's own plugins load, so stray installed plugins cannot change results."""

import os

os.environ["GENFW_PLUGINS"] = "genfw"  # the allowlist: our distribution's entry points only
os.environ["GENFW_PROGRESS"] = "0"
# Tests use tiny models, where a second OpenMP thread costs more in synchronisation than it
# gains (and the CPU may be shared); subprocesses (CLI tests) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def registry():
    """The process registry (built-in plugins only)."""
    from genfw.registry import get_registry

    return get_registry()
