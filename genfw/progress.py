"""Progress bars on stderr (rich): bar, count, time left and the current loss.

Set ``GENFW_PROGRESS=0`` to silence them (CI logs); they are also off on non-main ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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
