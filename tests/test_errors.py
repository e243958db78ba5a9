"""The bad-input table: every case gives a one-line error, a non-zero exit, and damages nothing.

docs/errors.md lists the same cases with their messages; keep the two in sync.
"""

import errno
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import genfw
from genfw import io as genfw_io
from genfw.cli import app

TINY = {
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


def write_recipe(folder: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def images_folder(folder: Path, n: int = 3, size: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def folder_recipe(path: Path, **params) -> dict:
    return {**TINY, "data": {"name": "folder", "params": {"path": str(path), "resolution": 4, "channels": 1, **params}}}


def edit_meta(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["genfw"])
    edit(meta)
    header["__metadata__"]["genfw"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run and its exported bundle."""
    root = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(root, TINY, "tiny.yaml")
    result = CliRunner().invoke(app, ["run", str(recipe), "--output-dir", str(root / "run")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["export", str(root / "run"), "-o", str(root / "bundle.safetensors")])
    assert result.exit_code == 0, result.output
    genfw.save(root / "prior.safetensors", genfw.load(root / "run" / "prior0" / "model.safetensors"))
    return root


# Each case: (id, setup(tmp, finished) -> (argv, protected paths), expected message fragment, exit code)
def _recipe_case(recipe_or_text, *extra):
    def setup(tmp, fin):
        path = tmp / "r.yaml"
        if isinstance(recipe_or_text, str):
            path.write_text(recipe_or_text)
        else:
            path.write_text(yaml.safe_dump(recipe_or_text))
        return ["validate", str(path), *extra], []
    return setup


def _run_case(make_recipe, *extra):
    def setup(tmp, fin):
        path = write_recipe(tmp, make_recipe(tmp))
        return ["run", str(path), "--output-dir", str(tmp / "run"), *extra], []
    return setup


def _ckpt_case(corrupt):
    def setup(tmp, fin):
        path = tmp / "p.safetensors"
        path.write_bytes((fin / "prior.safetensors").read_bytes())
        corrupt(path)
        # inspect reads the header; sample rebuilds the model (and must fail before anything else)
        command = "inspect" if corrupt.__name__ in ("truncate", "garbage", "header") else "sample"
        return [command, str(path)], [path]
    return setup


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path):
    path.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 4)


def header(path):
    data = bytearray(path.read_bytes())
    data[12:30] = b"\xff" * 18
    path.write_bytes(bytes(data))


def wrong_shapes(path):
    edit_meta(path, lambda m: m["components"][0]["construct"].__setitem__("codebook_size", 99))


def newer(path):
    edit_meta(path, lambda m: m.__setitem__("format_version", 99))


def foreign_plugin(path):
    edit_meta(path, lambda m: m["components"][0].update(name="maskgit", dist="genfw-maskgit", version="0.3"))


def _mixed_recipe(tmp):
    return {**TINY, "sample": {"n": 2}, "prior": {"name": "autoregressive",
                              "backbone": {"name": "hourglass", "params": {"dim": 16, "depth": [1, 1, 1]}}}}


def _files_case(make_folder, **params):
    def setup(tmp, fin):
        folder = make_folder(tmp / "data")
        path = write_recipe(tmp, folder_recipe(folder, **params))
        return ["run", str(path), "--output-dir", str(tmp / "run")], []
    return setup


def corrupt_image(folder):
    images_folder(folder)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return folder


def zero_byte(folder):
    images_folder(folder)
    (folder / "empty.png").write_bytes(b"")
    return folder


def empty_folder(folder):
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("no images here")
    return folder


def _other_recipe_run(tmp, fin):
    other = write_recipe(tmp, {**TINY, "name": "other"})
    return ["run", str(other), "--output-dir", str(fin / "run")], [fin / "run" / "prior0" / "model.safetensors"]


def _mask_case(tmp, fin):
    sample = sorted((fin / "run" / "samples").glob("00000_*.png"))[0]
    Image.fromarray(np.zeros((3, 7), dtype=np.uint8)).save(tmp / "mask.png")
    return ["inpaint", str(fin / "bundle.safetensors"), "--image", str(sample), "--mask", str(tmp / "mask.png")], []


def _empty_mask_case(tmp, fin):
    sample = sorted((fin / "run" / "samples").glob("00000_*.png"))[0]
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp / "mask.png")
    return ["inpaint", str(fin / "bundle.safetensors"), "--image", str(sample), "--mask", str(tmp / "mask.png")], []


CASES = [
    ("malformed-yaml", _recipe_case("name: x\nprior: [unclosed\n"), "malformed YAML at line", 2),
    ("recipe-missing", lambda tmp, fin: (["validate", str(tmp / "nope.yaml")], []), "recipe not found", 2),
    ("recipe-not-mapping", _recipe_case("- just\n- a list\n"), "must be a YAML mapping", 2),
    ("missing-section", _recipe_case({k: v for k, v in TINY.items() if k != "tokenizer"}),
     "tokenizer: required key missing", 2),
    ("unknown-prior", _recipe_case(TINY, "--set", "prior.name=sundea"), "unknown prior 'sundea'; registered priors:", 1),
    ("unknown-backbone", _recipe_case(TINY, "--set", "prior.backbone.name=resnet"), "unknown backbone 'resnet'", 1),
    ("unknown-dataset", _recipe_case(TINY, "--set", "data.name=imagenet"), "unknown dataset 'imagenet'", 1),
    ("misspelt-param", _recipe_case(TINY, "--set", "prior.backbone.params.dimm=8"),
     "prior.backbone.params.dimm: unknown key", 2),
    ("out-of-range-param", _recipe_case(TINY, "--set", "tokenizer.params.levels=1"), "tokenizer.params.levels", 2),
    ("wrong-type-param", _recipe_case(TINY, "--set", "train.prior.batch_size=many"), "train.prior.batch_size", 2),
    ("set-unknown-key", _recipe_case(TINY, "--set", "train.prior.stepz=3"), "train.prior.stepz: unknown key", 2),
    ("set-without-value", _recipe_case(TINY, "--set", "train.prior.steps"), "expects key.path=value", 2),
    ("sampler-typo", _recipe_case(TINY, "--set", "sample.params.temprature=0.5"),
     "sample.params.temprature: unknown key", 2),
    ("ar-on-2d-hourglass", _run_case(_mixed_recipe), "needs a causal backbone", 2),
    ("dataset-missing", _run_case(lambda tmp: folder_recipe(tmp / "nowhere")), "dataset path does not exist", 1),
    ("dataset-empty", _files_case(empty_folder), "no images", 1),
    ("corrupt-image", _files_case(corrupt_image), "corrupt or unreadable image", 1),
    ("zero-byte-image", _files_case(zero_byte), "zero-byte", 1),
    ("resolution-not-divisible", _run_case(lambda tmp: {**folder_recipe(images_folder(tmp / "d"), resolution=10),
                                                        "tokenizer": {"name": "vqvae", "params": {"factor": 4}}}),
     "not divisible", 2),
    ("checkpoint-truncated", _ckpt_case(truncate), "truncated", 1),
    ("checkpoint-not-safetensors", _ckpt_case(garbage), "not a valid safetensors file", 1),
    ("checkpoint-corrupt-header", _ckpt_case(header), "corrupt", 1),
    ("checkpoint-shapes-mismatch", _ckpt_case(wrong_shapes), "has shape", 1),
    ("checkpoint-newer-format", _ckpt_case(newer), "newer than this genfw", 1),
    ("checkpoint-needs-plugin", _ckpt_case(foreign_plugin), "pip install genfw-maskgit", 1),
    ("model-is-not-a-bundle", lambda tmp, fin: (["sample", str(fin / "prior.safetensors")], []),
     "not a pipeline bundle", 1),
    ("run-dir-of-other-recipe", _other_recipe_run, "belongs to recipe 'tiny'", 2),
    ("label-out-of-range", lambda tmp, fin: (["sample", str(fin / "bundle.safetensors"), "--label", "7",
                                              "--out", str(tmp / "s")], []), "out of range", 2),
    ("inpaint-mask-wrong-size", _mask_case, "mask", 2),
    ("inpaint-mask-empty", _empty_mask_case, "selects no pixels", 2),
    ("unknown-stage", lambda tmp, fin: (["run", str(write_recipe(tmp, TINY)), "--stages", "train",
                                         "--output-dir", str(tmp / "run")], []),
     "unknown stage", 2),
    ("cuda-unavailable", lambda tmp, fin: (["sample", str(fin / "bundle.safetensors"), "--device", "cuda"], []),
     "CUDA is not available", 2),
    ("not-a-run-dir", lambda tmp, fin: (["export", str(tmp), "-o", str(tmp / "x.safetensors")], []),
     "not a finished genfw run directory", 1),
]


def _digest(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).exists()}


@pytest.mark.parametrize(("setup", "fragment", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(setup, fragment, code, tmp_path, finished):
    argv, protected = setup(tmp_path, finished)
    before = _digest(protected)
    result = CliRunner().invoke(app, argv)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _digest(protected) == before, "a file that existed before was changed"


def test_table_has_at_least_25_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_docs_list_every_case():
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
    assert not missing, f"docs/errors.md lacks {missing}"


def test_disk_full_keeps_the_old_file(tmp_path, finished, monkeypatch):
    target = tmp_path / "bundle.safetensors"
    target.write_bytes((finished / "bundle.safetensors").read_bytes())
    before = _digest([target])
    real_fdopen = genfw_io.os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(genfw_io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    result = CliRunner().invoke(app, ["export", str(finished / "run"), "-o", str(target)])
    assert result.exit_code == 1 and "disk full" in result.output and "Traceback" not in result.output
    assert _digest([target]) == before
    assert not list(tmp_path.glob(".bundle.safetensors.*")), "temporary file left behind"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import genfw_sundae.sundae as sundae

    recipe = write_recipe(tmp_path, {**TINY, "train": {"prior": {"steps": 6, "batch_size": 4, "checkpoint_every": 2}}})
    real_loss = sundae.Sundae.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_loss(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 5:
            out.losses["main"] = out.losses["main"] * float("nan")
        return out

    monkeypatch.setattr(sundae.Sundae, "loss", poisoned)
    result = CliRunner().invoke(app, ["run", str(recipe), "--output-dir", str(tmp_path / "run")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and "is nan at step 4" in lines[-1] and "last good checkpoint" in lines[-1]
    from genfw import checkpoint

    tensors, meta = checkpoint.read(tmp_path / "run" / "prior0" / "train_state.safetensors")
    assert checkpoint.unpack(meta["tree"], tensors)["step"] == 4


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "RGBA", "LA", "P"])
def test_odd_image_modes_load(tmp_path, mode):
    folder = tmp_path / "imgs"
    folder.mkdir()
    arr = np.zeros((6, 10), dtype=np.uint8)
    arr[:, 5:] = 255
    base = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)
    elif mode == "P":
        img = base.convert("RGB").convert("P")
    else:
        img = base.convert(mode)
    img.save(folder / ("x.jpg" if mode == "CMYK" else "x.png"))  # PNG cannot hold CMYK
    from genfw.data import ImageFolder

    data = ImageFolder({"path": str(folder), "resolution": [6, 10], "channels": 1})
    image, _ = data[0]
    assert image.shape == (1, 6, 10)
    assert float(image[0, 0, 0]) < -0.9 and float(image[0, 0, 9]) > 0.9
