"""Progress on stderr: rich bars (count, time left, the current losses) on a terminal, plain lines in a file.

When stderr is not a terminal (a scheduler's log file, a pipe), each bar is one plain line when
it starts, then one every ``GENFW_PROGRESS_EVERY`` seconds (default 60) with the count, rate,
elapsed time, ETA and the last values (losses), and one when it finishes. Set
``GENFW_PROGRESS=0`` to silence both (CI logs); they are also off on non-main ranks.
"""

from __future__ import annotations

import os
import sys
import time
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


DEFAULT_EVERY = 60.0  # seconds between plain progress lines


def plain_every() -> float:
    """``GENFW_PROGRESS_EVERY`` in seconds (a positive number; anything else means the default, 60)."""
    text = os.environ.get("GENFW_PROGRESS_EVERY", "").strip()
    try:
        value = float(text) if text else DEFAULT_EVERY
    except ValueError:
        return DEFAULT_EVERY
    return value if value > 0 and value == value else DEFAULT_EVERY


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _PlainBar(_Bar):
    """Progress as plain lines for a log file: at the start, every ``every`` seconds, at the end."""

    def __init__(self, description: str, total: int | None, completed: int = 0, every: float = DEFAULT_EVERY,
                 unit: str = "", clock=time.monotonic) -> None:
        super().__init__(None, None)
        self.description, self.total, self.first, self.done = description, total, completed, completed
        self.unit = unit
        self.every, self.clock, self.fields = every, clock, {}
        self.t0 = clock()
        self.next = self.t0 + every
        of = f" of {total:,}" if total else ""
        self._write(f"{description}: started at {unit + ' ' if unit else ''}{completed:,}{of}")

    def _write(self, line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def status(self, now: float, finished: bool = False) -> str:
        elapsed = now - self.t0
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        count = f"{self.done:,}/{self.total:,} ({100 * self.done / self.total:.1f}%)" if self.total else f"{self.done:,}"
        parts = [f"{self.unit} {count}" if self.unit else count, f"{rate:.3g} {self.unit or 'item'}s/s",
                 f"elapsed {_duration(elapsed)}"]
        if self.total and rate > 0 and not finished:
            parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        parts += [f"{k} {v:.4g}" for k, v in self.fields.items()]
        return f"{self.description}: {'finished, ' if finished else ''}" + ", ".join(parts)

    def _tick(self) -> None:
        now = self.clock()
        if now >= self.next:
            self._write(self.status(now))
            self.next = now + self.every

    def update(self, completed: int, **fields: float) -> None:
        self.done, self.fields = completed, fields
        self._tick()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._tick()

    def note(self, text: str) -> None:
        self._write(f"{self.description}: {text}")

    def finish(self) -> None:
        self._write(self.status(self.clock(), finished=True))


@contextmanager
def progress_bar(description: str, total: int | None, completed: int = 0, unit: str = "") -> Iterator[_Bar]:
    """A bar for ``total`` units of work (plain lines when stderr is not a terminal, counting
    ``unit``s, e.g. "step"), or a no-op when progress output is off."""
    if not enabled():
        yield _Bar(None, None)
        return
    if not console.is_terminal:
        bar = _PlainBar(description, total, completed, plain_every(), unit)
        yield bar
        bar.finish()  # not after an error: the error says what happened
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
