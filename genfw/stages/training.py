"""What the two training stages (tokenizer, priors) share: warm start, the trainer, the model file."""

from __future__ import annotations

import json
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


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d.items() if isinstance(d, dict) else []):
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _role(stage: str) -> str:
    return "tokenizer" if stage == "tokenizer" else f"prior.{stage[len('prior'):]}"


def _component(meta: dict[str, Any], path: str, stage: str, key: str) -> dict[str, Any]:
    """The entry of a model file to start from; in a bundle, its ``tokenizer`` or ``prior.<level>``."""
    comps = [c for c in meta.get("components") or [] if isinstance(c, dict)]
    if meta.get("type") not in ("model", "bundle") or not comps:
        raise ConfigError(f"{key} {path} holds genfw data of type '{meta.get('type')}', not a model: give a model "
                          "file, a bundle or a run directory")
    if meta.get("type") == "model":
        return comps[0]
    role = _role(stage)
    found = [c for c in comps if c.get("role") == role]
    if not found:
        roles = ", ".join(str(c.get("role")) for c in comps)
        raise ConfigError(f"{key} {path} is a bundle without a '{role}' (it holds {roles}): give a model file or a "
                          "run directory with this level")
    return found[0]


def check_warm_start(module: nn.Module, source: str, stage: str, key: str) -> None:
    """Refuse, from the file's header alone, weights that cannot be loaded into ``module``.

    ``module`` may live on the ``meta`` device: only names and shapes are compared, so this runs
    before any stage works. The message names the params that differ (never an empty list).
    """
    path = model_file(source, stage)
    header, meta = checkpoint.read_meta(path)
    comp = _component(meta, path, stage, key)
    want = (getattr(module, "kind", "?"), component_name(module))
    got = (comp.get("kind"), comp.get("name"))
    if got != want:
        raise ConfigError(f"{key} {path} holds {got[0]} '{got[1]}', but the recipe trains {want[0]} '{want[1]}'")
    prefix = comp.get("prefix", "")
    theirs = {k[len(prefix):]: tuple(v.get("shape", ())) for k, v in header.items()
              if k.startswith(prefix) and isinstance(v, dict)}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if theirs == ours:
        return
    shape = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if shape:
        first = f"tensor '{shape[0]}' is {theirs[shape[0]]} in the file, {ours[shape[0]]} in the recipe's {want[0]}"
    elif missing:
        first = f"the file lacks tensor '{missing[0]}'"
    else:
        first = f"the file has tensor '{extra[0]}', which the recipe's {want[0]} lacks"
    counts = f"{len(shape)} of another shape, {len(missing)} missing, {len(extra)} unexpected"
    params = getattr(module, "params", None)
    a = _flat({**(params.model_dump(mode="json") if params is not None else {}),
               **json.loads(json.dumps(getattr(module, "construct", {}) or {}))})
    b = _flat({**(comp.get("params") if isinstance(comp.get("params"), dict) else {}),
               **(comp.get("construct") if isinstance(comp.get("construct"), dict) else {})})
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        what = "; params that differ: " + ", ".join(f"{k} {b.get(k)!r} (recipe {a.get(k)!r})" for k in differ[:5])
        what += f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    else:
        what = ("; its params equal the recipe's, so it was written by another version of "
                f"'{got[1]}' ({comp.get('dist')} {comp.get('version')})")
    raise ConfigError(f"{key} {path}: its weights do not fit the recipe's {want[0]} ({first}; tensors: {counts}){what}")


def warm_start(module: nn.Module, source: str, stage: str, key: str) -> None:
    """Load the weights of a genfw model file, a bundle's matching component or a run directory's
    ``stage`` into ``module``."""
    check_warm_start(module, source, stage, key)
    path = model_file(source, stage)
    loaded = checkpoint.load(path)
    if isinstance(loaded, checkpoint.Bundle):
        loaded = loaded.modules[_role(stage)]
    try:
        module.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as e:  # names and shapes matched (checked above): a dtype or plugin quirk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key} {path}: its weights do not fit the recipe's {module.kind} ({first})") from None


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
