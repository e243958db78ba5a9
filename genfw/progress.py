"""Progress bars on stderr (rich): bar, count, time left and the current loss.

Set ``GENFW_PROGRESS=0`` to silence them (CI logs); they are also off on non-main ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from genfw import dist

console = Console(stderr=True)
T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("GENFW_PROGRESS", "1") != "0" and dist.is_main()


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self.progress, self.task = progress, task

    def update(self, completed: int, **fields: float) -> None:
        if self.progress is not None:
            info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
            self.progress.update(self.task, completed=completed, info=info)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]{text}[/dim]")


@contextmanager
def progress_bar(description: str, total: int | None, completed: int = 0) -> Iterator[_Bar]:
    """A bar for ``total`` units of work, or a no-op when progress output is off."""
    if not enabled():
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)


def announce(device, precision: str | None, to: Console | None = None) -> None:
    """One line saying where and how work runs: device, precision, CPU threads (stdout by default,
    beside the command's other results; stderr keeps errors and progress bars)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        where = f"{device} ({torch.cuda.get_device_name(index)})"
        how = f"{precision} autocast" if precision in ("bf16", "fp16") else "fp32"
    else:
        where, how = str(device), "fp32"
    if dist.is_main():
        (to or Console()).print(f"[dim]device {where} · precision {how} · {torch.get_num_threads()} CPU threads · "
                      f"torch {torch.__version__}[/dim]", highlight=False)


def tracked(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while a bar counts them (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(description, total=total) as bar:
        for item in items:
            yield item
            bar.advance(1)
