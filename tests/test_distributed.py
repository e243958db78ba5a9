"""Data-parallel training on 2 CPU processes (gloo) matches one process with the same global batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
import yaml
from torch import nn

from genfw import checkpoint
from genfw.config import TrainSpec
from genfw.interfaces import Component, StepOutput
from genfw.train import Trainer

SPEC = TrainSpec(steps=12, batch_size=8, lr=0.05, checkpoint_every=3, log_every=4)


class Net(Component):
    """A deterministic little regression net (no randomness in the loss)."""

    def __init__(self, params=None, **construct):
        super().__init__(params, **construct)
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, step):
        x, y = batch
        return StepOutput({"main": (self.body(x).squeeze(-1) - y).pow(2).mean()})


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x * torch.tensor([1.0, -1.0, 2.0, 0.5])).sum(-1).sin())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, steps_list: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GENFW_PROGRESS="0")
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for steps in steps_list:  # several fits = interrupted and resumed
            Trainer(Net(), data(), SPEC.model_copy(update={"steps": steps}), out).fit()
    finally:
        td.destroy_process_group()


def _weights(out: str) -> dict:
    tensors, meta = checkpoint.read(os.path.join(out, "train_state.safetensors"))
    return checkpoint.unpack(meta["tree"], tensors)["model"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_resume(tmp_path):
    single = str(tmp_path / "single")
    Trainer(Net(), data(), SPEC, single).fit()

    straight = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), straight, [SPEC.steps]), nprocs=2, join=True)
    resumed = str(tmp_path / "ddp-resumed")
    mp.spawn(_worker, args=(2, _free_port(), resumed, [6]), nprocs=2, join=True)
    mp.spawn(_worker, args=(2, _free_port(), resumed, [SPEC.steps]), nprocs=2, join=True)

    one, two, again = _weights(single), _weights(straight), _weights(resumed)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k  # same global batch: same training
        assert torch.equal(two[k], again[k]), k  # a resumed distributed run continues exactly


@pytest.mark.slow
def test_torchrun_runs_the_pipeline(tmp_path):
    recipe = {
        "name": "ddp",
        "data": {"name": "synthetic", "params": {"size": 24, "resolution": 4, "num_classes": 2}},
        "tokenizer": {"name": "pixels", "params": {"levels": 4}},
        "prior": {"name": "sundae", "params": {"unroll_steps": 2},
                  "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
        "train": {"prior": {"steps": 4, "batch_size": 4}},
        "latents": {"holdout": 0.25},
        "sample": {"n": 2, "batch_size": 2, "params": {"steps": 2, "min_steps": 1}},
        "evaluate": {"metrics": ["nll"]},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "genfw", "run", str(path), "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "run" / "prior0" / "model.safetensors").exists()
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "samples" / "grid.png").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "unchanged, reused" in again.stdout + again.stderr
