"""The bad-input table: every case gives a one-line error, a non-zero exit, and damages nothing.

docs/errors.md lists the same cases with their messages; keep the two in sync.
"""

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_RECIPE as TINY
from helpers import edit_meta
from PIL import Image
from typer.testing import CliRunner

import genfw
from genfw import io as genfw_io
from genfw.cli import app
from genfw.errors import CheckpointError
from genfw.registry import build


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


# Each case: (id, setup(tmp, finished, monkeypatch) -> (argv, protected paths), message fragment, exit code)
def _recipe_case(recipe_or_text, *extra):
    def setup(tmp, fin, mp):
        path = tmp / "r.yaml"
        if isinstance(recipe_or_text, str):
            path.write_text(recipe_or_text)
        else:
            path.write_text(yaml.safe_dump(recipe_or_text))
        return ["validate", str(path), *extra], []
    return setup


def _run_case(make_recipe, *extra):
    def setup(tmp, fin, mp):
        path = write_recipe(tmp, make_recipe(tmp))
        return ["run", str(path), "--output-dir", str(tmp / "run"), *extra], []
    return setup


def _ckpt_case(corrupt):
    def setup(tmp, fin, mp):
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
    edit_meta(path, lambda m: m["components"][0].update(name="muse", dist="genfw-muse", version="0.3"))


def _mixed_recipe(tmp):
    return {**TINY, "sample": {"n": 2}, "prior": {"name": "autoregressive",
                              "backbone": {"name": "hourglass", "params": {"dim": 16, "depth": [1, 1, 1]}}}}


def _files_case(make_folder, **params):
    def setup(tmp, fin, mp):
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


def _other_recipe_run(tmp, fin, mp):
    other = write_recipe(tmp, {**TINY, "name": "other"})
    return ["run", str(other), "--output-dir", str(fin / "run")], [fin / "run" / "prior0" / "model.safetensors"]


def _foreign_recipe_yaml(tmp, fin, mp):
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("my notes\n")
    return ["run", str(write_recipe(tmp, TINY)), "--output-dir", str(folder)], [folder / "recipe.yaml"]


def _run_in_use(tmp, fin, mp):
    from genfw.rundir import RunLock

    RunLock(str(tmp / "run")).acquire()  # held until the test's tmp folder goes
    return ["run", str(write_recipe(tmp, TINY)), "--output-dir", str(tmp / "run")], [tmp / "run" / "run.lock"]


def _fewer_steps(tmp, fin, mp):
    return (["run", str(write_recipe(tmp, TINY)), "--output-dir", str(fin / "run"), "--set", "train.prior.steps=2"],
            [fin / "run" / "prior0" / "model.safetensors", fin / "run" / "prior0" / "stage.json"])


def _checkpoint_in_replaced_stage(tmp, fin, mp):
    tok = fin / "run" / "tokenizer" / "model.safetensors"
    return (["run", str(write_recipe(tmp, TINY)), "--output-dir", str(fin / "run"), "--set",
             f"tokenizer.checkpoint={tok}"], [tok, fin / "run" / "tokenizer" / "stage.json"])


def _export_exists(tmp, fin, mp):
    target = tmp / "b.safetensors"
    target.write_bytes(b"mine")
    return ["export", str(fin / "run"), "-o", str(target)], [target]


def _export_into_stage(tmp, fin, mp):
    target = fin / "run" / "prior0" / "model.safetensors"
    return ["export", str(fin / "run"), "-o", str(target), "--overwrite"], [target]


def _init_from_mismatch(tmp, fin, mp):
    other = tmp / "other.safetensors"
    genfw.save(other, build("prior", "sundae", {"unroll_steps": 2}, codebook_size=4, grid=[4, 4], num_classes=2,
                            context=[], backbone={"name": "transformer", "params": {"dim": 8, "depth": 1, "heads": 2}}))
    return (["run", str(write_recipe(tmp, TINY)), "--output-dir", str(tmp / "run"), "--set",
             f"prior.init_from={other}"], [other])


def _mask_case(tmp, fin, mp):
    sample = sorted((fin / "run" / "samples").glob("00000_*.png"))[0]
    Image.fromarray(np.zeros((3, 7), dtype=np.uint8)).save(tmp / "mask.png")
    return ["inpaint", str(fin / "bundle.safetensors"), "--image", str(sample), "--mask", str(tmp / "mask.png"),
            "--label", "0"], []


def _empty_mask_case(tmp, fin, mp):
    sample = sorted((fin / "run" / "samples").glob("00000_*.png"))[0]
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp / "mask.png")
    return ["inpaint", str(fin / "bundle.safetensors"), "--image", str(sample), "--mask", str(tmp / "mask.png"),
            "--label", "0"], []


def _no_label_case(tmp, fin, mp):
    sample = sorted((fin / "run" / "samples").glob("00000_*.png"))[0]
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp / "mask.png")
    return ["inpaint", str(fin / "bundle.safetensors"), "--image", str(sample), "--mask", str(tmp / "mask.png")], []


def _codebook_mismatch(tmp, fin, mp):
    """A tokenizer checkpoint with 8 codes and a prior checkpoint trained for 4."""
    tok, prior = tmp / "tok.safetensors", tmp / "prior.safetensors"
    genfw.save(tok, build("tokenizer", "pixels", {"levels": 8}, channels=1, resolution=[4, 4]))
    prior.write_bytes((fin / "prior.safetensors").read_bytes())
    recipe = {**TINY, "tokenizer": {"name": "pixels", "checkpoint": str(tok)},
              "prior": {**TINY["prior"], "checkpoint": str(prior)}}
    return ["run", str(write_recipe(tmp, recipe)), "--output-dir", str(tmp / "run")], [tok, prior]


def _hostile_grid(tmp, fin, mp):
    """A backbone without learned positions: only the bound on sizes stops a 10^10-token grid."""
    path = tmp / "p.safetensors"
    genfw.save(path, build("prior", "sundae", {}, codebook_size=4, grid=[4, 4], num_classes=0, context=[],
                           backbone={"name": "hourglass", "params": {"dim": 16, "depth": [1, 1, 1], "heads": 2}}))
    edit_meta(path, lambda m: m["components"][0]["construct"].__setitem__("grid", [100000, 100000]))
    return ["sample", str(path)], [path]


def _unreadable_folder(tmp, fin, mp):
    folder = images_folder(tmp / "data")
    real = os.access
    mp.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))
    return ["run", str(write_recipe(tmp, folder_recipe(folder))), "--output-dir", str(tmp / "run")], []


def _unreadable_image(tmp, fin, mp):
    folder = images_folder(tmp / "data")
    import fsspec.implementations.local as local

    real = local.LocalFileSystem._open

    def deny(self, path, mode="rb", **kw):
        if path.endswith("1.png"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(self, path, mode, **kw)

    mp.setattr(local.LocalFileSystem, "_open", deny)
    return ["run", str(write_recipe(tmp, folder_recipe(folder))), "--output-dir", str(tmp / "run")], []


CASES = [
    ("malformed-yaml", _recipe_case("name: x\nprior: [unclosed\n"), "malformed YAML at line", 2),
    ("recipe-missing", lambda tmp, fin, mp: (["validate", str(tmp / "nope.yaml")], []), "recipe not found", 2),
    ("recipe-not-mapping", _recipe_case("- just\n- a list\n"), "must be a YAML mapping", 2),
    ("missing-section", _recipe_case({k: v for k, v in TINY.items() if k != "tokenizer"}),
     "tokenizer: required key missing", 2),
    ("unknown-prior", _recipe_case(TINY, "--set", "prior.name=sundea"), "unknown prior 'sundea'; registered priors:", 1),
    ("unknown-backbone", _recipe_case(TINY, "--set", "prior.backbone.name=resnet"), "unknown backbone 'resnet'", 1),
    ("unknown-dataset", _recipe_case(TINY, "--set", "data.name=imagenet"), "unknown dataset 'imagenet'", 1),
    ("unknown-logger", _recipe_case(TINY, "--set", "log=[jsonl, wandb]"),
     "log.1: unknown logger 'wandb'; registered loggers: csv, jsonl, tensorboard", 1),
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
    ("dataset-unreadable", _unreadable_folder, "dataset path is not readable (permission denied)", 1),
    ("image-unreadable", _unreadable_image, "image file is not readable (permission denied)", 1),
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
    ("checkpoint-needs-plugin", _ckpt_case(foreign_plugin), "pip install genfw-muse", 1),
    ("checkpoint-hostile-sizes", _hostile_grid, "beyond genfw's limit", 1),
    ("codebook-mismatch", _codebook_mismatch, "has codebook_size 4 but tokenizer level 0 needs 8", 2),
    ("model-is-not-a-bundle", lambda tmp, fin, mp: (["sample", str(fin / "prior.safetensors")], []),
     "not a pipeline bundle", 1),
    ("run-dir-of-other-recipe", _other_recipe_run, "belongs to recipe 'tiny'", 2),
    ("label-out-of-range", lambda tmp, fin, mp: (["sample", str(fin / "bundle.safetensors"), "--label", "7",
                                              "--out", str(tmp / "s")], []), "out of range", 2),
    ("inpaint-mask-wrong-size", _mask_case, "mask", 2),
    ("inpaint-mask-empty", _empty_mask_case, "selects no pixels", 2),
    ("inpaint-without-label", _no_label_case, "this model is class-conditional (2 classes): give the class", 2),
    ("unknown-stage", lambda tmp, fin, mp: (["run", str(write_recipe(tmp, TINY)), "--stages", "train",
                                         "--output-dir", str(tmp / "run")], []),
     "unknown stage", 2),
    ("cuda-unavailable", lambda tmp, fin, mp: (["sample", str(fin / "bundle.safetensors"), "--device", "cuda"], []),
     "CUDA is not available", 2),
    ("not-a-run-dir", lambda tmp, fin, mp: (["export", str(tmp), "-o", str(tmp / "x.safetensors")], []),
     "not a finished genfw run directory", 1),
    ("foreign-recipe-yaml", _foreign_recipe_yaml, "was not written by genfw and would be replaced", 2),
    ("output-dir-url", lambda tmp, fin, mp: (["run", str(write_recipe(tmp, TINY)), "--output-dir", "memory://x"], []),
     "a run directory must be a local path or a file:// URL", 2),
    ("run-dir-in-use", _run_in_use, "is in use by PID", 1),
    ("steps-lowered", _fewer_steps, "prior0 was trained for 3 steps and the recipe now asks for 2", 2),
    ("checkpoint-in-replaced-stage", _checkpoint_in_replaced_stage, "lies inside", 2),
    ("export-target-exists", _export_exists, "already exists: pass --overwrite", 2),
    ("write-into-stage-folder", _export_into_stage, "lies inside the stage folders of the run directory", 2),
    ("init-from-mismatch", _init_from_mismatch, "do not fit the recipe's prior", 2),
    ("init-from-and-checkpoint", _recipe_case(TINY, "--set", "prior.init_from=a.safetensors", "--set",
                                              "prior.checkpoint=b.safetensors"), "not both", 2),
]


def _digest(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).exists()}


@pytest.mark.parametrize(("setup", "fragment", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(setup, fragment, code, tmp_path, finished, monkeypatch):
    argv, protected = setup(tmp_path, finished, monkeypatch)
    before = _digest(protected)
    result = CliRunner().invoke(app, argv)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _digest(protected) == before, "a file that existed before was changed"


# The same through a real process: what a user sees on stderr, nothing else, and the exit code.
SUBPROCESS_CASES = ["malformed-yaml", "checkpoint-not-safetensors", "codebook-mismatch"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(case, tmp_path, finished, monkeypatch):
    _, setup, fragment, code = next(c for c in CASES if c[0] == case)
    argv, protected = setup(tmp_path, finished, monkeypatch)
    before = _digest(protected)
    env = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0"}
    result = subprocess.run([sys.executable, "-m", "genfw", *argv], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert _digest(protected) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode (the monkeypatched "
                                                "dataset-unreadable and image-unreadable cases cover it)")
def test_chmod_000_dataset(tmp_path):
    folder = images_folder(tmp_path / "data")
    recipe = write_recipe(tmp_path, folder_recipe(folder))
    folder.chmod(0)
    try:
        result = CliRunner().invoke(app, ["run", str(recipe), "--output-dir", str(tmp_path / "run")])
    finally:
        folder.chmod(0o755)
    assert result.exit_code == 1 and "not readable (permission denied)" in result.stderr, result.output


class HugeBuffer(torch.nn.Module):
    """A component whose non-persistent buffer (not in any file) is sized by its metadata."""

    class Params(genfw.interfaces.Params):
        pass

    kind = "prior"

    def __init__(self, params=None, size: int = 4):
        super().__init__()
        self.params, self.construct = params or self.Params(), {"size": size}
        self.weight = torch.nn.Parameter(torch.zeros(4))
        self.register_buffer("table", torch.zeros(size), persistent=False)


def test_metadata_cannot_make_construction_allocate(tmp_path):
    """A size only a non-persistent buffer uses is caught by the meta build's byte count."""
    from genfw.hookspecs import hookimpl
    from genfw.registry import Registry

    class Plugin:
        @hookimpl
        def genfw_register(self, registry):
            registry.register("prior", "huge", HugeBuffer)

    registry = Registry()
    registry.add_plugin(Plugin(), "huge")
    path = tmp_path / "h.safetensors"
    module = HugeBuffer()
    module._genfw_name = "huge"
    genfw.save(path, module)
    assert torch.equal(genfw.checkpoint.load(path, registry).weight, module.weight)
    edit_meta(path, lambda m: m["components"][0]["construct"].__setitem__("size", 1 << 40))  # 4 TiB
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="would allocate 4096.0 GiB"):  # not a failed 4 TiB allocation
        genfw.checkpoint.load(path, registry)
    assert time.perf_counter() - t0 < 5


def test_table_has_at_least_25_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_docs_list_every_case_with_its_message_and_exit_code():
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines() if line.startswith("| `")}
    for case_id, _, fragment, code in CASES:
        assert case_id in rows, f"docs/errors.md lacks {case_id}"
        assert fragment in rows[case_id] and rows[case_id].rstrip().endswith(f"| {code} |"), rows[case_id]


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
    result = CliRunner().invoke(app, ["export", str(finished / "run"), "-o", str(target), "--overwrite"])
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


def _half(mode):
    """A 6x10 image, black on the left half and white on the right, in ``mode``."""
    arr = np.zeros((6, 10), dtype=np.uint8)
    arr[:, 5:] = 255
    if mode == "I;16":
        return Image.fromarray(arr.astype(np.uint16) * 257)  # 16-bit: white is 65535
    if mode == "P":
        return Image.fromarray(arr).convert("RGB").convert("P")
    return Image.fromarray(arr).convert(mode)


def _transparent():
    """RGBA: the left half fully transparent black, which must come out white (over white)."""
    arr = np.zeros((6, 10, 4), dtype=np.uint8)
    arr[:, 5:] = 255
    return Image.fromarray(arr, "RGBA")


def _odd_size():
    """A 7x13 RGB image for a 6x10 recipe: resized on the short side and centre-cropped."""
    arr = np.zeros((7, 13, 3), dtype=np.uint8)
    arr[:, 7:] = 255
    return Image.fromarray(arr)


# Not errors: these must load, with the right values. (name, image, file suffix, channels,
# expected value at the left and the right edge of the first row)
ODD_IMAGES = [
    ("CMYK", lambda: _half("CMYK"), "jpg", 1, (-1, 1)),  # PNG cannot hold CMYK
    ("16-bit", lambda: _half("I;16"), "png", 1, (-1, 1)),
    # 16-bit mid-grey must stay mid-grey (a plain 8-bit conversion clips it to white)
    ("16-bit-grey", lambda: Image.fromarray(np.full((6, 10), 128 * 257, dtype=np.uint16)), "png", 1, (0, 0)),
    ("RGBA", lambda: _half("RGBA"), "png", 1, (-1, 1)),
    ("LA", lambda: _half("LA"), "png", 1, (-1, 1)),
    ("palette", lambda: _half("P"), "png", 1, (-1, 1)),
    ("alpha-over-white", _transparent, "png", 1, (1, 1)),
    ("grey-as-RGB", lambda: _half("L"), "png", 3, (-1, 1)),
    ("odd-size", _odd_size, "png", 3, (-1, 1)),
]


@pytest.mark.parametrize(("make", "suffix", "channels", "edges"), [c[1:] for c in ODD_IMAGES],
                         ids=[c[0] for c in ODD_IMAGES])
def test_odd_images_load(tmp_path, make, suffix, channels, edges):
    from genfw.data import ImageFolder

    folder = tmp_path / "imgs"
    folder.mkdir()
    make().save(folder / f"x.{suffix}")
    image, _ = ImageFolder({"path": str(folder), "resolution": [6, 10], "channels": channels})[0]
    assert image.shape == (channels, 6, 10)
    left, right = image[:, 0, 0], image[:, 0, 9]
    assert torch.allclose(left, torch.full_like(left, float(edges[0])), atol=0.1), left
    assert torch.allclose(right, torch.full_like(right, float(edges[1])), atol=0.1), right
