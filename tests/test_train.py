"""The generic trainer: losses go down, resume is exact, NaN stops keep the last checkpoint."""

import json

import pytest
import torch
from torch import nn

from genfw.config import TrainSpec
from genfw.errors import TrainingError
from genfw.interfaces import Component, StepOutput
from genfw.train import STATE_FILE, Trainer


class Regressor(Component):
    """y = w.x with noise drawn from the global RNG, so exact resume needs the RNG state."""

    def __init__(self, params=None, **construct):
        super().__init__(params, **construct)
        self.linear = nn.Linear(4, 1)
        self.nan_at = None

    def training_step(self, batch, step):
        x, y = batch
        pred = self.linear(x + 0.05 * torch.randn_like(x)).squeeze(-1)
        loss = ((pred - y) ** 2).mean()
        if self.nan_at is not None and step >= self.nan_at:
            loss = loss * float("nan")
        return StepOutput({"main": loss}, {"mean_pred": float(pred.detach().mean())})


class TwoGroups(Regressor):
    def __init__(self, params=None, **construct):
        super().__init__(params, **construct)
        self.critic = nn.Linear(4, 1)

    def param_groups(self):
        return {"main": list(self.linear.parameters()), "critic": list(self.critic.parameters())}

    def training_step(self, batch, step):
        out = super().training_step(batch, step)
        x, _ = batch
        out.losses["critic"] = (self.critic(x) - self.linear(x).detach()).pow(2).mean()
        return out


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))


SPEC = TrainSpec(steps=30, batch_size=8, lr=0.05, checkpoint_every=4, log_every=5, ema_decay=0.9,
                 warmup_steps=3, schedule="cosine")


def test_loss_goes_down_and_log_is_written(tmp_path, data):
    model = Regressor()
    Trainer(model, data, SPEC.model_copy(update={"steps": 100, "lr": 0.1, "schedule": "constant"}), tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 100 and records[-1]["loss/main"] < 0.2 * records[0]["loss/main"]


def test_interrupted_training_resumes_bit_exactly(tmp_path, data):
    torch.manual_seed(0)
    straight = Regressor()
    Trainer(straight, data, SPEC, tmp_path / "a").fit()

    torch.manual_seed(0)
    first = Regressor()
    trainer = Trainer(first, data, SPEC, tmp_path / "b")
    original = trainer._train_step
    calls = {"n": 0}

    def crash_after_13(batch):
        calls["n"] += 1
        if calls["n"] == 14:
            raise RuntimeError("simulated crash")
        return original(batch)

    trainer._train_step = crash_after_13
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit()
    assert (tmp_path / "b" / STATE_FILE).exists()

    torch.manual_seed(123)  # a different process state: resume must not depend on it
    resumed = Regressor()
    final = Trainer(resumed, data, SPEC, tmp_path / "b").fit()
    assert torch.equal(resumed.linear.weight, straight.linear.weight)
    assert torch.equal(resumed.linear.bias, straight.linear.bias)
    assert final is not resumed  # EMA copy


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    model = Regressor()
    model.nan_at = 10
    with pytest.raises(TrainingError, match="loss 'main' is nan at step 10.*last good checkpoint"):
        Trainer(model, data, SPEC, tmp_path).fit()
    from genfw import checkpoint

    tensors, meta = checkpoint.read(tmp_path / STATE_FILE)
    assert checkpoint.unpack(meta["tree"], tensors)["step"] == 8  # checkpoint_every=4: steps 4 and 8


def test_each_group_gets_its_own_optimizer_and_gradients(tmp_path, data):
    model = TwoGroups()
    trainer = Trainer(model, data, SPEC.model_copy(update={"groups": {"critic": {"lr": 0.01}}, "ema_decay": None}),
                      tmp_path)
    assert set(trainer.optimizers) == {"main", "critic"}
    assert trainer.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(0.01 / 3)  # warm-up step 1 of 3
    before = model.critic.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, model.critic.weight)


def test_a_signal_during_the_ranks_stop_vote_is_not_lost(tmp_path, data, monkeypatch):
    """Under torchrun every rank votes each step on stopping (an all-reduce). A SIGUSR1 that lands
    while a rank waits in that collective must still stop training at the next step: it was lost
    when the vote's result overwrote the flag the signal handler had just set."""
    import os
    import signal

    from genfw import dist

    trainer = Trainer(Regressor(), data, SPEC.model_copy(update={"checkpoint_every": 1000}), tmp_path)
    votes = []

    def all_reduce_or(flag: bool) -> bool:
        votes.append(flag)
        if len(votes) == 3:  # the signal arrives during step 3's collective
            os.kill(os.getpid(), signal.SIGUSR1)
        return flag  # the other rank saw no signal yet: the vote is what this rank sent

    # one rank of a two-process group, as far as the stop vote is concerned
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    monkeypatch.setattr(dist, "any_true", all_reduce_or)
    with pytest.raises(TrainingError, match="interrupted at step 4"):
        trainer.fit()
    assert votes == [False, False, False, True]
    assert (tmp_path / STATE_FILE).exists()
