"""Safetensors checkpoints: identical round-trips, clear errors for bad files, no pickle anywhere."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import edit_meta

import genfw
from genfw import checkpoint
from genfw.errors import CheckpointError, PluginError
from genfw.registry import build


@pytest.fixture
def tokenizer():
    return build("tokenizer", "pixels", {"levels": 16}, channels=1, resolution=[8, 8])


@pytest.fixture
def prior():
    return build("prior", "sundae", {}, codebook_size=8, grid=[4, 4], num_classes=3, context=[],
                 backbone={"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}})


def test_roundtrip_gives_bitwise_identical_outputs(tmp_path, prior):
    path = tmp_path / "prior.safetensors"
    genfw.save(path, prior)
    loaded = genfw.load(path)
    assert type(loaded) is type(prior) and loaded.params == prior.params and loaded.construct == prior.construct
    tokens = torch.randint(0, 8, (2, 4, 4))
    labels = torch.tensor([0, 2])
    prior.eval()
    with torch.no_grad():
        assert torch.equal(prior.backbone(tokens, labels=labels), loaded.backbone(tokens, labels=labels))


def test_bundle_roundtrip(tmp_path, tokenizer, prior):
    path = tmp_path / "bundle.safetensors"
    genfw.save(path, {"tokenizer": tokenizer, "prior.0": prior}, extra={"class_names": ["a", "b", "c"]})
    bundle = genfw.load(path)
    assert isinstance(bundle, checkpoint.Bundle)
    assert bundle.extra["class_names"] == ["a", "b", "c"] and len(bundle.priors) == 1
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    assert torch.equal(bundle.tokenizer.encode(x)[0], tokenizer.encode(x)[0])


def test_fsspec_memory_url_roundtrip(prior):
    genfw.save("memory://ckpt/prior.safetensors", prior)
    assert genfw.load("memory://ckpt/prior.safetensors").construct == prior.construct


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def test_truncated_file(tmp_path, prior):
    path = tmp_path / "p.safetensors"
    genfw.save(path, prior)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        genfw.load(path)
    _one_line(e.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am a text file and not a checkpoint at all")
    with pytest.raises(CheckpointError) as e:
        genfw.load(path)
    _one_line(e.value)


def test_corrupted_header(tmp_path, prior):
    path = tmp_path / "p.safetensors"
    genfw.save(path, prior)
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        genfw.load(path)




def test_edited_metadata_not_matching_tensors(tmp_path, prior):
    path = tmp_path / "p.safetensors"
    genfw.save(path, prior)
    edit_meta(path, lambda m: m["components"][0]["construct"].__setitem__("codebook_size", 99))
    with pytest.raises(CheckpointError, match="shape") as e:
        genfw.load(path)
    _one_line(e.value)


def test_newer_format_and_missing_plugin(tmp_path, prior):
    path = tmp_path / "p.safetensors"
    genfw.save(path, prior)
    edit_meta(path, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(CheckpointError, match="newer"):
        genfw.load(path)
    genfw.save(path, prior)

    def foreign(m):
        m["components"][0].update(name="muse", dist="genfw-muse", version="0.3")

    edit_meta(path, foreign)
    with pytest.raises(PluginError, match="pip install genfw-muse"):
        genfw.load(path)


def test_metadata_cannot_name_import_paths(tmp_path, prior):
    path = tmp_path / "p.safetensors"
    genfw.save(path, prior)
    edit_meta(path, lambda m: m["components"][0].update(name="os:system"))
    with pytest.raises(PluginError, match="unknown prior 'os:system'|needs prior 'os:system'"):
        genfw.load(path)


def test_cli_errors_are_one_red_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    result = subprocess.run([sys.executable, "-m", "genfw", "inspect", str(bad)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error:")


def test_cli_inspect_prints_metadata(tmp_path, prior):
    path = tmp_path / "p.safetensors"
    genfw.save(path, prior)
    result = subprocess.run([sys.executable, "-m", "genfw", "inspect", str(path), "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    (comp,) = info["components"]
    assert comp["name"] == "sundae" and comp["parameters"] == sum(p.numel() for p in prior.parameters())


def test_pack_unpack_keeps_key_types_and_tuples():
    tree = {"state": {0: {"exp_avg": torch.ones(2)}}, "groups": [{"betas": (0.9, 0.99), "params": [0, 1]}], "x": None}
    meta, tensors = checkpoint.pack(tree)
    back = checkpoint.unpack(json.loads(json.dumps(meta)), tensors)
    assert list(back["state"]) == [0] and back["groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["state"][0]["exp_avg"], torch.ones(2))


# The only places allowed to unpickle, and only with the restricted weights_only unpickler:
# converting a user's own checkpoints (taming-transformers and the papers' converters, all through
# genfw.convert.read_torch_file), and pre-checking a user's Inception
# weights file before torch-fidelity (which itself unpickles it) sees it. See docs/errors.md.
ALLOWED_TORCH_LOAD = {"genfw/metrics/features.py", "genfw/convert.py"}


def test_no_pickle_based_loading_in_source():
    root = Path(__file__).parents[1]
    offenders = []
    for path in list((root / "genfw").rglob("*.py")) + list((root / "plugins").rglob("*.py")):
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib") for n in names):
                    offenders.append(f"{rel}:{node.lineno} imports a pickle module")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not (safe and rel in ALLOWED_TORCH_LOAD):
                    offenders.append(f"{rel}:{node.lineno} calls torch.load")
    assert not offenders, offenders


def test_hostile_sizes_in_metadata_fail_before_allocating(tmp_path, prior):
    """A header claiming a 100000x100000 grid must be rejected by the meta-device build."""
    path = tmp_path / "p.safetensors"
    genfw.save(path, prior)
    edit_meta(path, lambda m: m["components"][0]["construct"].__setitem__("grid", [100000, 100000]))
    code = (
        "import resource, genfw, genfw.checkpoint, genfw_sundae.sundae, genfw_transformer.transformer\n"
        "from genfw.errors import CheckpointError\n"
        "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "limit = size + (2 << 30)  # 2 GiB more than the imports need: a real build (640 GB) would fail\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        f"try:\n    genfw.load({str(path)!r})\nexcept CheckpointError as e:\n    print('rejected:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rejected:" in result.stdout and ("shape" in result.stdout or "limit" in result.stdout)
