"""Crashes: SIGKILL at random points and Ctrl-C, then resume; the result equals an uninterrupted run."""

import os
import random
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
    "train": {"prior": {"steps": 150, "batch_size": 8, "checkpoint_every": 3, "log_every": 10, "ema_decay": 0.9}},
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
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if saved_step(out) >= target:
                return True
        except Exception:  # noqa: BLE001 - the file is being replaced right now
            pass
        time.sleep(0.02)
    return False


def final_weights(out):
    tensors, _ = checkpoint.read(out / "prior0" / "model.safetensors")
    return tensors


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    straight = tmp_path / "straight"
    assert start(recipe, straight).wait(timeout=300) == 0

    killed = tmp_path / "killed"
    rng = random.Random(1234)
    targets = sorted(rng.sample(range(5, 140), 3))
    kills = 0
    for target in targets:
        proc = start(recipe, killed)
        if wait_for_step(proc, killed, target):
            time.sleep(rng.uniform(0, 0.05))  # land anywhere, also inside a checkpoint write
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2, "the run finished before it could be killed"
    assert start(recipe, killed).wait(timeout=300) == 0
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_ctrl_c_saves_state_and_the_rerun_resumes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    proc = start(recipe, out)
    assert wait_for_step(proc, out, 10)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted at step" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    step = saved_step(out)
    assert step >= 10
    rerun = start(recipe, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert saved_step(out) == RECIPE["train"]["prior"]["steps"]
