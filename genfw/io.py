"""File access through fsspec, with atomic writes for local paths."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import typing
from pathlib import Path
from typing import Any

import fsspec

from genfw.errors import GenfwError


def is_local(path: str | os.PathLike) -> bool:
    """True for plain paths and ``file://`` URLs."""
    s = os.fspath(path)
    return "://" not in s or s.startswith("file://")


def local_path(path: str | os.PathLike) -> Path:
    s = os.fspath(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def backend_error(path: str | os.PathLike, e: Exception) -> GenfwError:
    """A missing fsspec backend or an unknown protocol, as one line saying what to install."""
    url = os.fspath(path)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if isinstance(e, ImportError):
        return GenfwError(f"cannot open {url}: the fsspec backend for '{protocol}://' is not installed ({e})")
    return GenfwError(f"cannot open {url}: {e} (is the URL right, and its fsspec backend installed?)")


def open_error(path: str | os.PathLike, e: BaseException) -> GenfwError:
    """Any failure to open a URL (no backend, unknown protocol, a corrupt ``zip://`` archive) as one line."""
    if isinstance(e, GenfwError):
        return e
    if isinstance(e, (ImportError, ValueError)):
        return backend_error(path, e)
    return GenfwError(f"cannot open {os.fspath(path)}: {type(e).__name__}: {e} "
                      "(is the archive complete and of the format its URL says?)")


def url_errors() -> tuple[type[BaseException], ...]:
    """What opening an fsspec URL may raise besides a missing file: no backend, an unknown protocol,
    or a backend's own errors (a corrupt archive behind ``zip://`` raises BadZipFile, not OSError)."""
    import tarfile
    import zipfile

    return (ImportError, ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, tarfile.TarError)


# ``.{name}.{8 random characters}.tmp``: what ``tempfile.mkstemp`` makes for ``write_bytes``
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` would give a new file (mkstemp gives 0600)."""
    try:
        with open("/proc/self/status") as f:  # reads the umask without changing it (Linux)
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return 0o666 & ~mask


def remove_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files an interrupted ``write_bytes`` left under ``folder``.

    Only names of genfw's own pattern are touched; call it only while no other genfw process
    writes there (a run holds its directory's lock). Returns the removed paths.
    """
    removed = []
    for root, _dirs, files in os.walk(os.fspath(folder)):
        for name in files:
            if TEMP_NAME.match(name):
                path = os.path.join(root, name)
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


def open_fd(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` for files genfw writes in place (locks, append-only logs): never through a link.

    The last component is opened with ``O_NOFOLLOW`` (a symbolic link, dangling or not, is
    refused instead of writing to its target) and must be a regular file (a FIFO or device is
    refused, not waited on). Every such open in a run directory goes through here.
    """
    path = os.fspath(path)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | nofollow | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if os.path.islink(path):  # ELOOP (Linux) or EMLINK (BSD): O_NOFOLLOW refused the link
            raise GenfwError(f"{path} is a symbolic link: genfw never writes through one (its target would be "
                             "overwritten); remove the link") from None
        if e.errno in (errno.ENXIO, errno.EWOULDBLOCK):  # a FIFO without a reader
            raise GenfwError(f"{path} is not a regular file: remove it (genfw writes a plain file there)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GenfwError(f"{path} is not a regular file: remove it (genfw writes a plain file there)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def open_append(path: str | os.PathLike) -> typing.BinaryIO:
    """An append-only file (created if absent) opened through :func:`open_fd`, readable too."""
    return os.fdopen(open_fd(path, os.O_RDWR | os.O_APPEND | os.O_CREAT), "ab+")


def check_plain_file(path: str | os.PathLike) -> None:
    """Fail now, before work, where :func:`open_fd` would later refuse ``path`` (absent is fine)."""
    path = os.fspath(path)
    if os.path.islink(path):
        raise GenfwError(f"{path} is a symbolic link: genfw never writes through one (its target would be "
                         "overwritten); remove the link")
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise GenfwError(f"{path} is not a regular file: remove it (genfw writes a plain file there)")


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a whole file from a local path or any fsspec URL."""
    try:
        f = fsspec.open(os.fspath(path), "rb").open()
    except (ImportError, ValueError) as e:
        raise backend_error(path, e) from None
    with f:
        return f.read()


def exists(path: str | os.PathLike) -> bool:
    try:
        fs, p = fsspec.core.url_to_fs(os.fspath(path))
    except (ImportError, ValueError) as e:
        raise backend_error(path, e) from None
    return fs.exists(p)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename.

    A crash (or a full disk) never leaves a half-written file where a good one was. Remote
    fsspec targets are written in one ``put`` of the whole buffer.
    """
    if not is_local(path):
        try:
            f = fsspec.open(os.fspath(path), "wb").open()
        except (ImportError, ValueError) as e:
            raise backend_error(path, e) from None
        with f:
            f.write(data)
        return
    target = local_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, file_mode())  # as any new file would get, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))
