"""The plugin example in docs/writing-plugins.md is real code that passes genfw.testing."""

import importlib.util
import re
import sys
from pathlib import Path

from genfw.testing import check_prior

DOC = Path(__file__).parents[1] / "docs" / "writing-plugins.md"


def test_plugin_example_passes_conformance(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    source = next(b for b in blocks if "def genfw_register" in b)
    path = tmp_path / "genfw_maskgit_doc.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("genfw_maskgit_doc", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "genfw_maskgit_doc", module)
    spec.loader.exec_module(module)
    check_prior(module.MaskGIT, {}, backbone={"name": "transformer", "params": {"dim": 32, "depth": 1, "heads": 2}},
                sampler={"steps": 4})
