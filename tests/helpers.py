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


class FastCliRunner:
    """typer's CliRunner, but the click command is built once (typer rebuilds it per call, ~90 ms)."""

    _command = None

    def invoke(self, app, args, **kwargs):
        import typer.main
        import typer.testing

        if FastCliRunner._command is None:
            FastCliRunner._command = typer.main.get_command(app)
        real = typer.testing._get_command
        typer.testing._get_command = lambda _: FastCliRunner._command
        try:
            return typer.testing.CliRunner().invoke(app, args, **kwargs)
        finally:
            typer.testing._get_command = real


# The smallest complete recipe (pixels tokenizer, 1-layer SUNDAE): seconds to run end to end.
TINY_RECIPE = {
    "name": "tiny",
    "data": {"name": "synthetic", "params": {"size": 24, "resolution": 4, "num_classes": 2}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 2},
              "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
    "train": {"prior": {"steps": 3, "batch_size": 4}},
    "latents": {"holdout": 0.25},
    "sample": {"n": 4, "batch_size": 4, "params": {"steps": 3, "min_steps": 1}},
    "evaluate": {"metrics": ["nll"]},
}
