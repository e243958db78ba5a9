"""Conformance checks every component — built-in or third-party — must pass.

Use them from your plugin's tests::

    from genfw.testing import check_prior
    def test_my_prior():
        check_prior("muse", {"steps": 4}, backbone={"name": "transformer", "params": {...}})

One check per kind: :func:`check_tokenizer`, :func:`check_backbone`, :func:`check_prior`,
:func:`check_dataset`, :func:`check_logger`, :func:`check_converter` (signatures and what each
asserts: docs/writing-plugins.md). A component is named by its registered name, or given as a
class (a converter: a function; it is then registered for the duration of the check). Each check
raises ``AssertionError`` with what is wrong and returns the component.

Stricter rules arrive gently: a rule in :data:`RULES` is a :class:`ConformanceWarning` from the
plugin API version that introduced it and an ``AssertionError`` one minor version later
(``genfw.PLUGIN_API``; CHANGELOG.md says which rule arrived when). Each message names its rule.
"""

from genfw.testing.common import RULES, ConformanceWarning, Rule
from genfw.testing.models import check_backbone, check_prior, check_tokenizer
from genfw.testing.plumbing import check_converter, check_dataset, check_logger

__all__ = ["RULES", "ConformanceWarning", "Rule", "check_backbone", "check_converter", "check_dataset",
           "check_logger", "check_prior", "check_tokenizer"]
