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

from genfw import checkpoint, dist
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
        dist.destroy()  # as genfw's commands leave: after a barrier (gloo aborts a rank left behind)


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
        dist.destroy()  # as genfw's commands leave: after a barrier (gloo aborts a rank left behind)


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
    "train": {"prior": {"steps": 40, "batch_size": 4, "lr": 0.003, "log_every": 5, "checkpoint_every": 1000}},
    "latents": {"holdout": 0.5},  # 12 held-out images: two halves of 6 (reference, floor)
    # 3 chunks of 2 over 2 ranks; evaluation tops up to 8 samples (split too) for fidelity
    "sample": {"n": 6, "batch_size": 2},
    "evaluate": {"metrics": ["nll", "fidelity"], "n_samples": 8, "classifier_steps": 5},
    "log": ["jsonl", "csv"],
}
DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "distributed.md")
ENV = {**os.environ, "GENFW_PLUGINS": "genfw", "GENFW_PROGRESS": "0", "OMP_NUM_THREADS": "1",
       # docs/distributed.md, Slurm: torchrun forwards SIGUSR1 to its workers
       "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "PET_SHUTDOWN_TIMEOUT": "100"}


def doc_commands(tmp_path) -> list[list[str]]:
    """The one-machine commands of docs/distributed.md, with this test's paths."""
    import shlex

    text = open(DOC, encoding="utf-8").read()
    block = text.split("## One machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.strip().splitlines() if line.strip()]
    assert [line.split(" -m genfw ")[1].split()[0] for line in lines] == ["run", "sample", "eval"], lines
    paths = {"recipe.yaml": str(tmp_path / "r.yaml"), "runs/ddp": str(tmp_path / "ddp"),
             "samples-2": str(tmp_path / "samples-2")}
    out = []
    for line in lines:
        words = [paths.get(w, w) for w in shlex.split(line)]
        assert words[0] == "torchrun"
        out.append([sys.executable, "-m", "torch.distributed.run", *words[1:]])
    return out


def _prior_weights(run_dir) -> dict:
    return checkpoint.read(os.path.join(run_dir, "prior0", "model.safetensors"))[0]


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, **kw)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_the_docs_torchrun_commands_equal_one_process_and_a_requeued_run_resumes(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    train, sample, evaluate = doc_commands(tmp_path)
    ddp = tmp_path / "ddp"

    # genfw run under torchrun: one report, one log record per logged step, each sample written once
    result = _run(train)
    assert (ddp / "metrics.json").exists() and (ddp / "samples" / "grid.png").exists()
    assert result.stdout.count("run finished") == 1  # rank 0 alone reports
    log = (ddp / "prior0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(5, 41, 5))
    assert len((ddp / "prior0" / "log.csv").read_text().splitlines()) == 9  # header + one row per record
    assert sorted(p.name[:5] for p in (ddp / "samples").glob("0*.png")) == [f"{i:05d}" for i in range(6)]
    assert json.loads((ddp / "samples" / "timing.json").read_text())["processes"] == 2

    # the same recipe in one process trains the same prior (within float tolerance)
    single = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "one"),
                                      "--stages", "tokenizer,latents,prior"])
    assert single.exit_code == 0, single.output
    a, b = _prior_weights(tmp_path / "one"), _prior_weights(ddp)
    assert a.keys() == b.keys()
    for k in a:
        # the attention's key bias has a true gradient of zero (softmax ignores a shift): Adam
        # scales the rounding noise of the two reductions up there (to ~2e-4 in 200 steps);
        # every other weight agrees within ~2e-6
        assert torch.allclose(a[k], b[k], atol=1e-3 if k.endswith("qkv.bias") else 2e-5), k

    # genfw sample under torchrun: the same images, pixel for pixel, as one process
    _run(sample)
    one = CliRunner().invoke(app, ["sample", str(ddp), "-n", "6", "--batch-size", "2", "-o",
                                   str(tmp_path / "samples-1")])
    assert one.exit_code == 0, one.output
    names = sorted(p.name for p in (tmp_path / "samples-1").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "samples-2").iterdir())
    for name in names:
        assert (tmp_path / "samples-1" / name).read_bytes() == (tmp_path / "samples-2" / name).read_bytes(), name

    # genfw eval under torchrun: the metrics of one process
    _run(evaluate)
    two = json.loads((ddp / "metrics.json").read_text())
    again = CliRunner().invoke(app, ["eval", str(ddp), "--force"])
    assert again.exit_code == 0, again.output
    one_metrics = json.loads((ddp / "metrics.json").read_text())
    assert "fidelity/fid" in two and two.keys() == one_metrics.keys()
    for k, v in one_metrics.items():
        if isinstance(v, float) and not k.startswith("sample/"):
            assert v == pytest.approx(two[k], rel=1e-4, abs=1e-6), k

    # a requeued job: SIGUSR1 to torchrun while the prior trains, then the same command again
    import signal
    import time

    # (a larger prior trained for longer, so that the signal lands while it trains: seconds)
    longer = ["--set", "train.prior.steps=300", "--set", "train.prior.batch_size=8",
              "--set", "prior.backbone.params.dim=48", "--set", "prior.backbone.params.depth=2"]
    straight = [str(tmp_path / "straight") if w == str(ddp) else w for w in train] + longer
    _run(straight)
    requeued = [str(tmp_path / "requeued") if w == str(ddp) else w for w in train] + longer
    proc = subprocess.Popen(requeued, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    log_file = tmp_path / "requeued" / "prior0" / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log_file.exists() and log_file.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "the prior never started training"
        time.sleep(0.02)
    at_signal = len(log_file.read_text().splitlines())
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-3000:]
    logged = len(log_file.read_text().splitlines())
    assert "interrupted at step" in output and "state saved" in output, (at_signal, logged, output[:3000])
    assert (tmp_path / "requeued" / "prior0" / "train_state.safetensors").exists()
    result = _run(requeued)
    assert "tokenizer: unchanged, reused" in result.stderr and "run finished" in result.stdout
    resumed, uninterrupted = _prior_weights(tmp_path / "requeued"), _prior_weights(tmp_path / "straight")
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k  # exact: the same reductions in the same order


def test_fsdp_state_has_the_single_process_layout_and_resumes_without_torchrun(tmp_path):
    """FSDP in a world of one (in-process gloo): its gathered state is the layout one process
    writes, so a plain trainer continues it; two optimizer groups are refused with the fix."""
    from torch.distributed import HashStore

    plain, sharded = str(tmp_path / "plain"), str(tmp_path / "fsdp")
    Trainer(Net(always_used=True), data(), SPEC, plain).fit()
    td.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        Trainer(Net(always_used=True), data(), SPEC.model_copy(update={"steps": 6, "distributed": "fsdp"}),
                sharded).fit()
        with pytest.raises(ConfigError, match="one optimizer group; this one has 2 .*use distributed: ddp"):
            Trainer(TwoGroups(), data(), SPEC.model_copy(update={"distributed": "fsdp"}), str(tmp_path / "gan"))
    finally:
        dist.destroy()  # as genfw's commands leave: after a barrier (gloo aborts a rank left behind)
    tensors, meta = checkpoint.read(os.path.join(sharded, "train_state.safetensors"))
    state = checkpoint.unpack(meta["tree"], tensors)
    assert state["step"] == 6 and sorted(state["optimizers"]["main"]["state"]) == [0, 1, 2, 3, 4]
    Trainer(Net(always_used=True), data(), SPEC, sharded).fit()  # no process group: plain training resumes
    one, two = _weights(plain), _weights(sharded)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k


@pytest.mark.slow
def test_fsdp_run_under_torchrun_resumes_exactly_after_sigterm(tmp_path):
    """`genfw run` with train.prior.distributed=fsdp: SIGTERM to torchrun while the prior trains
    saves the gathered state; the same command resumes, bit for bit the uninterrupted run."""
    import signal
    import time

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    train = doc_commands(tmp_path)[0] + [
        "--stages", "tokenizer,latents,prior", "--set", "train.prior.distributed=fsdp",
        "--set", "train.prior.steps=300", "--set", "train.prior.batch_size=8",
        "--set", "prior.backbone.params.dim=48", "--set", "prior.backbone.params.depth=2"]
    ddp = str(tmp_path / "ddp")
    straight = [str(tmp_path / "straight") if w == ddp else w for w in train]
    _run(straight)
    interrupted = [str(tmp_path / "interrupted") if w == ddp else w for w in train]
    proc = subprocess.Popen(interrupted, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    log_file = tmp_path / "interrupted" / "prior0" / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log_file.exists() and log_file.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "the prior never started training"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "interrupted at step" in output, output[-3000:]
    _run(interrupted)
    a, b = _prior_weights(tmp_path / "straight"), _prior_weights(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
