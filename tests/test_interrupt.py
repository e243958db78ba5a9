"""Crashes: SIGKILL at random points and Ctrl-C, then resume; the result equals an uninterrupted run."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import yaml

from genfw import checkpoint

RECIPE = {
    "name": "killable",
    "seed": 5,
    "data": {"name": "synthetic", "params": {"size": 40, "resolution": 4, "num_classes": 2}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 2},
              "backbone": {"name": "transformer", "params": {"dim": 32, "depth": 2, "heads": 2}}},
    "train": {"prior": {"steps": 160, "batch_size": 8, "checkpoint_every": 2, "log_every": 5, "ema_decay": 0.9}},
    "latents": {"holdout": 0.2},
    "sample": {"n": 2, "batch_size": 2, "params": {"steps": 2, "min_steps": 1}},
    "evaluate": {"metrics": ["nll"]},
}
ENV = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def start(recipe, out):
    return subprocess.Popen([sys.executable, "-m", "genfw", "run", str(recipe), "--output-dir", str(out),
                             "--stages", "tokenizer,latents,prior"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def saved_step(out) -> int:
    path = out / "prior0" / "train_state.safetensors"
    if not path.exists():
        return -1
    tensors, meta = checkpoint.read(path)
    return int(checkpoint.unpack(meta["tree"], tensors)["step"])


def wait_for_step(proc, out, target, timeout=120):
    """Wait until this process has logged a step >= target (records of earlier runs are skipped).

    The append-only log is watched, not the training state: reading a state file that the trainer
    replaces every few milliseconds lagged behind a fast run until it had finished.
    """
    earlier = len(logged_steps(out))
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(step >= target for step in logged_steps(out)[earlier:]):
            return True
        time.sleep(0.01)
    return False


def final_weights(out):
    tensors, _ = checkpoint.read(out / "prior0" / "model.safetensors")
    return tensors


def logged_steps(out) -> list[int]:
    """Steps in the trainer's append-only log (a line cut by a kill is skipped)."""
    path = out / "prior0" / "log.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def test_ctrl_c_and_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path):
    """One run: Ctrl-C (saves and says so), then SIGKILL at three random points, each time resumed.

    Process start-up dominates the time, so both kinds of interruption share one sequence.
    """
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    straight = tmp_path / "straight"
    reference = start(recipe, straight)  # the uninterrupted run, alongside the interrupted ones
    out = tmp_path / "interrupted"

    # Ctrl-C: the state is saved at the step reached (between checkpoints), non-zero exit, one line
    proc = start(recipe, out)
    assert wait_for_step(proc, out, 10)
    # Frozen, the run cannot finish between the look at its state and the signal: a state short of
    # the last step means it is inside the training loop, where Ctrl-C must save.
    proc.send_signal(signal.SIGSTOP)
    before = saved_step(out)
    assert 6 <= before < RECIPE["train"]["prior"]["steps"], before
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, (proc.returncode, before, saved_step(out), stdout, err)
    match = re.search(r"interrupted at step (\d+); state saved to \S+train_state.safetensors, "
                      r"run the same command again to resume", err)
    assert match and err.strip().count("\n") == 0, err
    interrupts = [(len(logged_steps(out)), saved_step(out))]
    assert interrupts[0][1] == int(match.group(1)) >= 6

    rng = random.Random(1234)
    targets = sorted(rng.sample(range(interrupts[0][1] + 2, RECIPE["train"]["prior"]["steps"] - 10), 3))
    for target in targets:
        proc = start(recipe, out)
        if wait_for_step(proc, out, target):
            time.sleep(rng.uniform(0, 0.05))  # land anywhere, also inside a checkpoint write
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            interrupts.append((len(logged_steps(out)), saved_step(out)))
    assert len(interrupts) >= 3, "the run finished before it could be killed"
    final = start(recipe, out)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    steps = logged_steps(out)
    for records, step in interrupts:  # each rerun went on from the saved state, not from step 0
        assert 0 < step and steps[records] > step, (interrupts, steps)
    assert saved_step(out) == RECIPE["train"]["prior"]["steps"]
    a, b = final_weights(straight), final_weights(out)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), "resumed weights differ from the uninterrupted run"
