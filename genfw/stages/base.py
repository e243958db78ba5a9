"""The lifecycle every stage of a run shares, in one place.

A stage is a folder of the run directory with a ``stage.json`` record:

* **fingerprint** — a hash of what changes the stage's result (model, data, optimisation
  hyper-parameters, seed, and the outputs of the stages it reads), never of cadence or
  resources (``log_every``, ``checkpoint_every``, ``snapshot_every``, ``sample_every``,
  ``num_workers``, ``compile``, ``distributed``, progress). Training ``steps`` are kept apart: see below.
* **reuse** — a finished stage with the same fingerprint (and steps) is loaded, not recomputed.
* **resume** — an unfinished one continues from its ``train_state.safetensors``.
* **continue** — raising a training stage's ``steps`` trains on from the saved state. The
  learning-rate schedule is a function of the step alone (warm-up, then constant), so 100
  steps then 150 equals 150 from the start, bit for bit on CPU; a cosine schedule decays to
  zero at ``steps``, so its horizon is part of the fingerprint and raising ``steps`` restarts
  it. Lowering ``steps`` below what was trained is refused with what to do instead.
* **move aside** — a stage whose fingerprint changed is renamed to
  ``<stage>.replaced-<UTC time>`` (deleted only with ``--force``), and never when the recipe
  reads a file inside it.

Under ``torchrun`` rank 0 decides and prepares the folder; the other ranks read its decision.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from genfw import dist, io, rundir
from genfw.config import TrainSpec
from genfw.context import RunContext
from genfw.errors import ConfigError, GenfwError
from genfw.progress import console


class Run(Protocol):
    """What a stage needs of its run beyond a ``RunContext`` (``genfw.pipeline.Run`` provides it)."""

    force: bool
    timings: dict[str, float]
    changed_from_recipe: list[str]

    def stage(self, name: str) -> Stage: ...

# Training settings that change how a run is watched or how fast it goes, never its result.
NOT_SEMANTIC = frozenset({"steps", "checkpoint_every", "log_every", "snapshot_every", "sample_every",
                          "num_workers", "compile", "distributed"})


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """Size plus a hash of the first MiB: cheap, and changes when the file is replaced."""
    try:
        with io.fsspec.open(path, "rb") as f:
            head = f.read(1 << 20)
            size = f.size if hasattr(f, "size") else len(head)
    except FileNotFoundError:
        raise GenfwError(f"file not found: {path}") from None
    except io.url_errors() as e:  # no backend, a corrupt zip:// archive...: one line
        raise io.open_error(path, e) from None
    return fingerprint(path, size, hashlib.sha256(head).hexdigest())


def train_inputs(spec: TrainSpec) -> dict[str, Any]:
    """The training settings that change a stage's result (``steps`` is handled apart)."""
    out = {k: v for k, v in spec.model_dump(mode="json").items() if k not in NOT_SEMANTIC}
    if spec.schedule == "cosine":
        out["cosine_horizon"] = spec.steps  # the learning rate of every step depends on it
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@dataclass
class Record:
    """``stage.json``: the fingerprint, whether the stage finished, its seconds and steps."""

    fingerprint: str
    complete: bool = False
    seconds: float = 0.0
    steps: int | None = None  # training stages: the steps asked for (trained to, once complete)
    inputs: dict[str, Any] = field(default_factory=dict)  # what the fingerprint hashes, to say what changed


class Stage:
    """A unit of a run: a folder, a record and the lifecycle above; subclasses compute."""

    name: str = "stage"
    redo: bool = False  # recompute even when unchanged (``genfw eval --force``)

    def __init__(self, run: RunContext | Run) -> None:
        self.run = run
        self._inputs: dict[str, Any] | None = None

    # -- identity -----------------------------------------------------------------------------

    def compute_inputs(self) -> dict[str, Any]:
        """Everything that changes this stage's result (JSON-serialisable)."""
        raise NotImplementedError

    def inputs(self) -> dict[str, Any]:
        if self._inputs is None:  # computed once: it may hash checkpoint files
            self._inputs = self.compute_inputs()
        return self._inputs

    def steps(self) -> int | None:
        """Training steps asked for (training stages that train), else None."""
        return None

    def fingerprint(self) -> str:
        return fingerprint(self.name, self.inputs())

    def output_id(self) -> str:
        """What stages reading this one hash: the fingerprint and the steps trained."""
        return fingerprint(self.fingerprint(), self.steps())

    @property
    def folder(self) -> str:
        return self.run.path(self.name)

    def file(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    # -- the record ---------------------------------------------------------------------------

    def record(self) -> Record | None:
        path = self.file("stage.json")
        if not os.path.exists(path):
            return None
        try:
            return Record(**io.read_json(path))
        except (ValueError, TypeError, UnicodeDecodeError):
            return Record(fingerprint="unreadable")

    def decide(self) -> tuple[str, str]:
        """(action, why): ``new``, ``reuse``, ``resume``, ``continue`` or ``replace``."""
        rec = self.record()
        fp, steps = self.fingerprint(), self.steps()
        if rec is None:
            foreign = os.path.isdir(self.folder) and any(os.scandir(self.folder))
            return ("replace", "holds files without a stage.json") if foreign else ("new", "")
        if rec.fingerprint == "unreadable":
            return "replace", "its stage.json is unreadable"
        if rec.fingerprint != fp:
            if not rec.inputs:
                return "replace", "made by an earlier genfw, whose fingerprints differ"
            old, new = _flatten(rec.inputs), _flatten(self.inputs())
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            return "replace", "inputs changed" + (f" ({', '.join(changed[:6])})" if changed else "")
        if steps is not None and rec.steps is not None and rec.complete and rec.steps != steps:
            if steps < rec.steps:
                raise ConfigError(
                    f"{self.name} was trained for {rec.steps} steps and the recipe now asks for {steps}: training "
                    f"cannot be shortened; ask for {rec.steps} or more to use it (more continues training), or run "
                    "into another --output-dir to train the shorter one (snapshot_every keeps intermediate models)"
                )
            return "continue", f"continuing from step {rec.steps} to {steps}"
        if rec.complete and self.redo:
            return "replace", "recomputing as asked (--force)"
        return ("reuse", "") if rec.complete else ("resume", "")

    def check_replace(self) -> None:
        """Fail before any work when this stage would be moved aside over a file the recipe reads."""
        action, _ = self.decide()
        if action == "replace":
            rundir.check_reads(self.folder, self.run.force, self.run.read_paths())

    def check_unchanged(self) -> None:
        """Fail when this stage is only read (left out of ``--stages``) but the recipe now describes
        it otherwise: what is read, and the records written after, would not match the recipe."""
        if self.record() is None:
            return  # nothing made yet: reading it says so
        action, why = self.decide()
        if action != "reuse":
            why = why or "it has not finished"
            raise ConfigError(
                f"{self.name} is only read by this run (--stages) but the recipe no longer matches it ({why}): "
                f"add {self.name.rstrip('0123456789')} to --stages to recompute it, or undo the change"
            )

    def begin(self, collective: bool = True) -> bool:
        """True when the stage must run; moves aside what was made from other inputs."""
        if not dist.is_main():
            dist.barrier()
            rec = self.record()
            return not (rec is not None and rec.complete and rec.fingerprint == self.fingerprint()
                        and rec.steps == self.steps())
        try:
            return self._begin_main()
        finally:
            if collective:
                dist.barrier()

    def _begin_main(self) -> bool:
        action, why = self.decide()
        if action == "reuse":
            console.print(f"[green]✓[/green] {self.name}: unchanged, reused")
            return False
        previous = self.record()
        self._seconds_before = previous.seconds if previous is not None and action in ("resume", "continue") else 0.0
        if action == "replace":
            # --force deletes only what genfw made (a readable stage.json of its own); a foreign
            # folder (the user's files, an unreadable record) is always moved aside
            force = self.run.force and previous is not None and previous.fingerprint != "unreadable"
            moved = rundir.move_aside(self.folder, force, self.run.read_paths())
            where = "deleted (--force)" if force or moved is None else f"moved to {os.path.basename(moved)}"
            console.print(f"[yellow]•[/yellow] {self.name}: {why}, recomputing; the previous folder is {where}")
        elif action == "continue":
            console.print(f"[yellow]•[/yellow] {self.name}: {why}")
        os.makedirs(self.folder, exist_ok=True)
        io.write_json(self.file("stage.json"), asdict(Record(self.fingerprint(), False, self._seconds_before,
                                                             self.steps(), self.inputs())))
        return True

    def finish(self, seconds: float, collective: bool = True) -> None:
        self.run.timings[self.name] = seconds
        if dist.is_main():
            total = getattr(self, "_seconds_before", 0.0) + seconds
            io.write_json(self.file("stage.json"), asdict(Record(self.fingerprint(), True, total, self.steps(),
                                                                 self.inputs())))
        if collective:
            dist.barrier()
