"""The run directory as a place: where it may be, who holds it, and what genfw may touch in it.

* ``check_output_dir`` — a run directory is a local path (or a ``file://`` URL, turned into
  one); any other URL fails in one line before work starts.
* ``RunLock`` — one ``genfw run`` per directory: ``run.lock`` holds the PID, host and start
  time of its holder and an advisory ``flock`` that the kernel drops when the holder dies, so a
  lock left by a killed run is recognised as stale and taken over with a message.
* ``move_aside`` — a stage folder whose inputs changed is renamed to
  ``<stage>.replaced-<UTC time>``, never deleted unless the user passed ``--force``, and never
  when the recipe reads a file inside it.
* ``is_inside_stage`` — model files are never written into a run's stage folders.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
from datetime import datetime, timezone
from typing import Any

from genfw import io, limits
from genfw.config import check_expansion
from genfw.errors import ConfigError, GenfwError
from genfw.progress import console

LOCK_FILE = "run.lock"
RECIPE_FILE = "recipe.yaml"
# The first line of every recipe.yaml genfw writes: how it knows the file is its own.
RECIPE_HEADER = "# the recipe as run by genfw (written by `genfw run`; edit the original, not this copy)"
QUICK_LOOK_BYTES = 1 << 20  # fail_fast_if_locked reads a recipe only this small (recipes are kilobytes)
STAGE_FOLDERS = ("tokenizer", "latents", "samples", "evaluate")  # plus prior0, prior1, ...


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def check_output_dir(path: str) -> str:
    """The local folder of an output directory, or a one-line error for URLs runs cannot use."""
    s = os.fspath(path)
    if s.startswith("file://"):
        local = s[len("file://"):]
        if not local.startswith("/"):
            raise ConfigError(f"output directory {s}: a file:// URL needs an absolute path (file:///abs/path)")
        return local
    if "://" in s:
        raise ConfigError(
            f"output directory {s}: a run directory must be a local path or a file:// URL (recipes, data and "
            "model files may be URLs; runs are written locally, copy the finished folder where you need it)"
        )
    return s


# --------------------------------------------------------------------------------------------
# the lock


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]  # a zombie has finished
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, proc_start: str | None = None) -> bool:
    """Whether process ``pid`` on this host still runs (and is the one that started at ``proc_start``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if os.path.exists(f"/proc/{pid}"):
        now = _proc_start(pid)
        if now is None:
            return False  # a zombie
        if proc_start is not None and now != proc_start:
            return False  # the PID was reused by another process
    return True


def holder_info(raw: object) -> dict:
    """A lock file's JSON as a holder record: a dict whose ``pid`` is a plausible PID or None.

    The file may hold anything (a crash, a hostile edit): 0 and negative PIDs would name process
    groups to ``os.kill``, and a PID beyond the kernel's range cannot be a live process.
    """
    info = dict(raw) if isinstance(raw, dict) else {}
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        info["pid"] = None
    return info
def _printable(value: object, limit: int = 300) -> str:
    """A string from a lock file made safe to print: control and escape bytes shown as escapes."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_holder(info: dict) -> str:
    return (f"PID {_printable(info.get('pid', '?'))} on host {_printable(info.get('host', '?'))} "
            f"(started {_printable(info.get('started', '?'))}"
            + (f": {_printable(info['command'])}" if info.get("command") else "") + ")")


class RunLock:
    """An exclusive lock on one run directory; use as a context manager or acquire/release."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: int | None = None

    def _read(self) -> dict:
        try:
            fd = io.open_fd(self.path, os.O_RDONLY)
        except (OSError, GenfwError):
            return {}
        try:
            return holder_info(json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}"))
        except (OSError, ValueError, RecursionError):
            return {}
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock or fail in one line naming the holder; a dead holder's lock is taken over."""
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(20):  # retried only when the lock file was replaced under us
            fd = io.open_fd(self.path, os.O_RDWR | os.O_CREAT)  # never through a link
            try:
                locked = self._flock(fd)
                if locked and os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)  # the holder released (removed) it meanwhile: try the new file
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            holder = self._read()
            if not locked:
                os.close(fd)
                raise GenfwError(in_use_message(self.folder, holder))
            pid = holder.get("pid")
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and pid != os.getpid():
                if holder.get("host") != socket.gethostname():
                    os.close(fd)
                    raise GenfwError(
                        f"run directory {self.folder} is locked by {describe_holder(holder)}, another host: if that "
                        f"run has ended, delete {self.path}"
                    )
                if pid_alive(pid, holder.get("proc_start")):
                    os.close(fd)  # alive, but its flock is gone: a reused PID, or a filesystem without flock
                    raise GenfwError(
                        f"run directory {self.folder} is locked by {describe_holder(holder)}, which still runs but "
                        "does not hold the lock: if no genfw run uses this directory, the PID was reused by another "
                        f"process; delete {self.path} and run again")
                from rich.markup import escape

                console.print(f"[yellow]•[/yellow] taking over the lock of {escape(describe_holder(holder))}, "
                              "which is no longer running")
            info = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise GenfwError(f"cannot lock run directory {self.folder}: {self.path} keeps changing")

    @staticmethod
    def _flock(fd: int) -> bool:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:  # a filesystem without flock: the PID check decides
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return True
            raise

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiting process then makes a new file
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_if_running(folder: str) -> dict | None:
    """The holder of a run directory's lock if a live process holds it (for readers mid-run)."""
    path = os.path.join(folder, LOCK_FILE)
    if not os.path.exists(path):
        return None
    try:
        import fcntl

        fd = io.open_fd(path, os.O_RDONLY)
    except (OSError, GenfwError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # nobody holds it
        except BlockingIOError:
            pass
        try:
            return holder_info(json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}"))
        except (ValueError, RecursionError):
            return {}
    finally:
        os.close(fd)


def in_use_message(folder: str, holder: dict) -> str:
    return (f"run directory {folder} is in use by {describe_holder(holder)}: wait for it to finish or stop it; "
            "one genfw run per directory")


def fail_fast_if_locked(recipe: str, overrides: list[str] | None, output_dir: str | None) -> None:
    """Before anything heavy is imported: fail when a live run holds the directory this run would use.

    Only a quick look (the recipe's ``output_dir``/``name`` as YAML); the lock itself is taken
    later, after validation, and decides.
    """
    try:
        target = output_dir
        if target is None:
            import yaml

            if io.is_local(recipe) and os.path.getsize(io.local_path(recipe)) > QUICK_LOOK_BYTES:
                return  # too large for a quick look: validation bounds it (GENFW_MAX_RECIPE_BYTES)
            raw = yaml.safe_load(io.read_bytes(recipe).decode("utf-8")) or {}
            for item in overrides or []:
                key, _, value = item.partition("=")
                if key.strip() in ("output_dir", "name"):
                    raw[key.strip()] = yaml.safe_load(value)
            target = raw.get("output_dir") or os.path.join("runs", str(raw["name"]))
        folder = check_output_dir(str(target))
    except Exception:  # noqa: BLE001 - validation will say what is wrong
        return
    holder = holder_if_running(folder)
    if holder is not None:
        raise GenfwError(in_use_message(folder, holder))


# --------------------------------------------------------------------------------------------
# what genfw may touch


def read_recipe_yaml(path: str) -> Any:
    """A run directory's ``recipe.yaml``, parsed; bounded like a command-line recipe (its size is
    checked before parsing, and its values once aliases are expanded)."""
    import yaml

    limits.check("recipe_bytes", os.path.getsize(path), f"{path}: its size", " bytes")
    with open(path, "rb") as f:
        raw = yaml.safe_load(f)
    check_expansion(raw, path)
    return raw


def recipe_is_ours(folder: str) -> bool:
    """Whether ``folder/recipe.yaml`` (if any) was written by genfw (older runs: stage.json next to it)."""
    path = os.path.join(folder, RECIPE_FILE)
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.readline().rstrip("\n") == RECIPE_HEADER:
            return True
    return os.path.exists(os.path.join(folder, "tokenizer", "stage.json"))


def inside(path: str, folder: str) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_reads(folder: str, force: bool, reads: list[tuple[str, str]]) -> None:
    """Fail when a file the recipe reads ((recipe key, path) pairs) lies inside ``folder``."""
    for key, path in reads:
        if path and io.is_local(path) and inside(io.local_path(path), folder):
            raise ConfigError(
                f"{key} {path} lies inside {folder}, whose inputs changed so that it would be "
                f"{'deleted' if force else 'moved aside'}: copy the file out of the run directory and point {key} "
                "at the copy (or use another --output-dir)"
            )


def move_aside(folder: str, force: bool, reads: list[tuple[str, str]]) -> str | None:
    """Rename ``folder`` to ``folder.replaced-<UTC time>`` (or delete it with ``force``).

    Nothing happens if a file the recipe reads lies inside (see ``check_reads``). Returns the
    new name (None when deleted or absent).
    """
    check_reads(folder, force, reads)
    if not os.path.lexists(folder):
        return None
    if force:
        if os.path.islink(folder) or not os.path.isdir(folder):
            os.unlink(folder)
        else:
            shutil.rmtree(folder)
        return None
    base = f"{folder.rstrip(os.sep)}.replaced-{utc_stamp()}"
    target, k = base, 2
    while os.path.lexists(target):
        target, k = f"{base}-{k}", k + 1
    os.rename(folder, target)
    return target


def is_inside_stage(target: str) -> str | None:
    """The run directory when ``target`` would land inside one of its stage folders, else None."""
    if not io.is_local(target):
        return None
    path = os.path.realpath(io.local_path(target))
    parent = os.path.dirname(path)
    while True:
        folder, name = os.path.dirname(parent), os.path.basename(parent)
        stage_like = name in STAGE_FOLDERS or (name.startswith("prior") and name[5:].isdigit()) or ".replaced-" in name
        if stage_like and (os.path.exists(os.path.join(folder, RECIPE_FILE))
                           or os.path.exists(os.path.join(parent, "stage.json"))):
            return folder
        if folder == parent:
            return None
        parent = folder


def check_write_target(target: str | os.PathLike, overwrite: bool, what: str = "file") -> None:
    """The one check before any command writes a file the user named (``-o``, ``--grid``, ...).

    Refused: a path inside a run's stage folders (genfw writes those itself), a symbolic link
    (dangling or not: genfw never writes through one), a directory, and an existing file
    without ``--overwrite``. Files are then written atomically (``genfw.io.write_bytes``).
    """
    target = os.fspath(target)
    run = is_inside_stage(target)
    if run is not None:
        raise ConfigError(f"{target} lies inside the stage folders of the run directory {run}: genfw writes "
                          f"those itself; write the {what} somewhere else")
    if io.is_local(target):
        local = io.local_path(target)
        if os.path.islink(local):
            raise ConfigError(f"{target} is a symbolic link: genfw never writes through one; remove the link or "
                              "choose another path")
        if os.path.isdir(local):
            raise ConfigError(f"{target} is a directory: give the path of the {what} to write (a file name)")
    if not overwrite and io.exists(target):
        raise ConfigError(f"{target} already exists: pass --overwrite to replace it, or choose another path")


