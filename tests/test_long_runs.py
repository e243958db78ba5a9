"""Runs left for days: fingerprints that mean something, continuing, moving aside, the lock,
preemption signals, snapshots, previews, warm starts, and files genfw must not touch.

Process start-up dominates the time of real-process tests, so the ones that need a real process
(signals, locks, SIGKILL) share one sequence; the rest run in-process on a tiny recipe.
"""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import genfw
from genfw import checkpoint
from genfw.cli import app
from genfw.config import apply_overrides, validate_recipe
from genfw.errors import ConfigError, GenfwError, TrainingError
from genfw.pipeline import Run

RECIPE = {
    "name": "long",
    "seed": 1,
    "data": {"name": "synthetic", "params": {"size": 24, "resolution": 4, "num_classes": 2}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 2},
              "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
    "train": {"prior": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 3, "ema_decay": 0.9,
                        "checkpoint_every": 100, "log_every": 2}},
    "latents": {"holdout": 0.25},
    "sample": {"n": 2, "batch_size": 2, "params": {"steps": 2, "min_steps": 1}},
    "evaluate": {"metrics": ["nll"]},
}
TRAIN = ["tokenizer", "latents", "prior"]
ENV = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def make_run(out, *overrides, force=False, recipe=RECIPE, **kw) -> Run:
    return Run(validate_recipe(apply_overrides(recipe, list(overrides))), output_dir=str(out), device="cpu",
               force=force, **kw)


def weights(path) -> dict[str, torch.Tensor]:
    return checkpoint.read(path)[0]


def same_weights(a, b) -> bool:
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def text(capsys) -> str:
    """Captured stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def replaced(out, stage="prior0") -> list[Path]:
    return sorted(Path(out).glob(f"{stage}.replaced-*"))


# -- fingerprints, continuing, moving aside ----------------------------------------------------


def test_cadence_changes_reuse_continue_is_bitwise_lowering_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    make_run(out, "train.prior.sample_every=3").run(TRAIN)
    # previews during training (which they leave unchanged: see the bitwise check below)
    assert sorted(p.name for p in (out / "prior0" / "previews").glob("*.png")) == ["step-0000003.png",
                                                                                   "step-0000006.png"]
    model = out / "prior0" / "model.safetensors"
    before, log_before = model.read_bytes(), (out / "prior0" / "log.jsonl").read_text()

    # log/checkpoint/snapshot/sample cadence, workers: the finished stage is reused as it is
    capsys.readouterr()
    make_run(out, "train.prior.log_every=1", "train.prior.checkpoint_every=1", "train.prior.snapshot_every=1",
             "train.prior.sample_every=1", "train.prior.num_workers=1", "train.tokenizer.log_every=3").run(TRAIN)
    assert "prior0: unchanged, reused" in text(capsys)
    assert model.read_bytes() == before
    assert (out / "prior0" / "log.jsonl").read_text() == log_before  # no training step ran
    assert not replaced(out)

    # 6 then 10 steps equals 10 from the start (warm-up then constant: the rate depends on the step only)
    make_run(out, "train.prior.steps=10").run(TRAIN)
    assert "prior0: continuing from step 6 to 10" in text(capsys)
    straight = tmp_path / "straight"
    make_run(straight, "train.prior.steps=10").run(TRAIN)
    assert same_weights(model, straight / "prior0" / "model.safetensors")
    assert not replaced(out)
    logged = [json.loads(line)["step"] for line in (out / "prior0" / "log.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8, 10]  # went on from step 6, not from 0

    # fewer steps than trained: refused before any work, nothing touched
    before = model.read_bytes()
    with pytest.raises(ConfigError, match=r"prior0 was trained for 10 steps and the recipe now asks for 8: "
                                          r"training cannot be shortened"):
        make_run(out, "train.prior.steps=8").run(TRAIN)
    assert model.read_bytes() == before

    # a cosine schedule decays to zero at `steps`: its horizon is an input, so the stage is redone
    make_run(out, "train.prior.steps=10", "train.prior.schedule=cosine").run(TRAIN)
    assert "prior0: inputs changed (train.cosine_horizon, train.schedule)" in text(capsys)
    assert len(replaced(out)) == 1 and same_weights(replaced(out)[0] / "model.safetensors", straight / "prior0" / "model.safetensors")


def test_changed_input_moves_aside_force_deletes_and_a_read_checkpoint_survives(tmp_path, capsys):
    out = tmp_path / "run"
    make_run(out).run(TRAIN)
    first = weights(out / "prior0" / "model.safetensors")
    capsys.readouterr()
    make_run(out, "train.prior.lr=2e-3").run(TRAIN)
    err = text(capsys)
    assert re.search(r"prior0: inputs changed \(train.lr\), recomputing; the previous folder is moved to "
                     r"prior0\.replaced-\d{8}T\d{6}Z", err), err
    (old,) = replaced(out)
    kept = weights(old / "model.safetensors")
    assert all(kept[k].equal(first[k]) for k in first)  # the earlier model, untouched
    assert "tokenizer: unchanged, reused" in err and not replaced(out, "tokenizer")

    make_run(out, "train.prior.lr=3e-3", force=True).run(TRAIN)
    assert "deleted (--force)" in text(capsys)
    assert replaced(out) == [old]  # the lr=2e-3 folder was deleted, not moved

    # the repro: the recipe now reads the trained tokenizer inside the folder it would move
    tok = out / "tokenizer" / "model.safetensors"
    tok_bytes = tok.read_bytes()
    with pytest.raises(ConfigError, match="tokenizer.checkpoint .* lies inside .*tokenizer, whose inputs changed "
                                          "so that it would be moved aside: copy the file out"):
        make_run(out, f"tokenizer.checkpoint={tok}").run(TRAIN)
    assert tok.read_bytes() == tok_bytes and not replaced(out, "tokenizer")
    with pytest.raises(ConfigError, match="would be deleted"):
        make_run(out, f"tokenizer.checkpoint={tok}", force=True).run(TRAIN)
    assert tok.read_bytes() == tok_bytes


def test_warm_start_from_a_model_file_or_a_run_directory(tmp_path):
    src = tmp_path / "src"
    make_run(src).run(TRAIN)
    out = tmp_path / "ft"
    # zero steps: the stage's model is exactly the weights it started from
    make_run(out, f"prior.init_from={src}", "train.prior.steps=0").run(TRAIN)
    assert same_weights(out / "prior0" / "model.safetensors", src / "prior0" / "model.safetensors")
    # a model file, then fine-tuning moves the weights on
    make_run(out, f"prior.init_from={src / 'prior0' / 'model.safetensors'}", "train.prior.steps=2").run(TRAIN)
    assert not same_weights(out / "prior0" / "model.safetensors", src / "prior0" / "model.safetensors")
    # weights of another shape: one line naming the differing params
    other = tmp_path / "other.safetensors"
    genfw.save(other, genfw.registry.build("prior", "sundae", {"unroll_steps": 2}, codebook_size=4, grid=[4, 4],
                                           num_classes=2, context=[],
                                           backbone={"name": "transformer", "params": {"dim": 8, "depth": 1, "heads": 2}}))
    with pytest.raises(ConfigError, match="do not fit the recipe's prior"):
        make_run(tmp_path / "bad", f"prior.init_from={other}").run(TRAIN)
    with pytest.raises(ConfigError, match="not both"):
        make_run(tmp_path / "bad", f"prior.init_from={other}", f"prior.checkpoint={other}")


# -- signals in the trainer (in-process: each signal once) -------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_save_state_like_ctrl_c(tmp_path, sig):
    from genfw.train import Trainer

    out = tmp_path / "run"
    run = make_run(out)
    run.run(["tokenizer", "latents"])
    prior = run.build_prior(run.stage_tokenizer(), 0)
    from genfw.data import LatentDataset

    def prepare(batch):
        codes, labels = batch
        return {"codes": codes[0], "labels": labels, "context": None}

    def on_step(step, logs):
        if step == 2:
            os.kill(os.getpid(), sig)

    spec = run.recipe.train.prior.model_copy(update={"steps": 50, "log_every": 1})
    trainer = Trainer(prior, LatentDataset(out / "latents" / "train"), spec, tmp_path / "t", prepare=prepare,
                      description="prior 0 (sundae)", on_step=on_step)
    with pytest.raises(TrainingError, match=r"prior 0 \(sundae\): interrupted at step 2; state saved to .*"
                                            r"train_state.safetensors, run the same command again to resume"):
        trainer.fit()
    tensors, meta = checkpoint.read(tmp_path / "t" / "train_state.safetensors")
    assert checkpoint.unpack(meta["tree"], tensors)["step"] == 2
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler) or callable(signal.getsignal(sig))


# -- files genfw must not touch -----------------------------------------------------------------


def test_foreign_files_are_refused_and_written_files_follow_the_umask(tmp_path):
    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("my own notes\n")
    result = runner.invoke(app, ["run", str(recipe), "--output-dir", str(mine)])
    assert result.exit_code == 2 and "recipe.yaml was not written by genfw" in result.output
    assert (mine / "recipe.yaml").read_text() == "my own notes\n" and not (mine / "tokenizer").exists()

    for url in ("memory://x", "s3://bucket/run", "file://relative/path"):
        result = runner.invoke(app, ["run", str(recipe), "--output-dir", url])
        assert result.exit_code == 2 and "output directory" in result.output, result.output
    assert not Path("memory:").exists() and not Path("file:").exists()

    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        result = runner.invoke(app, ["run", str(recipe), "--output-dir", f"file://{out}", "--stages",
                                     "tokenizer,latents,prior,sample"])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    for name in ("recipe.yaml", "prior0/model.safetensors", "prior0/train_state.safetensors", "samples/grid.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    assert not (out / "run.lock").exists()  # released at the end

    bundle = tmp_path / "b.safetensors"
    bundle.write_bytes(b"mine")
    result = runner.invoke(app, ["export", str(out), "-o", str(bundle)])
    assert result.exit_code == 2 and "already exists: pass --overwrite" in result.output
    assert bundle.read_bytes() == b"mine"
    result = runner.invoke(app, ["export", str(out), "-o", str(out / "prior0" / "model.safetensors"), "--overwrite"])
    assert result.exit_code == 2 and "inside the stage folders" in result.output
    assert runner.invoke(app, ["export", str(out), "-o", str(bundle), "--overwrite"]).exit_code == 0
    assert genfw.load(bundle) is not None

    samples = tmp_path / "s"
    assert runner.invoke(app, ["sample", str(bundle), "-n", "2", "--out", str(samples)]).exit_code == 0
    first = {p.name: p.read_bytes() for p in samples.glob("*.png")}
    assert len(first) == 2
    result = runner.invoke(app, ["sample", str(bundle), "-n", "2", "--seed", "5", "--out", str(samples)])
    assert result.exit_code == 2 and "already exists: pass --overwrite" in result.output
    assert {p.name: p.read_bytes() for p in samples.glob("*.png")} == first
    assert runner.invoke(app, ["sample", str(bundle), "-n", "2", "--seed", "5", "--out", str(samples),
                               "--overwrite"]).exit_code == 0
    assert {p.name: p.read_bytes() for p in samples.glob("*.png")} != first
    result = runner.invoke(app, ["sample", str(bundle), "-n", "2", "--out", str(out / "samples")])
    assert result.exit_code == 2 and "inside the stage folders" in result.output


def test_eval_force_recomputes_appends_history_and_never_rewrites_the_recipe(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    make_run(out).run()
    recipe_text = (out / "recipe.yaml").read_text()
    history = out / "metrics_history.jsonl"
    assert len(history.read_text().splitlines()) == 1
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    assert len(history.read_text().splitlines()) == 1  # unchanged: reused, nothing appended
    result = runner.invoke(app, ["eval", str(out), "--force"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(out), "--set", "evaluate.batch_size=3"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(records) == 3
    assert records[-1]["changed"] == ["evaluate.batch_size=3"] and records[1]["changed"] == []
    assert records[-1]["genfw_version"] == genfw.__version__ and any(k.startswith("prior0/") for k in records[-1]["metrics"])
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", records[-1]["date"])
    assert (out / "recipe.yaml").read_text() == recipe_text


# a real process (a signal), ~10 s CPU
def test_sigint_during_sample_keeps_the_images_written(tmp_path):
    out = tmp_path / "run"
    make_run(out).run(TRAIN)
    images = tmp_path / "images"
    proc = subprocess.Popen([sys.executable, "-m", "genfw", "sample", str(out), "-n", "200", "--batch-size", "1",
                             "--steps", "40", "--set", "min_steps=40", "--out", str(images)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(proc, lambda: len(list(images.glob("*.png"))) >= 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    kept = sorted(images.glob("*.png"))
    assert proc.returncode == 1, err
    match = re.fullmatch(r"error: interrupted: (\d+) of 200 images were written to \S+ and are kept\n", err)
    assert match and int(match.group(1)) == len(kept) >= 3 and len(kept) < 200, err
    assert [p.name[:5] for p in kept] == [f"{i:05d}" for i in range(len(kept))]


# -- one real-process sequence: lock, SIGTERM, snapshot sampled mid-run, SIGKILL, stale lock ----


def start(recipe, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "genfw", "run", str(recipe), "--output-dir", str(out),
                             "--stages", "tokenizer,latents,prior", *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc) -> None:
    """Kill a process this test started if it is still there (paused or not)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.communicate(timeout=60)


def saved_step(out) -> int:
    try:
        tensors, meta = checkpoint.read(Path(out) / "prior0" / "train_state.safetensors")
        return int(checkpoint.unpack(meta["tree"], tensors)["step"])
    except Exception:  # noqa: BLE001 - absent, or being replaced right now
        return -1


def wait_for(proc, predicate, timeout=180) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# four real processes (lock, signals, SIGKILL), ~45 s CPU
def test_lock_sigterm_snapshot_sigkill_stale_lock_then_bitwise_equal(tmp_path, request):
    steps = 150
    recipe_dict = {**RECIPE, "train": {"prior": {**RECIPE["train"]["prior"], "steps": steps, "checkpoint_every": 1,
                                                 "snapshot_every": 2}}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict))
    out = tmp_path / "run"
    holder = start(recipe, out)
    request.addfinalizer(lambda: stop(holder))  # a failed assertion leaves no paused process behind
    assert wait_for(holder, lambda: saved_step(out) >= 3)

    # a second run on the same directory fails fast, naming the holder (paused meanwhile, so
    # that a slow start-up of the second process does not let the first one finish)
    baseline = startup_seconds()
    holder.send_signal(signal.SIGSTOP)
    t0 = time.time()
    second = subprocess.run([sys.executable, "-m", "genfw", "run", str(recipe), "--output-dir", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=60)
    elapsed = time.time() - t0
    holder.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and f"is in use by PID {holder.pid} on host" in second.stderr, second.stderr
    assert second.stderr.strip().count("\n") == 0
    # fast: the holder is paused, so a second run that waited for the lock would never get it (and
    # hit the 60 s timeout above); one that fails fast costs `genfw run`'s start-up (importing torch
    # and the pipeline: 2-5 s on a loaded 2-core machine, measured 5.01 s once), so the bound leaves
    # room for that, or for twice a bare `genfw --version` on a slower machine
    assert elapsed < max(15.0, 2 * baseline), (elapsed, baseline)

    # a snapshot of the training still going on is sampled, and says its step
    assert wait_for(holder, lambda: (out / "prior0" / "snapshot.safetensors").exists())
    # paused meanwhile (it keeps its lock, so it is still going): sampling and evaluating here are
    # slower than the rest of its training when this process has not imported the metrics yet (the
    # test run alone), and a finished run would be evaluated the ordinary way
    holder.send_signal(signal.SIGSTOP)
    result = CliRunner().invoke(app, ["sample", str(out), "-n", "2", "--out", str(tmp_path / "mid")])
    assert result.exit_code == 0, result.output
    assert re.search(r"prior0 is still training: using its snapshot at step \d+", result.output)
    assert len(list((tmp_path / "mid").glob("*.png"))) == 2
    result = CliRunner().invoke(app, ["eval", str(out)])  # evaluated beside the run, on the snapshot
    holder.send_signal(signal.SIGCONT)
    assert result.exit_code == 0, result.output
    assert re.search(r"the run is still going \(PID \d+ .*\): evaluating prior0 snapshot at step \d+",
                     " ".join(result.output.split()))
    (folder,) = (out / "evaluations").iterdir()
    assert (folder / "metrics.json").exists() and not (out / "metrics.json").exists()
    (record,) = [json.loads(line) for line in (out / "metrics_history.jsonl").read_text().splitlines()]
    assert record["snapshots"]["prior0"] >= 2
    assert holder.poll() is None  # training went on

    # SIGTERM (Slurm, Kubernetes): the state is saved, the message is Ctrl-C's
    holder.send_signal(signal.SIGTERM)
    _, err = holder.communicate(timeout=60)
    assert holder.returncode == 1 and re.fullmatch(
        r"error: prior 0 \(sundae\): interrupted at step (\d+); state saved to \S+train_state.safetensors, "
        r"run the same command again to resume\n", err), err
    stopped = saved_step(out)
    assert stopped == int(re.search(r"step (\d+)", err).group(1)) < steps
    assert not (out / "run.lock").exists()

    # SIGKILL leaves a stale lock (and maybe a temporary file): the rerun takes over and finishes
    killed = start(recipe, out)
    assert wait_for(killed, lambda: saved_step(out) >= stopped + 3)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert (out / "run.lock").exists() and saved_step(out) < steps
    leftover = out / "prior0" / ".train_state.safetensors.abcd1234.tmp"  # as a kill mid-write leaves
    leftover.write_bytes(b"partial")
    final = start(recipe, out)
    straight = tmp_path / "straight"  # the uninterrupted run, in this process meanwhile
    make_run(straight, recipe=recipe_dict).run(TRAIN)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    err = " ".join(err.split())
    assert f"taking over the lock of PID {killed.pid} on host" in err and "which is no longer running" in err
    assert re.search(r"removed [12] temporary file", err), err
    assert not list(out.rglob("*.tmp")) and not (out / "run.lock").exists()
    assert same_weights(out / "prior0" / "model.safetensors", straight / "prior0" / "model.safetensors")


_startup: list[float] = []


def startup_seconds() -> float:
    """How long a bare `genfw --version` takes here: Python's start-up, not genfw's work."""
    if not _startup:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "genfw", "--version"], env=ENV, capture_output=True, timeout=60)
        _startup.append(time.time() - t0)
    return _startup[0]


def test_lock_rejects_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from genfw.rundir import RunLock

    lock = RunLock(str(tmp_path))
    lock.acquire()
    info = json.loads((tmp_path / "run.lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started"]
    # another process sees it held
    code = ("import sys; from genfw.rundir import RunLock\n"
            "try:\n RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n print(e)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert f"is in use by PID {os.getpid()}" in out.stdout
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    # a lock file of a dead process on this host (its flock gone with it)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                   "started": "earlier"}))
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    with pytest.raises(GenfwError):  # a foreign host's lock is not guessed at
        (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
        lock.acquire()


def test_readme_tour_continues_the_quickstart_prior():
    """README: `genfw run quickstart train.prior.steps=2000` trains on, not anew."""
    from genfw.config import load_recipe

    root = Path(__file__).parents[1]
    assert "genfw run quickstart train.prior.steps=2000" in (root / "README.md").read_text()
    base = Run(load_recipe(root / "recipes" / "quickstart.yaml"), device="cpu")
    longer = Run(load_recipe(root / "recipes" / "quickstart.yaml", ["train.prior.steps=2000"]), device="cpu")
    for stage in ("tokenizer", "latents", "prior0"):
        assert base.stage(stage).fingerprint() == longer.stage(stage).fingerprint(), stage
    assert base.stage("prior0").steps() == 1200 and longer.stage("prior0").steps() == 2000
    assert base.stage("samples").fingerprint() != longer.stage("samples").fingerprint()  # new samples


def test_no_import_circle_between_pipeline_evaluate_and_report():
    root = Path(__file__).parents[1] / "genfw"
    for path in [root / "evaluate.py", root / "report.py", root / "context.py", *(root / "stages").glob("*.py")]:
        assert "genfw.pipeline" not in path.read_text().replace("``genfw.pipeline", ""), path
