"""A run: the recipe's stages in order, in one run directory.

``genfw run`` validates the whole recipe, then runs the stages into ``output_dir``::

    recipe.yaml          the recipe as run (after --set overrides)
    run.lock             while a run is going: its PID, host and start time
    tokenizer/           model.safetensors (+ train_state, snapshot, log.jsonl while training)
    latents/{train,holdout}/   code shards (safetensors) and index.json
    prior0/, prior1/...  one prior per tokenizer level, coarsest first (+ previews/)
    samples/             one PNG per sample (label in the name), grid.png, codes.safetensors
    metrics.json, metrics_history.jsonl, report.md, curves.png
    <stage>.replaced-<UTC time>/   a stage folder made from inputs that have since changed

Each stage is a unit of ``genfw.stages``; the lifecycle they share (fingerprint, reuse,
continue, move aside, resume) is ``genfw.stages.base``, the directory's lock and what genfw may
touch in it ``genfw.rundir``. This module orders the stages and holds the run's lock.

Under ``torchrun`` every rank trains (data parallel, see genfw.train); rank 0 alone holds the
lock, writes files, extracts latents, samples, evaluates and reports, with barriers between stages.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
import yaml

from genfw import checkpoint, dist, io, rundir
from genfw.budget import check_model_sources, check_training_memory
from genfw.config import validate_recipe
from genfw.context import RunContext, count_parameters, model_file
from genfw.datacheck import CACHE_FILE, check_images
from genfw.errors import CheckpointError, ConfigError, GenfwError
from genfw.interfaces import Prior, Tokenizer
from genfw.progress import console
from genfw.registry import get_registry
from genfw.samples import safe_name, write_samples
from genfw.stages import (
    EvaluateStage,
    LatentsStage,
    PriorStage,
    ReportStage,
    SampleStage,
    Stage,
    TokenizerStage,
    file_fingerprint,
    fingerprint,
)
from genfw.stages.evaluate import HISTORY_FILE
from genfw.train import SNAPSHOT_FILE

STAGES = ("tokenizer", "latents", "prior", "sample", "evaluate", "report")

__all__ = ["STAGES", "Run", "count_parameters", "file_fingerprint", "fingerprint", "load_run_models",
           "model_file", "prior_forward_flops", "safe_name", "write_samples"]


class Run(RunContext):
    """One recipe's run directory and its stages.

    ``force`` deletes stage folders made from other inputs instead of moving them aside;
    ``write_recipe=False`` (``genfw eval``) leaves the run's ``recipe.yaml`` as it is, and
    ``changed_from_recipe`` lists the overrides an evaluation applied, for its history.
    """

    def __init__(self, resolved, output_dir: str | None = None, device: str | None = None,
                 overwrite: bool = False, force: bool = False, write_recipe: bool = True,
                 changed_from_recipe: list[str] | None = None) -> None:
        super().__init__(resolved, output_dir, device)
        self.overwrite, self.force, self.write_recipe = overwrite, force, write_recipe
        self.changed_from_recipe = list(changed_from_recipe or [])
        self.lock = rundir.RunLock(self.dir)
        self.timings: dict[str, float] = {}
        self._stages: dict[str, Stage] = {}
        self._tokenizer: Tokenizer | None = None
        self._priors: list[Prior] | None = None

    # -- the stages ---------------------------------------------------------------------------

    def stage(self, name: str) -> Stage:
        """The stage object of a folder name: tokenizer, latents, prior<i>, samples, evaluate, report."""
        if name not in self._stages:
            if name.startswith("prior") and name[5:].isdigit():
                self._stages[name] = PriorStage(self, int(name[5:]))
            else:
                kinds = {"tokenizer": TokenizerStage, "latents": LatentsStage, "samples": SampleStage,
                         "evaluate": EvaluateStage, "report": ReportStage}
                self._stages[name] = kinds[name](self)
        return self._stages[name]

    @property
    def prior_stages(self) -> list[PriorStage]:
        return [self.stage(f"prior{i}") for i in range(len(self.resolved.prior_specs))]  # type: ignore[misc]

    # the stages' output ids under their historic names (genfw.ablate keys shared folders by them)
    def _fp_tokenizer(self) -> str:
        return self.stage("tokenizer").output_id()

    def _fp_latents(self) -> str:
        return self.stage("latents").output_id()

    def _fp_prior(self, level: int) -> str:
        return self.stage(f"prior{level}").output_id()

    def _fp_sample(self) -> str:
        return self.stage("samples").output_id()

    # -- plan ---------------------------------------------------------------------------------

    def plan(self) -> dict[str, Any]:
        """Stages, parameter counts and the FLOPs of one prior forward, built on the meta device."""
        info: dict[str, Any] = {"output_dir": self.dir, "device": str(self.device), "stages": list(STAGES)}
        # Describe the data without reading it: a plan works before the dataset is on disk.
        data = self.registry.build("dataset", self.recipe.data.name, self.resolved.data_params)
        channels, resolution = data.channels, tuple(data.resolution)
        try:
            num_classes = data.num_classes
        except GenfwError:  # class names come from files that are not there yet
            num_classes = 0
        with torch.device("meta"):
            tok = self.registry.build("tokenizer", self.recipe.tokenizer.name, self.resolved.tokenizer_params,
                                      channels=channels, resolution=list(resolution))
            self.check_compatible(tok, resolution)
            info["tokenizer"] = {"name": self.recipe.tokenizer.name, "parameters": count_parameters(tok),
                                 "levels": [{"codebook_size": lv.codebook_size, "grid": list(g)}
                                            for lv, g in zip(tok.levels, tok.grid_shapes(*resolution))]}
            priors = []
            for i, spec in enumerate(self.resolved.prior_specs):
                construct = self.prior_construct(tok, i, spec, resolution, num_classes)
                prior = self.registry.build("prior", spec.name, self.resolved.prior_params[i], **construct)
                priors.append({"level": i, "name": spec.name, "backbone": spec.backbone.name,
                               "parameters": count_parameters(prior),
                               "forward_flops": prior_forward_flops(prior)})
        info["priors"] = priors
        info["resolution"], info["channels"] = list(resolution), channels
        return info

    # -- the run directory --------------------------------------------------------------------

    def prepare_dir(self) -> None:
        """Rank 0 locks the directory, removes stale temporary files and writes the recipe."""
        error: GenfwError | None = None
        if dist.is_main():
            try:
                self._prepare_dir()
            except GenfwError as e:
                error = e
        failed = dist.any_true(error is not None)  # every rank learns whether rank 0 could start
        if error is not None:
            raise error
        if failed:
            raise GenfwError(f"rank 0 could not prepare the run directory {self.dir} (its error says why)")

    def _prepare_dir(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        recipe_file = self.path(rundir.RECIPE_FILE)
        if not rundir.recipe_is_ours(self.dir):
            raise ConfigError(
                f"{recipe_file} was not written by genfw and would be replaced: run into another -o/--output "
                "(or move that file away)"
            )
        self.lock.acquire()
        try:
            removed = io.remove_temp_files(self.dir)
            if removed:
                console.print(f"[yellow]•[/yellow] removed {len(removed)} temporary file(s) left by an interrupted "
                              "write")
            if os.path.exists(recipe_file):
                try:
                    old = rundir.read_recipe_yaml(recipe_file) or {}
                except (yaml.YAMLError, ValueError, RecursionError):
                    old = {}
                if not isinstance(old, dict):
                    old = {}
                if old.get("name") != self.recipe.name and not self.overwrite:
                    raise ConfigError(
                        f"run directory {self.dir} belongs to recipe '{old.get('name')}', not '{self.recipe.name}': "
                        "choose another output_dir (-o/--output) or pass --overwrite"
                    )
        except BaseException:
            self.lock.release()
            raise

    def check_data(self) -> None:
        """Decode every image (train and held-out) before the tokenizer stage: see genfw.datacheck."""
        if not dist.is_main():
            dist.barrier()
            return
        try:
            check_images(self.dataset, self.path(CACHE_FILE))
        finally:
            dist.barrier()

    def run(self, stages: list[str] | None = None) -> dict[str, Any]:
        """Run (or reuse) the selected stages in order; returns the metrics if evaluated."""
        wanted = list(stages or STAGES)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
        if "tokenizer" in wanted or "prior" in wanted:
            check_training_memory(self)  # before anything is written or allocated
            check_model_sources(self)  # init_from files of the right kind and shapes, from their headers
        self.prepare_dir()
        try:
            if dist.is_main():
                self._check_before_work(wanted)
                # only now, every check passed: the run's record of its recipe changes
                if self.write_recipe:
                    io.write_text(self.path(rundir.RECIPE_FILE), rundir.RECIPE_HEADER + "\n"
                                  + yaml.safe_dump(self.resolved.raw, sort_keys=False))
            return self._run(wanted)
        finally:
            self.lock.release()

    def _began(self, wanted: list[str]) -> list[Stage]:
        """The stages this selection may (re)compute."""
        out: list[Stage] = []
        if "tokenizer" in wanted:
            out.append(self.stage("tokenizer"))
        if "latents" in wanted or "prior" in wanted:
            out.append(self.stage("latents"))
        if "prior" in wanted:
            out += self.prior_stages
        if "sample" in wanted or "evaluate" in wanted:
            out.append(self.stage("samples"))
        if "evaluate" in wanted:
            out.append(self.stage("evaluate"))
        return out

    def _read_only(self, wanted: list[str]) -> list[Stage]:
        """The stages this selection loads from disk without (re)computing them."""
        out: list[Stage] = []
        if "tokenizer" not in wanted and self._tokenizer is None:
            out.append(self.stage("tokenizer"))
        if "prior" not in wanted and self._priors is None and any(s in wanted for s in ("sample", "evaluate")):
            out += self.prior_stages
        return out

    def _check_before_work(self, wanted: list[str]) -> None:
        """Refusals (a shorter training, a read file in a folder to replace, a stage left out of
        ``--stages`` that the recipe now describes otherwise) before anything runs or is written."""
        for stage in self._began(wanted):
            stage.check_replace()
        for stage in self._read_only(wanted):
            stage.check_unchanged()
        if "evaluate" in wanted:  # appended to after the evaluation: refused now, not after the work

            io.check_plain_file(self.path(HISTORY_FILE))

    def _run(self, wanted: list[str]) -> dict[str, Any]:
        if any(s in wanted for s in ("tokenizer", "latents", "prior")):
            self.check_data()
        tokenizer = self.stage_tokenizer(run="tokenizer" in wanted)
        if "latents" in wanted or "prior" in wanted:
            self.stage_latents(tokenizer)
        priors = self.stage_priors(tokenizer, run="prior" in wanted) if any(
            s in wanted for s in ("prior", "sample", "evaluate")) else None
        result: dict[str, Any] = {}
        # sampling and evaluation are split over the ranks; the report is rank 0's
        if "sample" in wanted or "evaluate" in wanted:
            self.stage_sample(tokenizer, priors)
        if "evaluate" in wanted:
            result = self.stage_evaluate(tokenizer, priors)
        if "report" in wanted and dist.is_main():
            self.stage_report(tokenizer, priors)
        return result

    def stage_tokenizer(self, run: bool = True) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self.stage("tokenizer").execute(run)
        return self._tokenizer

    def stage_latents(self, tokenizer: Tokenizer) -> None:
        self.stage("latents").execute(tokenizer)

    def stage_priors(self, tokenizer: Tokenizer, run: bool = True) -> list[Prior]:
        if self._priors is None:
            priors: list[Prior] = []
            for stage in self.prior_stages:
                priors.append(stage.execute(tokenizer, run, coarser=list(priors)))
            self._priors = priors
        return self._priors

    def stage_sample(self, tokenizer: Tokenizer, priors: list[Prior]) -> None:
        self.stage("samples").execute(tokenizer, priors)

    def stage_evaluate(self, tokenizer: Tokenizer, priors: list[Prior]) -> dict[str, Any]:
        return self.stage("evaluate").execute(tokenizer, priors)

    def stage_report(self, tokenizer: Tokenizer, priors: list[Prior] | None) -> None:
        self.stage("report").execute(tokenizer, priors)


class SnapshotEvaluation(Run):
    """``genfw eval`` while the run trains: the given (snapshot) models are sampled and evaluated
    in ``RUN/evaluations/<UTC time>-<stage>-step<N>/``; the run's own stage folders are only read,
    and the evaluation is appended to the run's ``metrics_history.jsonl``."""

    def __init__(self, resolved, run_dir: str, tokenizer: Tokenizer, priors: list[Prior],
                 snapshots: dict[str, int | None], device: str | None = None,
                 changed_from_recipe: list[str] | None = None) -> None:
        label = "-".join(f"{stage}-step{step}" for stage, step in snapshots.items()) or "final"
        folder = os.path.join(run_dir, "evaluations", f"{rundir.utc_stamp()}-{label}")
        super().__init__(resolved, output_dir=folder, device=device, write_recipe=False,
                         changed_from_recipe=changed_from_recipe)
        self.run_dir, self.snapshots = run_dir, dict(snapshots)
        self._tokenizer, self._priors = tokenizer, priors

    def path(self, *parts: str) -> str:
        first = parts[0] if parts else ""
        if first in ("tokenizer", "latents", "metrics_history.jsonl") or (first.startswith("prior") and first[5:].isdigit()):
            return os.path.join(self.run_dir, *parts)  # what the run made (read), and the shared history
        return super().path(*parts)


def prior_forward_flops(prior: Prior, batch_size: int = 1) -> int | None:
    """FLOPs of one backbone forward on the training grid (counted with FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = getattr(prior, "backbone", None)
    if backbone is None:
        return None
    try:
        device = next(backbone.parameters()).device
        h, w = backbone.construct["grid"]
        tokens = torch.zeros(batch_size, h, w, dtype=torch.long, device=device)
        nc = backbone.construct.get("num_classes", 0)
        labels = torch.zeros(batch_size, dtype=torch.long, device=device) if nc else None
        ctx = [torch.zeros(batch_size, ch, cw, dtype=torch.long, device=device)
               for _, ch, cw in backbone.construct.get("context", [])] or None
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            backbone(tokens, labels=labels, context=ctx)
        return int(counter.get_total_flops())
    except GenfwError:
        raise
    except Exception:  # noqa: BLE001 - FLOP counting is informative only
        return None


def model_step(path: str) -> int | None:
    """The training step a model file records (snapshots and trained stages), read from its header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > checkpoint.MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(n))
        step = json.loads(header["__metadata__"]["genfw"]).get("extra", {}).get("step")
        return int(step) if step is not None else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def latest_model(folder: str) -> tuple[str, int | None, bool] | None:
    """(path, step, is_snapshot) of a stage folder's newest model: the finished model, or the
    snapshot of a training still going on (or interrupted) when it is further along."""
    final, snap = os.path.join(folder, "model.safetensors"), os.path.join(folder, SNAPSHOT_FILE)
    try:
        complete = bool(io.read_json(os.path.join(folder, "stage.json")).get("complete"))
    except (OSError, ValueError):
        complete = os.path.exists(final)
    candidates = []
    if os.path.exists(final):
        candidates.append((final, model_step(final), False))
    if os.path.exists(snap) and not complete:
        candidates.append((snap, model_step(snap), True))
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[1] or 0, c[2]))


def load_run_models(run_dir: str, device: torch.device | str = "cpu") -> tuple[Tokenizer, list[Prior], dict[str, Any]]:
    """Tokenizer, priors and extras (class names, sampler defaults) from a run directory.

    Mid-run, a stage still training is represented by its latest snapshot (``snapshot_every``);
    ``extra["snapshots"]`` then maps the stage to the step of the snapshot used.
    """
    snapshots: dict[str, int | None] = {}

    def pick(stage: str, what: str) -> str:
        found = latest_model(os.path.join(run_dir, stage))
        if found is None:
            if stage == "tokenizer":
                raise CheckpointError(
                    f"{run_dir} is not a finished genfw run directory (no tokenizer/model.safetensors): "
                    "give the folder `genfw run` wrote, after its tokenizer and prior stages "
                    "(or, mid-run, once train.*.snapshot_every has written a snapshot)")
            raise CheckpointError(f"{run_dir} has no trained {what} and no snapshot of it yet "
                                  f"({os.path.join(run_dir, stage)}): wait for the stage to finish, or set "
                                  "train.prior.snapshot_every to sample it while it trains")
        path, step, is_snapshot = found
        if is_snapshot:
            snapshots[stage] = step
        return path

    tokenizer = checkpoint.load(pick("tokenizer", "tokenizer"), device=device)
    priors = []
    for level in range(len(tokenizer.levels)):
        priors.append(checkpoint.load(pick(f"prior{level}", f"prior for level {level}"), device=device))
    extra: dict[str, Any] = {"snapshots": snapshots}
    recipe_file = os.path.join(run_dir, "recipe.yaml")
    if os.path.exists(recipe_file):
        try:
            raw = rundir.read_recipe_yaml(recipe_file) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{recipe_file} is corrupt ({type(e).__name__}): restore it, or rerun the recipe "
                                  "into a new run directory") from None
        sampler = (raw.get("sample") or {}).get("params") if isinstance(raw, dict) else None
        if not isinstance(raw, dict) or not isinstance(raw.get("sample") or {}, dict) or not isinstance(
                sampler or {}, dict):
            raise CheckpointError(f"{recipe_file} is not a genfw recipe mapping: restore it, or rerun the recipe "
                                  "into a new run directory")
        extra["recipe"] = raw
        extra["sampler"] = sampler or {}
        try:
            resolved = validate_recipe(raw)
            dataset = get_registry().build("dataset", resolved.recipe.data.name, resolved.data_params)
            extra["class_names"] = dataset.class_names if priors and priors[0].num_classes else []
        except GenfwError:
            extra["class_names"] = []
    return tokenizer, priors, extra
