"""What the two training stages (tokenizer, priors) share: warm start, the trainer, the model file."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from genfw import checkpoint, dist
from genfw.config import TrainSpec
from genfw.context import model_file
from genfw.errors import ConfigError
from genfw.registry import component_name
from genfw.stages.base import Stage, file_fingerprint, train_inputs
from genfw.train import STATE_FILE, Trainer

MODEL_FILE = "model.safetensors"


def source_fingerprint(path: str | None) -> str | None:
    return file_fingerprint(path) if path else None


def warm_start(module: nn.Module, source: str, stage: str, key: str) -> None:
    """Load the weights of a genfw model file (or a run directory's ``stage``) into ``module``."""
    path = model_file(source, stage)
    loaded = checkpoint.load(path)
    want = (getattr(module, "kind", "?"), component_name(module))
    got = (getattr(loaded, "kind", "?"), component_name(loaded))
    if got != want:
        raise ConfigError(f"{key} {path} holds {got[0]} '{got[1]}', but the recipe trains {want[0]} '{want[1]}'")
    try:
        module.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as e:
        ours = getattr(module, "params", None)
        theirs = getattr(loaded, "params", None)
        diff = ""
        if ours is not None and theirs is not None:
            a, b = ours.model_dump(mode="json"), theirs.model_dump(mode="json")
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            diff = "; params that differ: " + ", ".join(f"{k} {b.get(k)!r} (recipe {a.get(k)!r})" for k in keys[:5])
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key} {path}: its weights do not fit the recipe's {want[0]} ({first}){diff}") from None


class TrainingStage(Stage):
    """A stage that builds a module, optionally trains it, and writes ``model.safetensors``."""

    def train_spec(self) -> TrainSpec:
        raise NotImplementedError

    def trains(self) -> bool:
        raise NotImplementedError

    def steps(self) -> int | None:
        return self.train_spec().steps if self.trains() else None

    @property
    def model_path(self) -> str:
        return self.file(MODEL_FILE)

    def saved_step(self) -> int | None:
        """The step of this stage's ``train_state.safetensors`` (from its header), or None."""
        try:
            _, meta = checkpoint.read_meta(self.file(STATE_FILE))
            step = dict(meta["tree"]["__dict__"])["step"]
        except Exception:  # noqa: BLE001 - absent or unreadable: the trainer says what is wrong
            return None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def check_replace(self) -> None:
        """Also: an unfinished stage whose saved state is past the steps now asked for is refused
        here, before its ``stage.json`` (or anything else) is rewritten."""
        super().check_replace()
        steps = self.steps()
        if steps is None or self.decide()[0] != "resume" or not os.path.exists(self.file(STATE_FILE)):
            return
        step = self.saved_step()
        if step is not None and step > steps:
            raise ConfigError(
                f"{self.name}: its saved training state is at step {step}, beyond the {steps} steps asked for: training "
                f"cannot be shortened; ask for {step} or more, or run into another --output-dir"
            )

    def load(self) -> nn.Module:
        return checkpoint.load(self.model_path, device=self.run.device)

    def fit(self, module: nn.Module, data, *, seed: int, prepare, description: str,
            every: list[tuple[int, Any]] | None = None) -> nn.Module:
        """Train ``module`` into this stage's folder (resuming or continuing from its state)."""
        trainer = Trainer(module, data, self.train_spec(), self.folder, seed=seed, device=self.run.device,
                          prepare=prepare, description=description, every=every, log=self.run.recipe.log)
        return trainer.fit()

    def save(self, module: nn.Module) -> nn.Module:
        """Rank 0 writes the model; every rank then loads exactly what is on disk."""
        if dist.is_main():
            checkpoint.save(self.model_path, module, extra={"step": self.steps()} if self.trains() else None)
        dist.barrier()
        return self.load()

    def semantic_train(self) -> dict[str, Any] | None:
        return train_inputs(self.train_spec()) if self.trains() else None
