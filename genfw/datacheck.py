"""Every image of a dataset decoded once before training, so that a bad file stops the run at once.

Without this, a corrupt image in the held-out split surfaces at latent extraction, after the
tokenizer has trained for hours. The check decodes every file exactly as training will (the
dataset's own ``__getitem__``: read, decode, convert, resize), in parallel threads (decoding
releases the GIL), with a progress bar. Files that passed are remembered in the run directory by
fingerprint (size and modification time; the ETag or checksum where a remote store gives one),
so a rerun checks only new or changed files. Datasets that are not image folders (``synthetic``,
``mnist``) have nothing to check.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from genfw import io
from genfw.data import ImageFolder
from genfw.errors import DataError
from genfw.progress import progress_bar

CACHE_FILE = "datacheck.json"
CACHE_VERSION = 1


def file_fingerprint(fs: Any, name: str) -> str:
    """What changes when a file is replaced: size and mtime locally, size and ETag/mtime remotely."""
    if io.is_local(name) and os.path.exists(name):
        st = os.stat(name)
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    info = fs.info(name)
    stamp = next((info[k] for k in ("ETag", "etag", "md5Hash", "checksum", "mtime", "LastModified", "last_modified",
                                    "date_time", "crc") if info.get(k) is not None), "")
    return f"{info.get('size')}:{stamp}"


def _read_cache(path: str, key: str) -> dict[str, str]:
    try:
        cache = io.read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION or cache.get("key") != key:
        return {}
    files = cache.get("files")
    return {k: v for k, v in files.items() if isinstance(v, str)} if isinstance(files, dict) else {}


def check_images(dataset: Any, cache_path: str | None = None, workers: int | None = None) -> dict[str, int]:
    """Decode every image of ``dataset`` that is not in the cache; one line naming the first bad one.

    Returns counts: ``images``, ``checked`` (decoded now) and ``cached`` (known good).
    """
    if not isinstance(dataset, ImageFolder):
        return {"images": 0, "checked": 0, "cached": 0}
    fs, files, _, _ = dataset._index
    # what a file is checked for: decoding, and conversion to this resolution and channel count
    key = json.dumps([dataset.resolution, dataset.channels])
    known = _read_cache(cache_path, key) if cache_path else {}
    prints: dict[int, str] = {}
    todo = []
    for i, name in enumerate(files):
        try:
            prints[i] = file_fingerprint(fs, name)
        except OSError:
            prints[i] = ""
        if not prints[i] or known.get(name) != prints[i]:
            todo.append(i)
    good: dict[str, str] = {name: known[name] for i, name in enumerate(files) if i not in set(todo)}
    bad: list[tuple[int, str]] = []

    def check(i: int) -> tuple[int, str | None]:
        try:
            dataset[i]
        except DataError as e:
            return i, str(e)
        return i, None

    workers = workers or min(32, os.cpu_count() or 1)
    with progress_bar("checking images", total=len(todo)) as bar, ThreadPoolExecutor(workers) as pool:
        for i, problem in pool.map(check, todo):
            if problem is None:
                if prints[i]:
                    good[files[i]] = prints[i]
            else:
                bad.append((i, problem))
            bar.advance(1)
    if cache_path:  # remember the good ones even when some are bad: a rerun after a fix is quick
        io.write_json(cache_path, {"version": CACHE_VERSION, "key": key, "files": good})
    if bad:
        bad.sort()
        more = f" ({len(bad) - 1} more of the {len(files)} images are bad too)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][1]}{more}")
    return {"images": len(files), "checked": len(todo), "cached": len(files) - len(todo)}
