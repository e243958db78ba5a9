"""Hostile files and extreme inputs: bounded before allocation, refused in one line, found before training.

The second bad-input table (docs/errors.md, "Hostile files and extreme inputs"): every case gives
one ``error:`` line on stderr, its exit code, no traceback, and changes no file it started from.
Cases whose failure mode would be a hang or an out-of-memory kill also run in a real process
under a time limit (``test_hostile_in_a_real_process``). The fuzz tests are in test_fuzz.py.
"""

import hashlib
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_RECIPE as RECIPE
from helpers import FastCliRunner, edit_meta
from PIL import Image

import genfw
from genfw.cli import app
from genfw.registry import build


def tiny_modules():
    """An untrained 4x4, 4-level `pixels` tokenizer and a tiny SUNDAE prior (no training needed)."""
    tok = build("tokenizer", "pixels", {"levels": 4}, channels=1, resolution=[4, 4])
    prior = build("prior", "sundae", {"unroll_steps": 2}, codebook_size=4, grid=[4, 4], num_classes=2, context=[],
                  backbone={"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}})
    return tok, prior


def save_bundle(path: Path, tok=None, prior=None) -> Path:
    if tok is None:
        tok, prior = tiny_modules()
    genfw.save(path, {"tokenizer": tok, "prior.0": prior},
               extra={"sampler": {"steps": 3, "min_steps": 1}, "class_names": ["a", "b"]})
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return save_bundle(tmp_path_factory.mktemp("bundle") / "b.safetensors")


def _copy(tmp, bundle):
    path = tmp / "b.safetensors"
    path.write_bytes(bundle.read_bytes())
    return path


def _sample(edit=None, *flags):
    """``genfw sample`` on a copy of the tiny bundle edited by ``edit(path)``."""
    def setup(tmp, bundle, mp):
        path = _copy(tmp, bundle)
        if edit is not None:
            edit(path)
        return ["sample", str(path), "-n", "2", "--out", str(tmp / "out"), *flags], [path]
    return setup


def meta_edit(fn):
    return lambda path: edit_meta(path, fn)


def _components(m):
    return {c["role"]: c for c in m["components"]}


def _deep_backbone(m):
    _components(m)["prior.0"]["construct"]["backbone"]["params"]["depth"] = 20000


def _swap_roles(m):
    c = _components(m)
    c["tokenizer"]["role"], c["prior.0"]["role"] = "prior.0", "tokenizer"


def _nan_weights(tmp, bundle, mp):
    tok, prior = tiny_modules()
    with torch.no_grad():
        prior.backbone.embed.tokens.weight[1, 3] = float("nan")
    path = save_bundle(tmp / "b.safetensors", tok, prior)
    return ["sample", str(path), "-n", "2", "--out", str(tmp / "out")], [path]


def _half_weights(tmp, bundle, mp):
    tok, prior = tiny_modules()
    path = save_bundle(tmp / "b.safetensors", tok, prior.half())
    return ["sample", str(path), "-n", "2", "--out", str(tmp / "out")], [path]


def _nan_decoder(tmp, bundle, mp):
    import genfw_vq.pixels as pixels

    real = pixels.Pixels.decode
    mp.setattr(pixels.Pixels, "decode", lambda self, codes: real(self, codes) * float("nan"))
    return _sample()(tmp, bundle, mp)


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` pixels (CRC fixed): a decompression bomb."""
    buf = Path(path)
    Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(buf)
    data = bytearray(buf.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    buf.write_bytes(bytes(data))
    return buf


def images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((4, 4), 30 * i % 256, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def folder_recipe(path, **params) -> dict:
    return {**RECIPE, "data": {"name": "folder", "params": {"path": str(path), "resolution": 4, "channels": 1,
                                                            **params}}}


def _run(make_recipe, *extra, command="run"):
    def setup(tmp, bundle, mp):
        recipe = make_recipe(tmp)
        path = tmp / "r.yaml"
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
        out = ["--output-dir", str(tmp / "run")] if command == "run" else []
        return [command, str(path), *out, *extra], [path]
    return setup


def _with_env(name, value, setup):
    def wrapped(tmp, bundle, mp):
        mp.setenv(name, value)
        return setup(tmp, bundle, mp)
    return wrapped


def _bomb_dataset(tmp):
    folder = images(tmp / "data")
    png_bomb(folder / "bomb.png")
    return folder_recipe(folder)


def _bad_zip(tmp):
    (tmp / "data.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    return folder_recipe(f"zip://::{tmp / 'data.zip'}")


ALIAS_BOMB = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x, x]"]
                             + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]) + "]"


def _inpaint_huge(tmp, bundle, mp):
    Image.fromarray(np.zeros((3000, 3000), dtype=np.uint8)).save(tmp / "big.png")
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp / "mask.png")
    return ["inpaint", str(bundle), "--image", str(tmp / "big.png"), "--mask", str(tmp / "mask.png"),
            "--label", "0", "--out", str(tmp / "out")], []


def _inpaint_bomb(tmp, bundle, mp):
    png_bomb(tmp / "bomb.png")
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp / "mask.png")
    return ["inpaint", str(bundle), "--image", str(tmp / "bomb.png"), "--mask", str(tmp / "mask.png"),
            "--label", "0", "--out", str(tmp / "out")], []


def _run_dir_state(corrupt):
    """A finished run whose prior stage is unfinished (to resume), with one state file corrupted."""
    def setup(tmp, bundle, mp):
        run = tmp / "run"
        recipe = tmp / "r.yaml"
        recipe.write_text(yaml.safe_dump(RECIPE))
        result = FastCliRunner().invoke(app, ["run", str(recipe), "--output-dir", str(run), "--stages",
                                          "tokenizer,latents,prior"])
        assert result.exit_code == 0, result.output
        corrupt(run)
        return ["run", str(recipe), "--output-dir", str(run), "--stages", "prior"], []
    return setup


def _unfinish_prior(run):
    (run / "prior0" / "stage.json").write_text((run / "prior0" / "stage.json").read_text()
                                               .replace('"complete": true', '"complete": false'))


def _truncated_train_state(run):
    _unfinish_prior(run)
    data = (run / "prior0" / "train_state.safetensors").read_bytes()
    (run / "prior0" / "train_state.safetensors").write_bytes(data[: len(data) - 100])


def _foreign_train_state(run):
    _unfinish_prior(run)
    tok, prior = tiny_modules()
    genfw.save(run / "prior0" / "train_state.safetensors", prior)


def _bad_latent_codes(run):
    from genfw import checkpoint

    _unfinish_prior(run)
    (run / "prior0" / "train_state.safetensors").unlink()
    shard = run / "latents" / "train" / "shard-00000.safetensors"
    tensors, meta = checkpoint.read(shard)
    tensors["codes.0"][0, 0, 0] = 99
    checkpoint.save_tensors(shard, tensors, {k: v for k, v in meta.items() if k not in ("format_version", "genfw_version")})


def _garbage_stage_json(run):
    """Garbage in a stage.json means 'not finished': the stage reruns and the command succeeds."""
    (run / "prior0" / "stage.json").write_bytes(b"\xff\xfe garbage")


# (id, setup(tmp, bundle, monkeypatch) -> (argv, protected paths), message fragment, exit code)
CASES = [
    # unbounded sizes
    ("hostile-depth", _sample(meta_edit(_deep_backbone)), "would create more than", 1),
    ("sample-n-huge", _sample(None, "-n", "1000000000"), "beyond genfw's limit of 1,000,000", 2),
    ("sample-n-zero", _sample(None, "-n", "0"), "number of samples must be at least 1", 2),
    ("sample-steps-huge", _sample(None, "--steps", "1000000000"), "sampler param steps is 1,000,000,000", 2),
    ("sample-size-huge", _sample(None, "--size", "100000x100000"), "the code grid 100000x100000", 2),
    ("sample-batch-size-zero", _sample(None, "--batch-size", "0"), "batch size must be at least 1", 2),
    ("sample-batch-size-huge", _sample(None, "--batch-size", "10000000"), "the batch size is 10,000,000", 2),
    ("stored-steps-huge", _sample(meta_edit(lambda m: m["extra"]["sampler"].__setitem__("steps", 10**12))),
     "sampler param steps is 1,000,000,000,000", 2),
    ("recipe-model-too-large", _run(lambda tmp: RECIPE, "--set", "prior.backbone.params.dim=100000"),
     "for weights, gradients and Adam state alone", 2),
    ("recipe-too-many-modules", _with_env("GENFW_MAX_MODULES", "300", _run(
        lambda tmp: RECIPE, "--set", "prior.backbone.params.depth=20000")), "would create more than 300 modules", 2),
    ("inpaint-image-huge", _inpaint_huge, "is 3000x3000 but the model expects 4x4", 2),
    # silent garbage
    ("nan-weights", _nan_weights, "tensor 'backbone.embed.tokens.weight' of prior 'sundae' holds 1 NaN/inf", 1),
    ("wrong-dtype", _half_weights, "is stored as float16 but the model it describes holds float32", 1),
    ("nan-decoder-output", _nan_decoder, "gave NaN/inf pixels", 1),
    # foreign errors
    ("device-unknown", _sample(None, "--device", "tpu"), "unknown device 'tpu'", 2),
    ("precision-unknown", _sample(None, "--precision", "fp8"), "unknown precision 'fp8'", 2),
    ("bundle-role-missing", _sample(meta_edit(lambda m: m["components"].pop(0))), "a bundle needs a 'tokenizer'", 1),
    ("bundle-roles-swapped", _sample(meta_edit(_swap_roles)), "tokenizer (prior)", 1),
    ("bundle-component-not-mapping", _sample(meta_edit(lambda m: m["components"].append(7))),
     "a component entry is int", 1),
    ("stored-sampler-not-mapping", _sample(meta_edit(lambda m: m["extra"].__setitem__("sampler", [1, 2]))),
     "stored sampler params are list", 1),
    ("stored-sampler-wrong-type", _sample(meta_edit(lambda m: m["extra"]["sampler"].__setitem__("steps", "many"))),
     "sampler params.steps", 2),
    ("image-bomb", _run(_bomb_dataset), "beyond genfw's limit of 268,435,456 pixels (a decompression bomb", 1),
    ("inpaint-image-bomb", _inpaint_bomb, "beyond genfw's limit of 268,435,456 pixels", 1),
    ("zip-dataset-corrupt", _run(_bad_zip), "cannot open dataset location zip://", 1),
    ("fsspec-backend-missing", lambda tmp, b, mp: (["sample", "s3://bucket/model.safetensors"], []),
     "the fsspec backend for 's3://' is not installed", 1),
    ("recipe-protocol-unknown", lambda tmp, b, mp: (["validate", "foo://bucket/r.yaml"], []),
     "Protocol not known: foo", 1),
    ("train-state-truncated", _run_dir_state(_truncated_train_state), "is truncated", 1),
    ("train-state-foreign", _run_dir_state(_foreign_train_state), "is not a training state", 1),
    ("latents-corrupt", _run_dir_state(_bad_latent_codes), "holds codes outside 0..3", 1),
    # validation catching what run would crash on
    ("betas-out-of-range", _run(lambda tmp: RECIPE, "--set", "train.prior.betas=[0.9,1.5]", command="validate"),
     "Adam betas must lie in [0, 1)", 2),
    ("lr-infinite", _run(lambda tmp: RECIPE, "--set", "train.prior.lr=.inf", command="validate"),
     "train.prior.lr: Input should be a finite number", 2),
    ("group-lr-not-a-number", _run(lambda tmp: RECIPE, "--set", "train.prior.groups={main: {lr: fast}}",
                                   command="validate"), "group 'main': lr: Input should be a valid number", 2),
    ("precision-name", _run(lambda tmp: RECIPE, "--set", "train.prior.precision=fp8", command="validate"),
     "train.prior.precision", 2),
    ("alias-bomb-recipe", _run(lambda tmp: f"x: &x {ALIAS_BOMB}\n" + yaml.safe_dump(RECIPE), command="validate"),
     "once YAML aliases are expanded", 2),
    ("alias-bomb-set", _run(lambda tmp: RECIPE, "--set", f"data.params.storage_options={{x: {ALIAS_BOMB}}}",
                            command="validate"), "once YAML aliases are expanded", 2),
    ("recursive-alias", _run(lambda tmp: "x: &x [1, *x]\n" + yaml.safe_dump(RECIPE), command="validate"),
     "contains itself", 2),
]


def _digest(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).exists()}


def one_error_line(stderr: str) -> str:
    """The one error line; a run's status lines ("✓ latents: unchanged, reused") may come before it."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and line[0] not in "✓•"]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


@pytest.mark.parametrize(("setup", "fragment", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile(setup, fragment, code, tmp_path, bundle, monkeypatch):
    argv, protected = setup(tmp_path, bundle, monkeypatch)
    before = _digest(protected)
    t0 = time.perf_counter()
    result = FastCliRunner().invoke(app, argv)
    assert time.perf_counter() - t0 < 30, "a bad input must be refused quickly"
    assert result.exit_code == code, result.output
    line = one_error_line(result.stderr)
    assert fragment in line, line
    assert "Traceback" not in result.output
    assert _digest(protected) == before, "a file that existed before was changed"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), "images were written"


def test_garbage_stage_json_reruns_the_stage(tmp_path, bundle, monkeypatch):
    """A stage.json genfw cannot read means the stage did not finish: it runs again and the run succeeds."""
    argv, _ = _run_dir_state(_garbage_stage_json)(tmp_path, bundle, monkeypatch)
    result = FastCliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert '"complete": true' in (tmp_path / "run" / "prior0" / "stage.json").read_text()


def test_hostile_depth_is_refused_quickly(tmp_path, bundle):
    """The meta build stops after a few layers of the claimed 20000 (not minutes of building)."""
    path = _copy(tmp_path, bundle)
    edit_meta(path, _deep_backbone)
    genfw.load(bundle)  # the first build on the meta device imports parts of torch (seconds)
    t0 = time.perf_counter()
    with pytest.raises(genfw.errors.CheckpointError, match="would create more than .* for the .* tensors in the file"):
        genfw.load(path)
    assert time.perf_counter() - t0 < 2


def test_limits_can_be_raised(tmp_path, bundle, monkeypatch):
    """GENFW_MAX_SAMPLES raises the sample-count limit (and a bad value is itself one line)."""
    argv, _ = _sample(None, "-n", "3")(tmp_path, bundle, monkeypatch)
    monkeypatch.setenv("GENFW_MAX_SAMPLES", "2")
    result = FastCliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "GENFW_MAX_SAMPLES=N" in one_error_line(result.stderr)
    monkeypatch.setenv("GENFW_MAX_SAMPLES", "3")
    result = FastCliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("0*.png"))) == 3
    monkeypatch.setenv("GENFW_MAX_SAMPLES", "lots")
    result = FastCliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "GENFW_MAX_SAMPLES must be a positive integer" in one_error_line(result.stderr)


def test_hostile_class_name_cannot_escape_the_output_folder(tmp_path, bundle):
    path = _copy(tmp_path, bundle)
    edit_meta(path, lambda m: m["extra"].__setitem__("class_names", ["../../escaped", "b"]))
    out = tmp_path / "a" / "b" / "out"
    result = FastCliRunner().invoke(app, ["sample", str(path), "-n", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert written == sorted(p.name for p in out.glob("*.png")) and any("escaped" in n for n in written), written


# The cases whose failure mode was a hang or an allocation of many GiB, in a real process with a
# time limit: what a user sees on stderr and the exit code.
SUBPROCESS_CASES = ["hostile-depth", "sample-n-huge", "alias-bomb-set"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_hostile_in_a_real_process(case, tmp_path, bundle, monkeypatch):
    _, setup, fragment, code = next(c for c in CASES if c[0] == case)
    argv, _ = setup(tmp_path, bundle, monkeypatch)
    env = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0"}
    result = subprocess.run([sys.executable, "-m", "genfw", *argv], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == code, result.stderr
    assert fragment in one_error_line(result.stderr)
    assert "Traceback" not in result.stdout + result.stderr


def test_docs_list_every_case():
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines() if line.startswith("| `")}
    for case_id, _, fragment, code in CASES:
        assert case_id in rows, f"docs/errors.md lacks {case_id}"
        assert fragment in rows[case_id] and rows[case_id].rstrip().endswith(f"| {code} |"), rows[case_id]
    from genfw.limits import LIMITS

    for name in LIMITS:
        assert f"GENFW_MAX_{name.upper()}" in doc, f"docs/errors.md lacks the limit {name}"


# --------------------------------------------------------------------------------------------
# data found before training


def test_a_bad_held_out_image_stops_the_run_before_the_tokenizer_stage(tmp_path):
    folder = images(tmp_path / "data", 8)
    (folder / "9-bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "8-empty.png").write_bytes(b"")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(folder_recipe(folder)))
    result = FastCliRunner().invoke(app, ["run", str(recipe), "--output-dir", str(tmp_path / "run")])
    line = one_error_line(result.stderr)
    assert result.exit_code == 1 and "empty (zero-byte) image file" in line and "1 more of the 10 images" in line, line
    assert not (tmp_path / "run" / "tokenizer").exists(), "the tokenizer stage started before the data was checked"


def test_image_check_is_cached_by_fingerprint(tmp_path):
    from genfw.datacheck import check_images
    from genfw.errors import DataError

    folder = images(tmp_path / "data", 6)
    dataset = build("dataset", "folder", {"path": str(folder), "resolution": 4, "channels": 1})
    cache = str(tmp_path / "datacheck.json")
    assert check_images(dataset, cache) == {"images": 6, "checked": 6, "cached": 0}
    assert check_images(dataset, cache) == {"images": 6, "checked": 0, "cached": 6}
    (folder / "2.png").write_bytes(b"not an image")  # replaced: checked again, and bad
    with pytest.raises(DataError, match="2.png"):
        check_images(dataset, cache)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(folder / "2.png")
    assert check_images(dataset, cache) == {"images": 6, "checked": 1, "cached": 5}


def test_symlinked_class_folders_are_followed_and_loops_refused(tmp_path):
    from genfw.errors import DataError

    images(tmp_path / "elsewhere" / "cats", 3)
    root = tmp_path / "data"
    images(root / "dogs", 2)
    (root / "cats").symlink_to(tmp_path / "elsewhere" / "cats", target_is_directory=True)
    dataset = build("dataset", "folder", {"path": str(root), "resolution": 4, "channels": 1,
                                          "labels_from_folders": True})
    assert len(dataset) == 5 and dataset.class_names == ["cats", "dogs"]
    (root / "dogs" / "again").symlink_to(root, target_is_directory=True)
    dataset = build("dataset", "folder", {"path": str(root), "resolution": 4, "channels": 1})
    with pytest.raises(DataError, match="symlink loop in the dataset: .*again leads back"):
        len(dataset)


class _Flaky(torch.utils.data.Dataset):
    """Codes for a tiny prior; item 13 is a bad file (raised in a DataLoader worker)."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        if i == 13:
            from genfw.errors import DataError

            raise DataError("corrupt or unreadable image /data/13.png: broken: remove or replace it")
        return [torch.full((4, 4), i % 4)], torch.tensor(i % 2)


def test_a_data_error_during_training_saves_state_in_one_line(tmp_path):
    """A worker's error arrives as one line (not the worker's traceback), after the state is saved."""
    from genfw import checkpoint
    from genfw.config import TrainSpec
    from genfw.errors import DataError
    from genfw.train import STATE_FILE, Trainer

    _, prior = tiny_modules()
    spec = TrainSpec(steps=40, batch_size=4, checkpoint_every=100, num_workers=1)
    trainer = Trainer(prior, _Flaky(), spec, tmp_path, prepare=lambda b: {"codes": b[0][0], "labels": b[1]},
                      description="prior 0 (sundae)")
    with pytest.raises(DataError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and message.startswith("prior 0 (sundae): corrupt or unreadable image /data/13.png")
    assert "state saved at step" in message and "run the same command again to resume" in message
    tensors, meta = checkpoint.read(tmp_path / STATE_FILE)
    saved = checkpoint.unpack(meta["tree"], tensors)["step"]
    assert saved == trainer.step and 0 <= saved < 8, saved  # item 13 lies in the first epoch's 8 batches
