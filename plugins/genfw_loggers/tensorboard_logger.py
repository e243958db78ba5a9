"""TensorBoard event files through ``torch.utils.tensorboard`` (``pip install 'genfw[tensorboard]'``).

Events go to ``<stage folder>/tensorboard/``, so ``tensorboard --logdir RUN`` shows one run per
stage (``tokenizer/tensorboard``, ``prior0/tensorboard``, ...). Scalar tags are the trainer's
keys (``loss/main``, ``lr``, ``bits_per_token``, ``level0/usage``...); images keep their tag.
"""

from __future__ import annotations

import os

from pydantic import Field, field_validator

from genfw.errors import PluginError
from genfw.interfaces import Params
from genfw.loggers import Logger

INSTALL_HINT = "pip install 'genfw[tensorboard]'"


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

    def close(self) -> None:
        self.writer.close()
