"""Plain-file loggers: ``log.jsonl`` (one JSON object per record) and ``log.csv`` (one row per record).

Both are append-only files in the stage folder, written by rank 0. A crash can at worst cut the
last line; each logger ends such a line before appending.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import re

from genfw import io
from genfw.interfaces import Logger

JSONL_FILE = "log.jsonl"
CSV_FILE = "log.csv"


def _append_line(path: str, line: str) -> None:
    """Append ``line`` (ending in a newline), first ending a previous line cut by a crash."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with io.open_append(path) as f:  # never through a symbolic link
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode())


# A scalar whose tag is "step" would overwrite the record's step: it is stored as "metric/step"
# (and a tag "metric/step" as "metric/metric/step", so two tags never share a column).
_STEP_LIKE = re.compile(r"^(metric/)*step$")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")


def _tag(tag: str) -> str:
    """A scalar's tag as a key or column, one to one: never ``step``, control characters escaped
    as in Python (``\\n``, ``\\x1b``; a backslash doubled), so a record stays one line."""
    tag = re.sub("[\x00-\x1f\x7f\x85\u2028\u2029\\\\]", _escape, str(tag))
    return "metric/" + tag if _STEP_LIKE.match(tag) else tag


class JSONLines(Logger):
    """``log.jsonl``: ``{"step": n, tag: value, ...}`` per record; the report plots it.

    A resumed stage appends the steps after its last checkpoint again; readers keep the latest
    record of each step (``genfw.report.read_log`` does). Images are not stored.
    """

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        record = {"step": step, **{_tag(k): v for k, v in scalars.items()}}
        _append_line(os.path.join(self.directory, JSONL_FILE), json.dumps(record) + "\n")


class CSV(Logger):
    """``log.csv``: a header (``step`` then every tag in order of first appearance), one row per record.

    A tag first seen after rows were written widens the header (the file is rewritten, atomically);
    a record without some tag leaves its cell empty; a tag named ``step`` is the column
    ``metric/step``, control characters (newlines) in a tag are escaped (``\\n``). On resume, rows
    at or after ``start_step`` are dropped (they are about to be logged again), so each step
    appears once. Images are not stored.
    """

    def __init__(self, params=None, **construct) -> None:
        super().__init__(params, **construct)
        self.path = os.path.join(self.directory, CSV_FILE)
        self.columns: list[str] = []
        io.check_plain_file(self.path)  # read and rewritten below: never a link's target
        if os.path.exists(self.path):
            self._resume()

    def _resume(self) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or not rows[0] or rows[0][0] != "step":
            raise ValueError(f"{self.path} is not a genfw csv log (no 'step' column); move it aside")
        header, kept = rows[0], []
        for row in rows[1:]:
            if len(row) != len(header):  # a line cut by a crash
                continue
            try:
                if int(row[0]) < self.start_step:
                    kept.append(row)
            except ValueError:
                continue
        self.columns = header
        if len(kept) != len(rows) - 1:
            self._rewrite(header, kept)

    def _rewrite(self, header: list[str], rows: list[list[str]]) -> None:
        buf = _io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        io.write_text(self.path, buf.getvalue())

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        record = {"step": step, **{_tag(k): v for k, v in scalars.items()}}
        new = [k for k in record if k not in self.columns]
        if new or not os.path.exists(self.path):
            old = self.columns
            rows = []
            if old and os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    rows = [r + [""] * len(new) for r in list(csv.reader(f))[1:] if len(r) == len(old)]
            self.columns = old + new
            self._rewrite(self.columns, rows)
        buf = _io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_cell(record.get(k)) for k in self.columns])
        _append_line(self.path, buf.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)
