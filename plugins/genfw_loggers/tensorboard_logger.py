"""TensorBoard event files through ``torch.utils.tensorboard`` (``pip install 'genfw[tensorboard]'``).

Events go to ``<stage folder>/tensorboard/``, so ``tensorboard --logdir RUN`` shows one run per
stage (``tokenizer/tensorboard``, ``prior0/tensorboard``, ...). Scalar tags are the trainer's
keys (``loss/main``, ``lr``, ``bits_per_token``, ``level0/usage``...); images keep their tag.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from pydantic import Field, field_validator

from genfw.errors import PluginError
from genfw.interfaces import Logger, Params

INSTALL_HINT = "pip install 'genfw[tensorboard]'"


_quiet = False


def _quiet_writer_thread_errors() -> None:
    """Keep TensorBoard's writer thread from printing a traceback of its own.

    A failed write (an unwritable or full disk) ends that thread with the error, which Python
    prints as a 45-line traceback; the next write from the training thread raises the same error,
    and genfw reports it as one warning and switches the logger off. Only that thread's uncaught
    exceptions are silenced; every other thread keeps the hook it had.
    """
    global _quiet
    if _quiet:
        return
    _quiet = True
    previous = threading.excepthook

    def hook(args) -> None:
        thread = args.thread
        if type(thread).__name__ == "_AsyncWriterThread" and type(thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    threading.excepthook = hook


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError (or ModuleNotFoundError) without the package
        raise PluginError(f"logger 'tensorboard' needs the tensorboard package ({e}): {INSTALL_HINT}") from None
    return SummaryWriter


class TensorBoard(Logger):
    """Scalars and images as TensorBoard events; a resumed stage hides the events it logs again."""

    class Params(Params):
        subdir: str = Field("tensorboard", min_length=1)  # inside the stage folder
        flush_secs: int = Field(30, ge=1)  # how often pending events reach the disk
        max_queue: int = Field(10, ge=1)  # events buffered before a write

        @field_validator("subdir")
        @classmethod
        def _inside(cls, value: str) -> str:
            if os.path.isabs(value) or ".." in value.replace("\\", "/").split("/"):
                raise ValueError("must be a relative folder inside the stage folder")
            return value

    @classmethod
    def check_available(cls) -> None:
        _summary_writer()

    def __init__(self, params=None, **construct) -> None:
        super().__init__(params, **construct)
        writer = _summary_writer()
        _quiet_writer_thread_errors()
        log_dir = os.path.join(self.directory, self.params.subdir)
        if os.path.islink(log_dir):  # events would land wherever the link points
            raise PluginError(f"{log_dir} is a symbolic link: genfw never writes through one; remove the link")
        # purge_step: events at or after start_step (the first step this session logs), written
        # after the saved state by an interrupted session, are hidden by TensorBoard (they are
        # about to be logged again); the saved step's own events stay.
        self.writer = writer(log_dir=log_dir,
                             purge_step=self.start_step or None, flush_secs=self.params.flush_secs,
                             max_queue=self.params.max_queue)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_image(self, step: int, tag: str, image) -> None:
        self.writer.add_image(tag, image, global_step=step, dataformats="CHW")

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        # one record in TensorBoard's HPARAMS tab, in <subdir>/hparams (torch writes it beside the run)
        self.writer.add_hparams(hparams, metrics, run_name="hparams")

    def close(self) -> None:
        self.writer.close()
