"""Nothing lost, round 3 (issue 21): the last ways to lose a file, a log line or a run's truth.

Write targets (never over a file without --overwrite, never through a symlink, never into a
stage folder), files opened for appending in a run directory (never through a symlink),
--force (only genfw's own folders), EMA (never the initial weights), a refused run (changes no
record), loggers at resume and continue (no step lost) and interrupted stages (what was kept).
Real processes only where the failure needs one (signals).
"""

import json
import os

import pytest
import yaml
from helpers import TINY_RECIPE, FastCliRunner

from genfw.cli import app


def cli(*args):
    return FastCliRunner().invoke(app, [str(a) for a in args])


def write_recipe(tmp_path, **changes) -> str:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def one_line_error(result, *words):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (20 prior steps) to copy: tokenizer, latents, prior, samples."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp, **{"train.prior.steps": 20, "train.prior.log_every": 10})
    result = cli("run", recipe, "-o", tmp / "run", "--stages", "tokenizer,latents,prior,sample")
    assert result.exit_code == 0, result.output
    return tmp


def copy_run(finished_run, tmp_path):
    import shutil

    shutil.copytree(finished_run / "run", tmp_path / "run")
    shutil.copy(finished_run / "r.yaml", tmp_path / "r.yaml")
    return tmp_path / "run", str(tmp_path / "r.yaml")


# --------------------------------------------------------------------------------------------
# 3. --force deletes only genfw's own folders


def test_force_moves_a_foreign_folder_aside_instead_of_deleting_it(finished_run, tmp_path):
    run, recipe = copy_run(finished_run, tmp_path)
    import shutil

    shutil.rmtree(run / "samples")
    (run / "samples").mkdir()
    (run / "samples" / "pic.png").write_bytes(b"the user's picture")
    result = cli("run", recipe, "-o", run, "--stages", "sample", "--force")
    assert result.exit_code == 0, result.output
    kept = [p for p in run.glob("samples.replaced-*/pic.png")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"the user's picture", result.output
    assert "moved to samples.replaced-" in result.output


# --------------------------------------------------------------------------------------------
# 4. EMA


def test_ema_every_beyond_steps_is_refused_by_validate_and_run(tmp_path):
    recipe = write_recipe(tmp_path, **{"train.prior.ema_decay": 0.99, "train.prior.ema_every": 1000})
    for command in (["validate", recipe], ["run", recipe, "-o", tmp_path / "run", "--dry-run"]):
        result = cli(*command)
        one_line_error(result, "ema_every 1000 is larger than steps 3")
    assert not (tmp_path / "run").exists()


def tiny_prior():
    from genfw.registry import build

    return build("prior", "sundae", {"unroll_steps": 2}, codebook_size=4, grid=[4, 4], num_classes=0, context=[],
                 backbone={"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}})


def fit(prior, folder, every=None, log=(), **spec):
    """Train ``prior`` on random codes with the real Trainer into ``folder`` (resuming from its state)."""
    import torch

    from genfw.config import TrainSpec
    from genfw.train import Trainer

    codes = torch.randint(0, 4, (8, 4, 4), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(prior, torch.utils.data.TensorDataset(codes), TrainSpec(batch_size=4, lr=1e-2, **spec),
                      folder, seed=0, device="cpu", prepare=lambda b: {"codes": b[0], "labels": None, "context": None},
                      description="tiny", every=every, log=list(log))
    return trainer.fit()


def test_the_ema_model_is_never_the_initial_weights(tmp_path):
    """Before the EMA's first update, the final (and snapshot) module is the trained one."""
    import torch

    prior = tiny_prior()
    initial = {k: v.clone() for k, v in prior.state_dict().items()}
    seen = {}

    def at_step_1(trainer):
        if trainer.step == 1:  # before the EMA's first update (at step 2)
            seen["module"] = {k: v.clone() for k, v in trainer.final_module().state_dict().items()}
            seen["live"] = {k: v.clone() for k, v in trainer.module.state_dict().items()}

    fit(prior, tmp_path, every=[(1, at_step_1)], steps=2, ema_decay=0.9, ema_every=2)
    key = next(k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, seen["live"][k]))
    assert torch.equal(seen["module"][key], seen["live"][key])
    assert not torch.equal(seen["module"][key], initial[key])


# --------------------------------------------------------------------------------------------
# 5. a refused run changes no record


def test_a_refused_shortening_changes_no_record(finished_run, tmp_path):
    run, recipe = copy_run(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in [run / "recipe.yaml", run / "prior0" / "stage.json"]}
    result = cli("run", recipe, "-o", run, "--set", "train.prior.steps=5")
    one_line_error(result, "cannot be shortened")
    assert {p: p.read_bytes() for p in before} == before


def test_an_interrupted_stage_refused_for_fewer_steps_keeps_its_record(finished_run, tmp_path):
    run, recipe = copy_run(finished_run, tmp_path)
    stage = run / "prior0" / "stage.json"
    stage.write_text(stage.read_text().replace('"complete": true', '"complete": false'))
    before = {p: p.read_bytes() for p in [run / "recipe.yaml", stage]}
    result = cli("run", recipe, "-o", run, "--set", "train.prior.steps=5")
    one_line_error(result, "saved training state is at step 20", "cannot be shortened")
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("steps", [10, 30])
def test_stages_sample_with_a_changed_prior_is_refused(finished_run, tmp_path, steps):
    run, recipe = copy_run(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in [run / "recipe.yaml", run / "prior0" / "stage.json",
                                          run / "samples" / "stage.json"]}
    result = cli("run", recipe, "-o", run, "--stages", "sample", "--set", f"train.prior.steps={steps}")
    one_line_error(result, "prior0")
    assert {p: p.read_bytes() for p in before} == before


# --------------------------------------------------------------------------------------------
# 1. every command that writes a file the user names: one shared check


def _writers(target):
    """Each writing command aimed at ``target`` (the check runs before any work)."""
    t = str(target)
    return {
        "schema": ["schema", "-o", t],
        "recipes-copy": ["recipes", "copy", "quickstart", t],
        "export": ["export", "nowhere", "-o", t],
        "assemble": ["assemble", "-o", t, "--tokenizer", "nowhere", "--prior", "nowhere"],
        "convert": ["convert", "vqvae2", "nowhere.pt", "-o", t],
        "bench": ["bench", "nowhere.yaml", "--json", t],
    }


WRITERS = list(_writers("x"))


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_refuse_existing_files_links_directories_and_stage_folders(tmp_path, writer):
    victim = tmp_path / "victim.yaml"
    victim.write_text("the user's file\n")
    cases = {}
    cases["existing file"] = (victim, [], "already exists: pass --overwrite")
    link = tmp_path / "link.yaml"
    link.symlink_to(victim)
    cases["symlink"] = (link, ["--overwrite"], "is a symbolic link")
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "elsewhere" / "made.yaml")
    cases["dangling symlink"] = (dangling, ["--overwrite"], "is a symbolic link: genfw never writes through one")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    cases["directory"] = (folder, ["--overwrite"], "is a directory")
    run = tmp_path / "run"
    (run / "prior0").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: x\n")
    model = run / "prior0" / "model.yaml"
    model.write_text("weights\n")
    cases["stage folder"] = (model, ["--overwrite"], "inside the stage folders")
    for case, (target, extra, words) in cases.items():
        result = cli(*_writers(target)[writer], *extra)
        assert result.exit_code == 2, (case, result.output)
        one_line_error(result, words)
    assert victim.read_text() == "the user's file\n" and model.read_text() == "weights\n"
    assert not (tmp_path / "elsewhere").exists() and os.path.islink(dangling)
    assert sorted(p.name for p in folder.iterdir()) == []


def test_schema_and_recipes_copy_replace_a_file_with_overwrite(tmp_path):
    target = tmp_path / "s.json"
    target.write_text("old\n")
    assert cli("schema", "-o", target, "--overwrite").exit_code == 0
    assert json.loads(target.read_text())["title"]
    copy = tmp_path / "q.yaml"
    copy.write_text("old\n")
    assert cli("recipes", "copy", "quickstart", copy, "--overwrite").exit_code == 0
    assert "quickstart" in copy.read_text()


# --------------------------------------------------------------------------------------------
# 2. files written in place in a run directory: never through a link


def test_a_symlinked_run_lock_is_refused(tmp_path):
    """``ln -s ../victim RUN/run.lock; genfw run`` must not truncate the link's target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    result = cli("run", write_recipe(tmp_path), "-o", run, "--stages", "tokenizer")
    one_line_error(result, "run.lock is a symbolic link")
    assert victim.read_text() == "the user's file\n"
    assert os.path.islink(run / "run.lock") and not (run / "tokenizer").exists()
    (run / "run.lock").unlink()
    os.mkfifo(run / "run.lock")  # opened without waiting for a writer, and refused
    one_line_error(cli("run", write_recipe(tmp_path), "-o", run, "--stages", "tokenizer"), "not a regular file")


def test_a_fifo_or_link_is_never_opened_for_appending(tmp_path):
    from genfw import io
    from genfw.errors import GenfwError

    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "dangling").symlink_to(tmp_path / "made.txt")
    os.mkfifo(tmp_path / "fifo")
    for name, words in (("link", "symbolic link"), ("dangling", "symbolic link"), ("fifo", "not a regular file")):
        with pytest.raises(GenfwError, match=words):
            io.open_append(tmp_path / name)
        with pytest.raises(GenfwError, match=words):
            io.check_plain_file(tmp_path / name)
    assert victim.read_text() == "mine\n" and not (tmp_path / "made.txt").exists()
    with io.open_append(tmp_path / "log") as f:
        f.write(b"a\n")
    assert (tmp_path / "log").read_bytes() == b"a\n"


def test_symlinked_logs_and_history_are_not_written_through(finished_run, tmp_path):
    run, recipe = copy_run(finished_run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    (run / "prior0" / "log.jsonl").unlink()
    (run / "prior0" / "log.jsonl").symlink_to(victim)
    (run / "metrics_history.jsonl").symlink_to(victim)
    (tmp_path / "elsewhere").mkdir()
    (run / "prior0" / "tensorboard").symlink_to(tmp_path / "elsewhere")
    # evaluation appends to the history: refused before any work
    result = cli("run", recipe, "-o", run, "--stages", "evaluate")
    one_line_error(result, "metrics_history.jsonl is a symbolic link")
    assert not (run / "evaluate").exists()
    # continuing the prior: the logger is switched off with a warning, training goes on
    result = cli("run", recipe, "-o", run, "--stages", "prior", "--set", "train.prior.steps=22",
                 "--set", "train.prior.log_every=1", "--set", "log=[jsonl,csv,tensorboard]")
    assert result.exit_code == 0, result.output
    assert "log.jsonl is a symbolic link" in result.output and "tensorboard is a symbolic link" in result.output
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert victim.read_text() == "the user's file\n"
    assert os.path.islink(run / "prior0" / "log.jsonl")
    assert [row.split(",")[0] for row in (run / "prior0" / "log.csv").read_text().splitlines()[1:]] == ["21", "22"]


# --------------------------------------------------------------------------------------------
# 6. loggers at resume and continue


def test_logs_keep_every_step_across_two_continues_and_a_resume(tmp_path, monkeypatch):
    """log.csv and log.jsonl hold every logged step; TensorBoard the loss and the image at each resume step."""
    from tensorboard.summary.writer import event_file_writer
    from test_loggers import events, read_csv, read_jsonl

    # TensorBoard reads a folder's event files in name order, and names made by one process in
    # the same second differ only by a counter, compared as text ("10" < "9"): a counter that
    # gains a digit between these sessions would reorder them. Separate runs are separate processes.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(10**6))

    from genfw.loggers import image_to_uint8

    def image(trainer):
        trainer.loggers.log_image(trainer.step, "samples", image_to_uint8(torch.zeros(1, 4, 4, dtype=torch.uint8)))

    import torch

    log = ["jsonl", "csv", "tensorboard"]
    for steps in (2, 4, 6):  # a finished stage, continued twice
        fit(tiny_prior(), tmp_path, every=[(1, image)], log=log, steps=steps, log_every=1)
    state = (tmp_path / "train_state.safetensors").read_bytes()
    fit(tiny_prior(), tmp_path, every=[(1, image)], log=log, steps=8, log_every=1)
    # killed after step 8 with its state at step 6: steps 7-8 come again (and 9)
    (tmp_path / "train_state.safetensors").write_bytes(state)
    fit(tiny_prior(), tmp_path, every=[(1, image)], log=log, steps=9, log_every=1)
    everything = list(range(1, 10))
    assert sorted(read_csv(tmp_path)["loss/main"]) == everything
    assert [int(r.split(",")[0]) for r in (tmp_path / "log.csv").read_text().splitlines()[1:]] == everything
    assert sorted(read_jsonl(tmp_path)["loss/main"]) == everything
    acc = events(tmp_path)
    assert [e.step for e in acc.Scalars("loss/main")] == everything
    assert [e.step for e in acc.Images("samples")] == everything


class _ListLogger:
    """Records in a JSON file; ``keep(step, start_step)`` decides what survives a reopen."""

    keep = staticmethod(lambda step, start_step: step < start_step)

    def __init__(self, params=None, **construct):
        from genfw.loggers import Logger

        Logger.__init__(self, params, **construct)
        self.path = os.path.join(self.directory, "records.json")
        os.makedirs(self.directory, exist_ok=True)
        old = json.loads(open(self.path).read()) if os.path.exists(self.path) else []
        self.records = [r for r in old if self.keep(r[0], self.start_step)]

    def log_scalars(self, step, scalars):
        self.records.append([step, scalars])

    def close(self):
        with open(self.path, "w") as f:
            json.dump(self.records, f)


def _read_first(directory):  # a reader that takes the first value of a step (as W&B does)
    out = {}
    for step, scalars in json.loads(open(os.path.join(directory, "records.json")).read()):
        for tag, value in scalars.items():
            out.setdefault(tag, {}).setdefault(step, value)
    return out


def _logger(keep):
    from genfw.loggers import Logger

    return type("Wrong", (_ListLogger, Logger), {"keep": staticmethod(keep)})


def test_check_logger_passes_the_right_logger_and_fails_the_wrong_ones():
    from genfw.testing import check_logger

    check_logger(_logger(lambda step, start: step < start), read_back=_read_first)
    with pytest.raises(AssertionError, match="step 3 not read back"):  # the old trainer's loss: one step early
        check_logger(_logger(lambda step, start: step < start - 1), read_back=_read_first)
    with pytest.raises(AssertionError, match="step 5: read back 9.0"):  # keeps what came after the state
        check_logger(_logger(lambda step, start: True), read_back=_read_first)


def test_csv_survives_a_metric_named_step_or_holding_a_newline(tmp_path):
    from genfw_loggers.files import CSV, JSONLines
    from test_loggers import read_csv

    for cls in (CSV, JSONLines):
        for start, steps in ((1, (1, 2)), (3, (3,))):
            logger = cls(directory=str(tmp_path), start_step=start)
            for step in steps:
                logger.log_scalars(step, {"step": 100.0 + step, "a\nb": float(step), "c\r": 1.0})
            logger.close()
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0] == "step,metric/step,a\\nb,c\\r" and len(rows) == 4
    assert read_csv(tmp_path)["metric/step"] == {1: 101.0, 2: 102.0, 3: 103.0}
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[2]["metric/step"] == 103.0


# --------------------------------------------------------------------------------------------
# 7. interrupted stages say so, keep what they made and say how to go on


def test_sigterm_during_the_sample_stage_keeps_the_images_made(finished_run, tmp_path):
    """A real process: SIGTERM once the first images are on disk; they stay, and the error says so."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    run, recipe = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / "samples")
    env = {**os.environ, "GENFW_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "genfw", "run", recipe, "-o", str(run), "--stages", "sample",
                             "--set", "sample.n=20000", "--set", "sample.batch_size=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(run.glob("samples/0000[2-9]*.png")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    kept = sorted(run.glob("samples/0*.png"))
    assert f"samples: interrupted after {len(kept)} of 20000 images; those are kept" in " ".join(err.split()), err
    assert len(kept) >= 2 and "Traceback" not in err


def test_an_interrupt_just_after_a_png_is_renamed_counts_that_png(finished_run, tmp_path, monkeypatch):
    """The count in the message is exact even when the interrupt lands between a PNG's atomic rename
    and its bookkeeping (seen once in CI: 15 PNGs on disk, "after 14")."""
    import genfw.stages.sample as sample_stage

    run, recipe = copy_run(finished_run, tmp_path)
    import shutil

    shutil.rmtree(run / "samples")
    real = sample_stage.write_images
    calls = []

    def write_then_interrupt(*args, **kwargs):
        paths = real(*args, **kwargs)  # on disk now
        calls.append(paths)
        if len(calls) == 3:
            raise KeyboardInterrupt  # before the stage could record it
        return paths

    monkeypatch.setattr(sample_stage, "write_images", write_then_interrupt)
    result = cli("run", recipe, "-o", run, "--stages", "sample", "--set", "sample.n=8", "--set", "sample.batch_size=2")
    kept = sorted(run.glob("samples/0*.png"))
    assert len(kept) == 3
    one_line_error(result, "samples: interrupted after 3 of 8 images; those are kept")


@pytest.mark.parametrize("stage", ["latents", "evaluate"])
def test_an_interrupted_latents_or_evaluate_stage_says_what_it_kept(finished_run, tmp_path, monkeypatch, stage):
    import genfw_vq.pixels


    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "latents":
        monkeypatch.setattr(genfw_vq.pixels.Pixels, "encode", interrupt)
        args, words = ["--stages", "latents"], "latents: interrupted after encoding 0"
    else:
        monkeypatch.setattr("genfw.evaluate.evaluate_run", interrupt)
        args, words = ["--stages", "evaluate"], "evaluate: interrupted; the models and samples are kept"
    import shutil

    run, recipe = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / stage, ignore_errors=True)
    result = cli("run", recipe, "-o", run, *args)
    one_line_error(result, words, "run the same command again")
    assert result.exit_code == 1


# --------------------------------------------------------------------------------------------
# docs/errors.md lists every refusal above


DOC_ROWS = {
    "write-target-exists": ("already exists: pass --overwrite to replace it", 2),
    "write-target-symlink": ("is a symbolic link: genfw never writes through one", 2),
    "write-target-directory": ("is a directory: give the path of the schema to write", 2),
    "write-target-in-stage": ("lies inside the stage folders of the run directory", 2),
    "run-lock-symlink": ("run.lock is a symbolic link", 1),
    "run-lock-fifo": ("not a regular file", 1),
    "history-symlink": ("metrics_history.jsonl is a symbolic link", 1),
    "log-symlink": ("log.jsonl is a symbolic link", 0),
    "force-foreign-folder": ("moved to samples.replaced-", 0),
    "ema-every-beyond-steps": ("ema_every 1000 is larger than steps 3", 2),
    "resume-beyond-steps": ("saved training state is at step 20", 2),
    "read-stage-changed": ("is only read by this run (--stages) but the recipe no longer matches it", 2),
    "sample-stage-interrupted": ("samples: interrupted after 12 of 20000 images; those are kept", 1),
    "latents-stage-interrupted": ("latents: interrupted after encoding 0", 1),
    "evaluate-stage-interrupted": ("evaluate: interrupted; the models and samples are kept", 1),
}


def test_docs_list_every_refusal_with_its_message_and_exit_code():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines() if line.startswith("| `")}
    for case_id, (fragment, code) in DOC_ROWS.items():
        assert case_id in rows, f"docs/errors.md lacks {case_id}"
        assert fragment in rows[case_id] and rows[case_id].rstrip().endswith(f"| {code} |"), rows[case_id]
