"""Bounds on every size a file, a flag or a recipe can ask for, checked before anything is allocated.

Each limit is far beyond what the papers' models need, and stops a corrupt or hostile input (or a
typo like ``-n 1000000000``) from hanging the machine or ending in an allocation traceback. Users
of large machines raise one with an environment variable, ``GENFW_MAX_<NAME>`` (e.g.
``GENFW_MAX_SAMPLES=5000000``). docs/errors.md lists them.

:func:`construction_budget` bounds what building a module may create: every parameter, buffer
and sub-module registered while it is active is counted, and the build stops with a
:class:`~genfw.errors.GenfwError` as soon as a count passes its bound (on the ``meta`` device this
costs no memory, so a file asking for a depth-20000 backbone is refused after a few layers).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from genfw.errors import ConfigError, GenfwError

# name -> (default, what it bounds)
LIMITS: dict[str, tuple[int, str]] = {
    "grid_tokens": (1 << 22, "codes in one code grid (2048 x 2048)"),
    "side": (1 << 16, "pixels on one side of an image a model describes"),
    "count": (1 << 24, "codebook entries, classes or channels a model describes"),
    "extra_bytes": (1 << 30, "bytes a model built from a file may hold beyond twice its tensors"),
    "samples": (1_000_000, "images one `genfw sample`/`inpaint` call or recipe makes"),
    "sample_gib": (16, "GiB of decoded images one sampling call holds in memory"),
    "batch": (65_536, "images per sampling or training batch"),
    "batch_tokens": (1 << 26, "batch size times code-grid tokens in one sampling chunk"),
    "sampler_steps": (100_000, "sampler steps (any sampler parameter named steps or *_steps)"),
    "image_pixels": (1 << 28, "pixels of one input image (decompression bombs)"),
    "recipe_bytes": (1 << 24, "bytes of one recipe file"),
    "recipe_nodes": (100_000, "values in a recipe after YAML aliases are expanded"),
    "modules": (10_000, "modules in one model a recipe builds (the shipped recipes: at most 300)"),
    # 0: the memory of the device training runs on (GPU memory, or the machine's RAM)
    "train_gib": (0, "GiB for the weights, gradients and Adam moments of the models a recipe trains"),
    # 0: the memory free on the sampling device now (free GPU memory, or the machine's available RAM)
    "activation_gib": (0, "GiB of activations one sampling chunk holds (a lower bound per backbone evaluation)"),
}


def limit(name: str) -> int:
    """The limit ``name``: ``GENFW_MAX_<NAME>`` when set, else its default."""
    default, _ = LIMITS[name]
    var = env_var(name)
    text = os.environ.get(var)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{var} must be a positive integer, got '{text}'") from None
    if value < 1:
        raise ConfigError(f"{var} must be a positive integer, got '{text}'")
    return value


def env_var(name: str) -> str:
    return f"GENFW_MAX_{name.upper()}"


def check(name: str, value: int, what: str, unit: str = "") -> None:
    """Refuse ``value`` above the limit ``name`` in one line naming the variable that raises it."""
    bound = limit(name)
    if value > bound:
        raise ConfigError(f"{what} is {value:,}{unit}, beyond genfw's limit of {bound:,}{unit} "
                          f"({LIMITS[name][1]}): lower it, or raise the limit with {env_var(name)}=N")


def check_sampler_steps(values: dict, prefix: str = "sampler param ") -> None:
    """Bound every sampler parameter named ``steps`` or ``*_steps`` (an int) by ``sampler_steps``."""
    for key, value in values.items():
        if (key == "steps" or key.endswith("_steps")) and isinstance(value, int) and not isinstance(value, bool):
            check("sampler_steps", value, f"{prefix}{key}")


#: Seeds are 0..2**63-1: torch takes 64-bit seeds, and genfw adds small offsets (chunk k of a
#: sampling call uses seed + k), which must not overflow.
MAX_SEED = 2**63 - 1


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` as an int, or one line saying what a seed must be (a bool, text or 2**70 is not one)."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)  # int, numpy ints; not 2.5 or '3'
    except TypeError:
        value = None
    if value is None:
        raise ConfigError(f"{what} must be an integer from 0 to {MAX_SEED} (2**63-1), got {seed!r}")
    seed = value
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{what} {seed} is out of range: a seed must be an integer from 0 to {MAX_SEED} (2**63-1)")
    return seed


class BudgetExceeded(GenfwError):
    """Building a module created more than its budget allowed."""


@contextmanager
def construction_budget(what: str, max_tensors: int | None = None, max_bytes: int | None = None,
                        max_modules: int | None = None, reason: str = "") -> Iterator[dict[str, int]]:
    """Count parameters, buffers and sub-modules registered while active; stop past any bound."""
    counts = {"tensors": 0, "bytes": 0, "modules": 0}

    def over(kind: str, bound: int) -> BudgetExceeded:
        return BudgetExceeded(f"{what}: building it would create more than {bound:,} {kind}{reason}")

    def on_tensor(module, name, tensor):  # noqa: ARG001
        if tensor is None:
            return None
        counts["tensors"] += 1
        counts["bytes"] += tensor.numel() * tensor.element_size()
        if max_tensors is not None and counts["tensors"] > max_tensors:
            raise over("tensors", max_tensors)
        if max_bytes is not None and counts["bytes"] > max_bytes:
            raise BudgetExceeded(f"{what}: building it would allocate more than {max_bytes / 2**30:.1f} GiB{reason}")
        return None

    def on_module(module, name, submodule):  # noqa: ARG001
        counts["modules"] += 1
        if max_modules is not None and counts["modules"] > max_modules:
            raise over("modules", max_modules)
        return None

    hooks = [
        nn.modules.module.register_module_parameter_registration_hook(on_tensor),
        nn.modules.module.register_module_buffer_registration_hook(on_tensor),
        nn.modules.module.register_module_module_registration_hook(on_module),
    ]
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tensor listed twice counts once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


__all__ = ["LIMITS", "MAX_SEED", "check_seed", "check_sampler_steps", "limit", "check", "construction_budget", "BudgetExceeded", "tensor_bytes"]
