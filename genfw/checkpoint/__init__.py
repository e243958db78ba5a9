"""Self-describing safetensors checkpoints: models, bundles and training state, without pickle.

Every file is an ordinary ``.safetensors`` file whose header metadata holds one key, ``genfw``,
a JSON document::

    {"format_version": 1, "genfw_version": "0.1.0", "type": "model" | "bundle" | "train_state",
     "components": [{"role": "model", "kind": "prior", "name": "sundae",
                     "params": {...}, "construct": {...},
                     "dist": "genfw", "version": "0.1.0", "prefix": "model."}],
     "extra": {...}}

Loading goes registry -> pydantic params -> constructor (first on the ``meta`` device, so that a
hostile header cannot make us allocate memory before its shapes are checked against the tensors
actually in the file) -> ``load_state_dict(strict=True)``. Metadata can only name registered
components, never an import path. See docs/checkpoints.md.
"""

from genfw.checkpoint.files import (
    _DTYPES,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    Reader,
    describe,
    read,
    read_header,
    read_meta,
    save,
    save_tensors,
)
from genfw.checkpoint.rebuild import Bundle, build_checked, build_component, load
from genfw.checkpoint.state import pack, unpack
from genfw.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "MAX_HEADER_BYTES", "Bundle", "CheckpointError", "Reader", "build_checked",
           "build_component", "describe", "load", "pack", "read", "read_header", "read_meta", "save",
           "save_tensors", "unpack", "_DTYPES"]
