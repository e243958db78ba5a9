"""Helpers shared by several test modules."""

import json
import struct
from pathlib import Path


def edit_meta(path: Path, edit) -> None:
    """Rewrite a safetensors file's genfw metadata in place with ``edit(meta)``."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["genfw"])
    edit(meta)
    header["__metadata__"]["genfw"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
