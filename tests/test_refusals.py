"""Refused before work, in one line: what a run used to refuse only after training, or with a traceback.

The third bad-input table (docs/errors.md, "Refused before work"): every case gives one ``error:``
line on stderr, its exit code, no traceback, changes no file it started from, and -- for runs --
creates no run directory (every check that can run before work runs before work). Also here: the
Python API's one-line errors, the stale-lock hint, the TensorBoard writer thread, the evaluation
metrics and hyper-parameters reaching TensorBoard, and plain progress lines in a log file.
"""

import hashlib
import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_RECIPE as TINY
from helpers import FastCliRunner
from PIL import Image

import genfw
from genfw.cli import app
from genfw.errors import ConfigError
from genfw.registry import build

HUGE_SEED = str(2**70)


def _tok():
    return build("tokenizer", "pixels", {"levels": 4}, channels=1, resolution=[4, 4])


def _prior(dim=16, grid=(4, 4), backbone="transformer"):
    params = {"dim": dim, "depth": 1, "heads": 2} if backbone == "transformer" else \
        {"dim": dim, "depth": [1, 1, 1], "heads": 2, "shorten_factors": [4]}
    return build("prior", "sundae", {"unroll_steps": 2}, codebook_size=4, grid=list(grid), num_classes=2, context=[],
                 backbone={"name": backbone, "params": params})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model files (a tiny bundle, its parts, a prior of another width) and a recipe, made once."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    tok, prior = _tok(), _prior()
    genfw.save(root / "tok.safetensors", tok)
    genfw.save(root / "prior.safetensors", prior)
    genfw.save(root / "narrow.safetensors", _prior(dim=8))
    genfw.save(root / "bundle.safetensors", {"tokenizer": tok, "prior.0": prior},
               extra={"sampler": {"steps": 2, "min_steps": 1}, "class_names": ["a", "b"]})
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (root / "corrupt.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    return root


def _validate(*sets):
    return lambda tmp, f, mp: (["validate", str(f / "tiny.yaml"), *sets], [])


def _run(*sets, dry=False):
    return lambda tmp, f, mp: (["run", str(f / "tiny.yaml"), "-o", str(tmp / "run"), *sets]
                               + (["--dry-run"] if dry else []), [])


def _init_from(name, command="run", dry=False):
    def setup(tmp, f, mp):
        argv = [command, str(f / "tiny.yaml"), "--set", f"prior.init_from={f / name}"]
        if command == "run":
            argv += ["-o", str(tmp / "run")] + (["--dry-run"] if dry else [])
        return argv, [f / name]
    return setup


def _sundae_files(tmp, shorten=4):
    ckpt = tmp / "checkpoint-0000001.pt"
    torch.save({"net": {"token_emb.weight": torch.zeros(5, 8), "to_logits.weight": torch.zeros(4, 8)}}, ckpt)
    cfg = tmp / "config.toml"
    cfg.write_text(textwrap.dedent(f"""
        [data]
        vocab_size = 4
        sequence_length = 16
        [net]
        dim = 8
        nb_heads = 1
        shorten_factor = {shorten}
        depth = [1, 1, 1]
        use_rotary = true
    """))
    return ckpt, cfg


def _convert_sundae(shorten, *sets):
    def setup(tmp, f, mp):
        ckpt, cfg = _sundae_files(tmp, shorten)
        return ["convert", "sundae", str(ckpt), "--config", str(cfg), *sets, "-o", str(tmp / "out.safetensors")], \
            [ckpt, cfg]
    return setup


def _taming_ddconfig_list(tmp, f, mp):
    ckpt = tmp / "last.ckpt"
    torch.save({"state_dict": {"quantize.embedding.weight": torch.zeros(4, 2),
                               "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)},
                "hyper_parameters": {"ddconfig": [1, 2]}}, ckpt)
    return ["convert", "taming", str(ckpt), "-o", str(tmp / "out.safetensors")], [ckpt]


def _convert_file(make):
    def setup(tmp, f, mp):
        path = make(tmp)
        return ["convert", "taming", str(path), "-o", str(tmp / "out.safetensors")], [path]
    return setup


def _png(tmp):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp / "weights.pt", format="PNG")
    return tmp / "weights.pt"


def _text(tmp):
    (tmp / "weights.pt").write_text("45.\n")
    return tmp / "weights.pt"


def _numpy_global(tmp):
    torch.save({"step": np.float64(3.0)}, tmp / "weights.pt")
    return tmp / "weights.pt"


def _assemble(*sampler):
    def setup(tmp, f, mp):
        argv = ["assemble", "-o", str(tmp / "b.safetensors"), "--tokenizer", str(f / "tok.safetensors"),
                "--prior", str(f / "prior.safetensors")]
        for item in sampler:
            argv += ["--sampler", item]
        return argv, []
    return setup


def _sample(*flags):
    return lambda tmp, f, mp: (["sample", str(f / "bundle.safetensors"), "-n", "2", "-o", str(tmp / "out"), *flags],
                               [f / "bundle.safetensors"])


def _big_grid(tmp, f, mp):
    """A bundle whose prior works on the largest grid the size limits allow (2048x2048 codes)."""
    path = tmp / "big.safetensors"
    tok = build("tokenizer", "pixels", {"levels": 4}, channels=1, resolution=[2048, 2048])
    genfw.save(path, {"tokenizer": tok, "prior.0": _prior(grid=(2048, 2048), backbone="hourglass")},
               extra={"sampler": {"steps": 2}})
    from genfw import sampling

    mp.setattr(sampling, "free_memory_bytes", lambda device: 16 * 2**30)  # a 16 GiB machine
    return ["sample", str(path), "-o", str(tmp / "out")], [path]


def _run_dir_recipe_huge(tmp, f, mp):
    run = tmp / "run"
    result = FastCliRunner().invoke(app, ["run", str(f / "tiny.yaml"), "-o", str(run), "--stages", "tokenizer"])
    assert result.exit_code == 0, result.output
    mp.setenv("GENFW_MAX_RECIPE_BYTES", str(64 << 10))
    with open(run / "recipe.yaml", "a") as fh:
        fh.write("#" + "x" * (100 << 10) + "\n")
    return ["run", str(f / "tiny.yaml"), "-o", str(run), "--stages", "tokenizer"], [run / "recipe.yaml"]


def _reused_pid_lock(tmp, f, mp):
    """A lock naming a live process of this host that holds no flock: its PID was reused."""
    import socket

    run = tmp / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                              "started": "2026-01-01T00:00:00+00:00",
                                              "command": "genfw run \x1b[2Jr.yaml"}))
    return ["run", str(f / "tiny.yaml"), "-o", str(run)], [run / "run.lock"]


# (id, setup(tmp, files, monkeypatch) -> (argv, protected paths), message fragment, exit code)
CASES = [
    ("validate-sample-n-huge", _validate("--set", "sample.n=1e9"),
     "sample.n: the number of samples is 1,000,000,000, beyond genfw's limit", 2),
    ("dry-run-sampler-steps-huge", _run("--set", "sample.params.steps=1e9", dry=True),
     "sample.params.steps is 1,000,000,000, beyond genfw's limit", 2),
    ("run-sample-n-huge", _run("--set", "sample.n=1e9"), "sample.n: the number of samples", 2),
    ("steps-bool", _validate("--set", "train.prior.steps=true"),
     "train.prior.steps: Value error, a number is needed, not true/false (got True)", 2),
    ("init-from-wrong-kind", _init_from("tok.safetensors", "validate"),
     "holds tokenizer 'pixels', but the recipe trains prior 'sundae'", 2),
    ("init-from-wrong-shape", _init_from("narrow.safetensors", dry=True),
     "params that differ: backbone.params.dim 8 (recipe 16)", 2),
    ("init-from-wrong-shape-run", _init_from("narrow.safetensors"), "params that differ: backbone.params.dim 8", 2),
    ("init-from-corrupt-zip", _run("--set", "prior.init_from=zip://m.safetensors::{zip}"),
     "BadZipFile: File is not a zip file", 1),
    ("checkpoint-corrupt-zip", _run("--set", "tokenizer.checkpoint=zip://m.safetensors::{zip}"),
     "BadZipFile: File is not a zip file", 1),
    ("inspect-corrupt-zip", lambda tmp, f, mp: (["inspect", f"zip://m.safetensors::{f / 'corrupt.zip'}"], []),
     "cannot open zip://m.safetensors::", 1),
    ("seed-huge-recipe", _validate("--set", f"seed={HUGE_SEED}"),
     "seed: Input should be less than or equal to 9223372036854775807", 2),
    ("seed-huge-sample", _sample("--seed", HUGE_SEED),
     f"seed {HUGE_SEED} is out of range: a seed must be an integer from 0 to 9223372036854775807", 2),
    ("recipe-name-escapes", _validate("--set", "name=../../x"),
     "name: Value error, the recipe name is the run's folder under runs/", 2),
    ("convert-set-invalid-yaml", _convert_sundae(4, "--set", "net.dim={a"), "--set net.dim='{a': Input should be a valid integer", 2),
    ("sundae-zero-shorten", _convert_sundae(0), "[net] shorten_factor = 0: must be a positive integer", 2),
    ("taming-ddconfig-list", _taming_ddconfig_list, "hyper-parameters ddconfig is a list, not a mapping", 1),
    ("converter-png", _convert_file(_png), "is a PNG image, not a PyTorch checkpoint", 1),
    ("converter-text", _convert_file(_text), "is not a PyTorch checkpoint: torch.save writes a zip archive or a "
     "pickle, and this file starts with b'45.\\n'", 1),
    ("converter-blocked-global", _convert_file(_numpy_global),
     "holds Python objects besides tensors (numpy", 1),
    ("assemble-sampler-invalid-yaml", _assemble("steps={a"), "sampler params.steps: Input should be a valid integer", 2),
    ("assemble-sampler-steps-huge", _assemble("steps=1e9"), "--sampler steps is 1,000,000,000, beyond genfw's limit", 2),
    ("sample-activations-too-large", _big_grid,
     "sampling 16 image(s) at a time on a 2048x2048 code grid needs at least", 2),
    ("run-dir-recipe-huge", _run_dir_recipe_huge, "recipe.yaml: its size is", 2),
    ("lock-pid-reused", _reused_pid_lock, "which still runs but does not hold the lock", 1),
]


def _digest(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).exists()}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip() and line[0] not in "✓•"]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


@pytest.mark.parametrize(("setup", "fragment", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_before_work(setup, fragment, code, tmp_path, files, monkeypatch):
    argv, protected = setup(tmp_path, files, monkeypatch)
    argv = [a.replace("{zip}", str(files / "corrupt.zip")) for a in argv]
    ran_before = (tmp_path / "run").exists()
    before = _digest(protected)
    t0 = time.perf_counter()
    result = FastCliRunner().invoke(app, argv)
    assert time.perf_counter() - t0 < 30
    assert result.exit_code == code, result.output
    line = one_error_line(result.stderr)
    assert fragment in line, line
    assert "Traceback" not in result.output
    assert _digest(protected) == before, "a file that existed before was changed"
    if argv[0] == "run" and not ran_before:
        assert not (tmp_path / "run").exists(), "the run started work before refusing"


def test_docs_list_every_case():
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines() if line.startswith("| `")}
    for case_id, _, fragment, code in CASES:
        assert case_id in rows, f"docs/errors.md lacks {case_id}"
        assert fragment in rows[case_id] and rows[case_id].rstrip().endswith(f"| {code} |"), rows[case_id]


def test_lock_strings_are_printed_safely(tmp_path, files):
    _reused_pid_lock(tmp_path, files, None)
    result = FastCliRunner().invoke(app, ["run", str(files / "tiny.yaml"), "-o", str(tmp_path / "run")])
    assert "\x1b" not in result.stderr and "\\x1b[2J" in result.stderr, result.stderr
    assert f"delete {tmp_path / 'run' / 'run.lock'}" in result.stderr


# -- the Python API ----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 2.5}, "the number of samples must be an integer, got 2.5"),
    ({"n": "3"}, "the number of samples must be an integer, got '3'"),
    ({"n": 2, "seed": "abc"}, "seed must be an integer from 0 to 9223372036854775807 (2**63-1), got 'abc'"),
    ({"n": 2, "seed": 2**70}, "seed 1180591620717411303424 is out of range"),
    ({"n": 2, "seed": True}, "seed must be an integer"),
])
def test_api_sample_arguments_are_one_line_errors(files, kwargs, message):
    model = genfw.load(files / "bundle.safetensors")
    with pytest.raises(ConfigError) as caught:
        model.sample(**kwargs)
    assert str(caught.value) == message or message in str(caught.value)


def test_api_seed_none_is_random_and_recorded(files):
    model = genfw.load(files / "bundle.safetensors")
    a, b = model.generate(2, seed=None, progress=None), model.generate(2, seed=None, progress=None)
    assert a.stats["seed"] != b.stats["seed"]
    again = model.generate(2, seed=a.stats["seed"], progress=None)  # the recorded seed reproduces it
    assert torch.equal(again.codes[0], a.codes[0])


def test_api_load_of_bad_urls_is_one_line(files):
    with pytest.raises(genfw.errors.CheckpointError, match="BadZipFile"):
        genfw.load(f"zip://m.safetensors::{files / 'corrupt.zip'}")


def test_seeds_up_to_63_bits_train_and_sample(tmp_path, files):
    """The largest seed works everywhere genfw derives seeds from it (data order: seed * 100003 + epoch)."""
    top = str(2**63 - 1)
    result = FastCliRunner().invoke(app, ["run", str(files / "tiny.yaml"), "-o", str(tmp_path / "run"), "--set",
                                          f"seed={top}", "--stages", "tokenizer,latents,prior"])
    assert result.exit_code == 0, result.output
    result = FastCliRunner().invoke(app, ["sample", str(files / "bundle.safetensors"), "-n", "2", "--seed", top,
                                          "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_init_from_a_bundle_takes_its_level(tmp_path, files):
    """A bundle given as init_from starts the prior from its prior.0 (and fits, so no refusal)."""
    from genfw.config import apply_overrides, validate_recipe
    from genfw.pipeline import Run

    raw = apply_overrides(TINY, [f"prior.init_from={files / 'bundle.safetensors'}", "train.prior.steps=0"])
    Run(validate_recipe(raw), output_dir=tmp_path / "run").run(["tokenizer", "latents", "prior"])
    got = genfw.load(tmp_path / "run" / "prior0" / "model.safetensors").state_dict()
    want = genfw.load(files / "prior.safetensors").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- TensorBoard -------------------------------------------------------------------------------


def test_tensorboard_writer_thread_prints_no_traceback(tmp_path, capfd, monkeypatch):
    """After a failed write genfw prints one warning; TensorBoard's own thread prints nothing."""
    pytest.importorskip("tensorboard")
    import threading

    import genfw_loggers.tensorboard_logger as tb
    from tensorboard.summary.writer import record_writer

    from genfw.loggers import LoggerSet

    # Python's own hook (which prints a thread's traceback), not pytest's, and genfw's filter anew
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.setattr(tb, "_quiet", False)
    loggers = LoggerSet(["tensorboard"], str(tmp_path), stage="prior0")
    loggers.log_scalars(1, {"loss/main": 1.0})

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    for step in range(2, 6):
        loggers.log_scalars(step, {"loss/main": 1.0})
        time.sleep(0.1)
    loggers.close()
    err = capfd.readouterr().err
    assert "warning: logger 'tensorboard'" in err, err
    assert "Traceback" not in err, err


def test_evaluation_metrics_and_hparams_reach_tensorboard(tmp_path, files):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "log": ["tensorboard"]}))
    result = FastCliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    events = EventAccumulator(str(tmp_path / "run" / "evaluate" / "tensorboard")).Reload()
    tag = "eval/prior0/denoising_ce_bits_per_token"
    assert events.Scalars(tag)[0].value == pytest.approx(metrics["prior0/denoising_ce_bits_per_token"])
    assert events.Scalars(tag)[0].step == TINY["train"]["prior"]["steps"]
    hp = EventAccumulator(str(tmp_path / "run" / "evaluate" / "tensorboard" / "hparams")).Reload()
    plugin = hp.PluginTagToContent("hparams")
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    assert data.session_start_info.hparams["prior.backbone.params.dim"].number_value == 16
    assert data.session_start_info.hparams["name"].string_value == "tiny"


# -- progress in a log file --------------------------------------------------------------------


def test_plain_progress_lines_when_stderr_is_a_file(tmp_path, files, monkeypatch):
    monkeypatch.setenv("GENFW_PROGRESS", "1")
    monkeypatch.setenv("GENFW_PROGRESS_EVERY", "0.000001")
    result = FastCliRunner().invoke(app, ["run", str(files / "tiny.yaml"), "-o", str(tmp_path / "run"),
                                          "--stages", "tokenizer,latents,prior"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("prior 0 (sundae)")]
    assert lines[0] == "prior 0 (sundae): started at step 0 of 3", lines
    assert any(ln.startswith("prior 0 (sundae): step 2/3 (66.7%), ") and "steps/s" in ln and "eta " in ln
               and "loss/main " in ln for ln in lines), lines
    assert lines[-1].startswith("prior 0 (sundae): finished, step 3/3 (100.0%)"), lines
    assert "\x1b" not in result.stderr  # plain text, no terminal codes


def test_plain_progress_every_n_seconds():
    from genfw.progress import _PlainBar, plain_every

    now = [0.0]
    written = []
    bar = _PlainBar("prior 0", 100, 0, every=60, unit="step", clock=lambda: now[0])
    bar._write = written.append
    for step in range(1, 101):
        now[0] = step * 1.0  # one step per second
        bar.update(step, **{"loss/main": 2.0})
    assert [w.split(",")[0] for w in written] == ["prior 0: step 60/100 (60.0%)"]
    assert "1 steps/s" in written[0] and "eta 40s" in written[0] and "loss/main 2" in written[0]
    os.environ["GENFW_PROGRESS_EVERY"] = "nonsense"
    try:
        assert plain_every() == 60
    finally:
        del os.environ["GENFW_PROGRESS_EVERY"]


def test_http_model_file_without_its_backend_is_one_line(tmp_path, files):
    """init_from / checkpoint / inspect of an http:// model file when aiohttp is not installed."""
    try:
        import aiohttp  # noqa: F401
        pytest.skip("aiohttp is installed: the http:// backend exists here")
    except ImportError:
        pass
    url = "http://example.invalid/m.safetensors"
    for argv in (["run", str(files / "tiny.yaml"), "-o", str(tmp_path / "run"), "--set", f"prior.init_from={url}"],
                 ["run", str(files / "tiny.yaml"), "-o", str(tmp_path / "run"), "--set", f"tokenizer.checkpoint={url}"],
                 ["inspect", url]):
        result = FastCliRunner().invoke(app, argv)
        assert result.exit_code == 1, result.output
        assert "the fsspec backend for 'http://' is not installed" in one_error_line(result.stderr)
        assert not (tmp_path / "run").exists()
