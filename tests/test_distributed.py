"""Data-parallel training on 2 CPU processes (gloo) matches one process with the same global batch."""

import json
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
from typer.testing import CliRunner

from genfw import checkpoint
from genfw.cli import app
from genfw.config import TrainSpec
from genfw.errors import ConfigError
from genfw.interfaces import Component, StepOutput
from genfw.train import Trainer

SPEC = TrainSpec(steps=12, batch_size=8, lr=0.05, checkpoint_every=3, log_every=4)


class Net(Component):
    """A deterministic little regression net (no randomness in the loss).

    ``rare`` only takes part for targets above 0.8, so on some steps one rank has a gradient
    for it and the other has none: the averaging must still agree with one process.
    """

    def __init__(self, params=None, always_used=False, **construct):
        super().__init__(params, **construct)
        self.always_used = always_used
        torch.manual_seed(0)
        # a ModuleList: FSDP shards each of its elements as a unit of its own
        self.blocks = nn.ModuleList([nn.Linear(4, 16), nn.Linear(16, 1)])
        self.rare = nn.Parameter(torch.zeros(1))  # (1,): FSDP cannot shard a 0-dim tensor

    def training_step(self, batch, step):
        x, y = batch
        pred = self.blocks[1](torch.tanh(self.blocks[0](x))).squeeze(-1)
        hit = y > 0.8
        if self.always_used:  # FSDP2 needs every parameter in every rank's step (docs/distributed.md)
            pred = pred + hit * self.rare
        elif hit.any():
            pred = pred + torch.where(hit, self.rare, torch.zeros(1))
        return StepOutput({"main": (pred - y).pow(2).mean()})


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x * torch.tensor([1.0, -1.0, 2.0, 0.5])).sum(-1).sin())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, list[int]]], engine: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GENFW_PROGRESS="0")
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for out, steps_list in jobs:
            for steps in steps_list:  # several fits into one folder = interrupted and resumed
                Trainer(Net(always_used=engine == "fsdp"), data(),
                        SPEC.model_copy(update={"steps": steps, "distributed": engine}), out).fit()
        try:
            Trainer(Net(), data(), SPEC.model_copy(update={"batch_size": 7}), jobs[0][0] + "-odd")
            raise AssertionError("an odd global batch was accepted")
        except ConfigError as e:
            assert "not divisible by the 2 processes" in str(e)
    finally:
        td.destroy_process_group()


def _weights(out: str) -> dict:
    tensors, meta = checkpoint.read(os.path.join(out, "train_state.safetensors"))
    return checkpoint.unpack(meta["tree"], tensors)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_and_resume(tmp_path, engine):
    single = str(tmp_path / "single")
    Trainer(Net(always_used=engine == "fsdp"), data(), SPEC, single).fit()
    straight, resumed = str(tmp_path / engine), str(tmp_path / f"{engine}-resumed")
    mp.spawn(_worker, args=(2, _free_port(), [(straight, [SPEC.steps]), (resumed, [5, SPEC.steps])], engine),
             nprocs=2, join=True)

    one, two, again = _weights(single), _weights(straight), _weights(resumed)
    assert float(one["rare"]) != 0.0, "the rarely used parameter never trained: the test proves nothing"
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k  # same global batch: same training
        assert torch.equal(two[k], again[k]), k  # a resumed distributed run continues exactly


class TwoGroups(Component):
    """A generator and a critic from one forward pass, as VQ-GAN's two optimiser groups: the
    generator's loss goes through the critic; the critic's loss sees a detached output, and the
    critic switches on at step 3 (unused before: DDP must not wait for its gradients)."""

    def __init__(self, params=None, **construct):
        super().__init__(params, **construct)
        torch.manual_seed(1)
        self.gen = nn.Linear(4, 1)
        self.critic = nn.Linear(1, 1)

    def param_groups(self):
        return {"generator": list(self.gen.parameters()), "critic": list(self.critic.parameters())}

    def training_step(self, batch, step):
        x, y = batch
        out = self.gen(x).squeeze(-1)
        losses = {"generator": (out - y).pow(2).mean()}
        if step >= 3:
            losses["generator"] = losses["generator"] + 0.1 * self.critic(out[:, None]).mean()
            real, fake = self.critic(y[:, None]), self.critic(out.detach()[:, None])
            losses["critic"] = (fake - real).mean() + 0.1 * fake.pow(2).mean()
        return StepOutput(losses)


def _two_groups_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GENFW_PROGRESS="0")
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        Trainer(TwoGroups(), data(), SPEC, out).fit()
    finally:
        td.destroy_process_group()


@pytest.mark.slow
def test_two_optimizer_groups_under_ddp_match_one_process(tmp_path):
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    Trainer(TwoGroups(), data(), SPEC, single).fit()
    mp.spawn(_two_groups_worker, args=(2, _free_port(), ddp), nprocs=2, join=True)
    one, two = _weights(single), _weights(ddp)
    assert not torch.equal(one["critic.weight"], TwoGroups().critic.weight.detach()), "the critic never trained"
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k


RECIPE = {
    "name": "ddp",
    "seed": 3,
    "data": {"name": "synthetic", "params": {"size": 24, "resolution": 4, "num_classes": 2}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    # autoregressive: a loss without random draws, so two ranks can match one process
    "prior": {"name": "autoregressive",
              "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0}}},
    "train": {"prior": {"steps": 6, "batch_size": 4, "lr": 0.003}},
    "latents": {"holdout": 0.25},
    "sample": {"n": 2, "batch_size": 2},
    "evaluate": {"metrics": ["nll"]},
    "log": ["jsonl", "csv"],
}


@pytest.mark.slow
def test_torchrun_trains_the_prior_like_one_process(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "genfw", "run", str(path), "--output-dir", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "ddp" / "metrics.json").exists() and (tmp_path / "ddp" / "samples" / "grid.png").exists()
    assert result.stdout.count("run finished") == 1  # rank 0 alone reports
    # rank 0 alone logs: one record of the last step (log_every 10 > steps 6), not one per rank
    log = (tmp_path / "ddp" / "prior0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [6], log
    assert len((tmp_path / "ddp" / "prior0" / "log.csv").read_text().splitlines()) == 2  # header + one row

    single = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "one"),
                                      "--stages", "tokenizer,latents,prior"])
    assert single.exit_code == 0, single.output
    a, _ = checkpoint.read(tmp_path / "one" / "prior0" / "model.safetensors")
    b, _ = checkpoint.read(tmp_path / "ddp" / "prior0" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "prior0: unchanged, reused" in again.stdout + again.stderr
