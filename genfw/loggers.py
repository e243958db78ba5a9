"""Training loggers: a component kind, and the fan-out the trainer writes through.

A recipe chooses them with ``log: [jsonl, tensorboard]`` (default ``[jsonl]``); an entry is a
registered name or ``{name: ..., params: {...}}``. Built-ins (plugin ``genfw_loggers``): ``jsonl``
(``log.jsonl``, which the report reads), ``csv`` (``log.csv``) and ``tensorboard`` (event files
under ``tensorboard/``). A third-party logger (W&B, MLflow) is an ordinary plugin registering
kind ``"logger"``; docs/writing-plugins.md shows one.

A logger is built once per training stage as ``cls(params, directory=..., stage=...,
start_step=...)``: ``directory`` is the stage folder (e.g. ``RUN/prior0``), ``stage`` its name,
``start_step`` the first step this session can log: 1 for a stage trained from scratch, ``S + 1``
when it resumes or continues from a state saved at step ``S``. Records of an earlier session at
or after ``start_step`` came after that state (an interruption) and are about to be logged
again: drop or replace them. Records before it are the stage's history: keep every one.

Only rank 0 of a ``torchrun`` logs. Logging never stops training: a logger that raises — when
built or on any call — gets one warning on stderr naming it and the error, and is switched off
for the rest of the stage.
"""

from __future__ import annotations

from typing import Any

import torch

from genfw import dist
from genfw.errors import ConfigError, GenfwError
from genfw.images import make_grid
from genfw.interfaces import Logger  # noqa: F401 - re-exported: the kind's base class lived here until 0.2
from genfw.params import validate_params
from genfw.progress import console
from genfw.registry import get_registry


def image_to_uint8(image: Any) -> torch.Tensor:
    """An image as uint8 ``[C, H, W]`` on the CPU.

    Takes a ``[C, H, W]`` tensor in [-1, 1] or uint8, a batch ``[B, C, H, W]`` in [-1, 1]
    (tiled into one grid, as ``samples/grid.png`` is), or a PIL image.
    """
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.is_floating_point():
        image = make_grid(image)  # a PIL image
    if not isinstance(image, torch.Tensor):
        import numpy as np

        array = np.asarray(image)  # PIL: [H, W] or [H, W, C]
        image = torch.from_numpy(array.copy())
        image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
    image = image.detach().cpu()
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image to log must be [C, H, W] (or a float batch [B, C, H, W]) with C = 1 or 3, "
                         f"got {tuple(image.shape)}")
    if image.shape[0] == 4:  # RGBA from PIL: drop alpha
        image = image[:3]
    if image.dtype != torch.uint8:
        image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return image.contiguous()


def _spec(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if hasattr(entry, "model_dump"):
        entry = entry.model_dump()
    return entry["name"], dict(entry.get("params") or {})


class LoggerSet:
    """The chosen loggers of one training stage, written to together (rank 0 only).

    ``specs`` are names or ``{"name", "params"}`` entries (a recipe's ``log:``). Loggers are
    built on first use (or by :meth:`open`, which the trainer calls with the step it resumes
    from); a logger that fails is warned about once and dropped.
    """

    def __init__(self, specs: list[Any] | None, directory: str, stage: str = "") -> None:
        self.specs = [_spec(s) for s in (["jsonl"] if specs is None else specs)]
        self.directory, self.stage = directory, stage
        self._loggers: list[tuple[str, Logger]] | None = None
        self._failed: set[str] = set()  # switched off for the rest of the stage, even after a reopen

    @property
    def names(self) -> list[str]:
        """Names of the loggers still working (all chosen ones before they are built)."""
        return [n for n, _ in self._loggers] if self._loggers is not None else [n for n, _ in self.specs]

    def open(self, start_step: int = 1) -> None:
        """Build the loggers (no-op when already open, and on ranks other than 0).

        ``start_step``: the first step this session can log (the saved step + 1), see above."""
        if self._loggers is not None:
            return
        self._loggers = []
        if not dist.is_main():
            return
        registry = get_registry()
        for name, params in self.specs:
            if name in self._failed:
                continue
            try:
                logger = registry.build("logger", name, params, directory=self.directory, stage=self.stage,
                                        start_step=start_step)
            except Exception as e:  # noqa: BLE001 - logging must never stop training
                self._failed.add(name)
                _warn(name, "could not start", e)
                continue
            self._loggers.append((name, logger))

    def _each(self, what: str, call) -> None:
        if self._loggers is None:
            self.open()
        for entry in list(self._loggers or []):
            try:
                call(entry[1])
            except Exception as e:  # noqa: BLE001 - logging must never stop training
                _warn(entry[0], f"failed to {what}", e)
                self._failed.add(entry[0])
                self._loggers.remove(entry)
                try:
                    entry[1].close()
                except Exception:  # noqa: BLE001 - already reported
                    pass

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Send ``scalars`` at ``step`` to every logger (values as Python floats)."""
        values = {}
        for k, v in scalars.items():
            try:
                values[str(k)] = float(v)
            except (TypeError, ValueError, RuntimeError):  # not a number (or a tensor of several)
                continue
        self._each("log scalars", lambda lg: lg.log_scalars(int(step), values))

    def log_image(self, step: int, tag: str, image: Any) -> None:
        """Send an image to every logger: ``[C, H, W]`` in [-1, 1] or uint8, a float batch
        ``[B, C, H, W]`` (logged as one grid), or a PIL image."""
        if not self._loggers and self._loggers is not None:
            return
        try:
            pixels = image_to_uint8(image)
        except ValueError as e:
            _warn("(all)", f"cannot log image '{tag}'", e)
            return
        self._each(f"log image '{tag}'", lambda lg: lg.log_image(int(step), tag, pixels))

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Send a run's hyper-parameters (flattened, see :func:`flat_hparams`) and numeric metrics."""
        values = {str(k): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._each("log hyper-parameters", lambda lg: lg.log_hparams(dict(hparams), values))

    def close(self) -> None:
        """Close every logger; later calls reopen them (appending)."""
        loggers, self._loggers = self._loggers or [], None
        for name, logger in loggers:
            try:
                logger.close()
            except Exception as e:  # noqa: BLE001
                _warn(name, "failed to close", e)


def flat_hparams(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe as flat ``a.b.c`` keys with numbers, text or booleans (lists and None as text)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat_hparams(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = tree if isinstance(tree, (bool, int, float, str)) else str(tree)
    return out


def _warn(name: str, what: str, error: BaseException) -> None:
    from rich.markup import escape

    detail = str(error) if isinstance(error, GenfwError) else f"{type(error).__name__}: {error}"
    console.print(f"[yellow]warning:[/yellow] logger '{escape(name)}' {what} ({escape(detail)}); "
                  "it is switched off, training goes on", highlight=False, soft_wrap=True)


def validate_log(specs: list[Any], registry: Any) -> None:
    """Check a recipe's ``log:`` entries: known names, valid params, no repeats, dependencies installed."""
    seen: set[str] = set()
    for i, entry in enumerate(specs):
        name, params = _spec(entry)
        try:
            cls = registry.load("logger", name)
        except GenfwError as e:
            raise type(e)(f"log.{i}: {e}") from None
        if name in seen:
            raise ConfigError(f"log.{i}: logger '{name}' is listed twice")
        seen.add(name)
        validate_params(cls.Params, params, f"log.{i}.params")
        try:
            cls.check_available()
        except GenfwError as e:
            raise type(e)(f"log.{i}: {e}") from None
