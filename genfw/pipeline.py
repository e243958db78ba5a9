"""Recipe stages and the run directory.

``genfw run`` validates the whole recipe, then runs the stages into ``output_dir``::

    recipe.yaml          the recipe as run (after --set overrides)
    tokenizer/           model.safetensors (+ train_state, log.jsonl while training)
    latents/{train,holdout}/   code shards (safetensors) and index.json
    prior0/, prior1/...  one prior per tokenizer level, coarsest first
    samples/             one PNG per sample (label in the name), grid.png, codes.safetensors
    metrics.json, report.md, curves.png

Under ``torchrun`` every rank trains (data parallel, see genfw.train); rank 0 alone writes
files, extracts latents, samples, evaluates and reports, with barriers between stages.

Each stage writes ``stage.json`` with a fingerprint of its inputs (its part of the recipe and the
fingerprints of the stages it reads). A finished stage with an unchanged fingerprint is reused;
an unfinished one resumes (training continues from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from genfw import checkpoint, dist, io
from genfw.config import PriorSpec, ResolvedRecipe
from genfw.data import (
    AsTorchDataset,
    FlipDoubled,
    LatentDataset,
    LatentWriter,
    make_grid,
    split_indices,
    to_pil,
)
from genfw.errors import CheckpointError, ConfigError, DataError, GenfwError
from genfw.interfaces import Prior, Tokenizer
from genfw.progress import console, progress_bar
from genfw.registry import get_registry
from genfw.sampling import generate, resolve_device, sample_labels
from genfw.train import Trainer

STAGES = ("tokenizer", "latents", "prior", "sample", "evaluate", "report")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """Size plus a hash of the first MiB: cheap, and changes when the file is replaced."""
    with io.fsspec.open(path, "rb") as f:
        head = f.read(1 << 20)
        size = f.size if hasattr(f, "size") else len(head)
    return fingerprint(path, size, hashlib.sha256(head).hexdigest())


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class StageState:
    fingerprint: str
    complete: bool = False
    seconds: float = 0.0


class Run:
    """One recipe's run directory and its stages."""

    def __init__(self, resolved: ResolvedRecipe, output_dir: str | None = None, device: str | None = None,
                 overwrite: bool = False) -> None:
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.dir = os.fspath(output_dir or self.recipe.output_dir or os.path.join("runs", self.recipe.name))
        self.device = resolve_device(device or self.recipe.device)
        self.registry = get_registry()
        self.overwrite = overwrite
        self._dataset = None
        self._tokenizer: Tokenizer | None = None
        self._priors: list[Prior] | None = None
        self.timings: dict[str, float] = {}
        self._collective = True  # whether every rank takes part in the current stage

    # -- helpers ------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def _stage_file(self, stage: str) -> str:
        return self.path(stage, "stage.json")

    def _stage_state(self, stage: str) -> StageState | None:
        try:  # a damaged stage.json (genfw wrote it) means "not finished": the stage runs again
            return StageState(**io.read_json(self._stage_file(stage)))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _begin(self, stage: str, fp: str) -> bool:
        """True when the stage must run; clears outputs made from different inputs.

        Under torchrun rank 0 decides and prepares the folder; the other ranks read its decision.
        """
        if not dist.is_main():
            dist.barrier()
            state = self._stage_state(stage)
            return not (state is not None and state.fingerprint == fp and state.complete)
        try:
            return self._begin_main(stage, fp)
        finally:
            if self._collective:
                dist.barrier()

    def _begin_main(self, stage: str, fp: str) -> bool:
        state = self._stage_state(stage)
        if state is not None and state.fingerprint == fp and state.complete:
            console.print(f"[green]✓[/green] {stage}: unchanged, reused")
            return False
        if state is not None and state.fingerprint != fp and os.path.isdir(self.path(stage)):
            console.print(f"[yellow]•[/yellow] {stage}: inputs changed, recomputing")
            shutil.rmtree(self.path(stage))
        os.makedirs(self.path(stage), exist_ok=True)
        io.write_json(self._stage_file(stage), StageState(fp).__dict__)
        return True

    def _finish(self, stage: str, fp: str, seconds: float) -> None:
        self.timings[stage] = seconds
        if dist.is_main():
            io.write_json(self._stage_file(stage), StageState(fp, True, seconds).__dict__)
        if self._collective:
            dist.barrier()

    def _save_model(self, module, path: str):
        """Rank 0 writes the model; every rank then loads exactly what is on disk."""
        if dist.is_main():
            checkpoint.save(path, module)
        dist.barrier()
        return checkpoint.load(path, device=self.device)

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self.registry.build("dataset", self.recipe.data.name, self.resolved.data_params)
            if len(self._dataset) == 0:
                raise DataError(f"dataset '{self.recipe.data.name}' is empty")
        return self._dataset

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.dataset.resolution)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes if self.recipe.class_conditional else 0

    def train_seed(self, stage: str) -> int:
        """``train.<stage>.seed``, or the recipe's seed when that is not set."""
        seed = getattr(self.recipe.train, stage).seed
        return self.recipe.seed if seed is None else seed

    def _split(self) -> tuple[list[int], list[int]]:
        return split_indices(len(self.dataset), self.recipe.latents.holdout, self.recipe.seed)

    # -- building components ------------------------------------------------------------------

    def build_tokenizer(self) -> Tokenizer:
        spec = self.recipe.tokenizer
        if spec.checkpoint:
            tok = checkpoint.load(spec.checkpoint)
            if not isinstance(tok, Tokenizer):
                raise ConfigError(f"tokenizer.checkpoint {spec.checkpoint} holds a {getattr(tok, 'kind', '?')}, not a tokenizer")
            return tok
        return self.registry.build("tokenizer", spec.name, self.resolved.tokenizer_params,
                                   channels=self.dataset.channels, resolution=list(self.resolution))

    def prior_construct(self, tokenizer: Tokenizer, level: int, spec: PriorSpec,
                        resolution: tuple[int, int] | None = None, num_classes: int | None = None) -> dict[str, Any]:
        levels = tokenizer.levels
        grids = tokenizer.grid_shapes(*(resolution or self.resolution))
        if num_classes is None:
            num_classes = self.num_classes
        elif not self.recipe.class_conditional:
            num_classes = 0
        return {
            "codebook_size": levels[level].codebook_size,
            "grid": list(grids[level]),
            "num_classes": num_classes,
            "context": [[levels[j].codebook_size, *grids[j]] for j in range(level)],
            "backbone": spec.backbone.model_dump(),
        }

    def build_prior(self, tokenizer: Tokenizer, level: int) -> Prior:
        spec = self.resolved.prior_specs[level]
        construct = self.prior_construct(tokenizer, level, spec)
        if spec.checkpoint:
            prior = checkpoint.load(spec.checkpoint)
            got = getattr(prior, "construct", {})
            for key in ("codebook_size", "grid"):
                if got.get(key) != construct[key]:
                    raise ConfigError(
                        f"prior checkpoint {spec.checkpoint} has {key} {got.get(key)} but tokenizer level {level} "
                        f"needs {construct[key]}: use a prior trained on this tokenizer"
                    )
            return prior
        return self.registry.build("prior", spec.name, self.resolved.prior_params[level], **construct)

    def check_compatible(self, tokenizer: Tokenizer, resolution: tuple[int, int] | None = None) -> None:
        h, w = resolution or self.resolution
        for i, lv in enumerate(tokenizer.levels):
            if h % lv.factor or w % lv.factor:
                raise ConfigError(
                    f"resolution {h}x{w} is not divisible by tokenizer level {i}'s downsampling factor "
                    f"{lv.factor}: change data.params.resolution"
                )

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

    # -- stages -------------------------------------------------------------------------------

    def prepare_dir(self) -> None:
        if not dist.is_main():
            dist.barrier()
            return
        try:
            self._prepare_dir()
        finally:
            dist.barrier()

    def _prepare_dir(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        recipe_file = self.path("recipe.yaml")
        if os.path.exists(recipe_file):
            try:
                with open(recipe_file, "rb") as f:
                    old = yaml.safe_load(f) or {}
            except (yaml.YAMLError, ValueError, RecursionError):
                old = {}
            if not isinstance(old, dict):
                old = {}
            if old.get("name") != self.recipe.name and not self.overwrite:
                raise ConfigError(
                    f"run directory {self.dir} belongs to recipe '{old.get('name')}', not '{self.recipe.name}': "
                    "choose another output_dir (--output-dir) or pass --overwrite"
                )
        io.write_text(recipe_file, yaml.safe_dump(self.resolved.raw, sort_keys=False))

    def check_data(self) -> None:
        """Decode every image (train and held-out) before the tokenizer stage: see genfw.datacheck."""
        from genfw.datacheck import CACHE_FILE, check_images

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
        self.prepare_dir()
        if any(s in wanted for s in ("tokenizer", "latents", "prior")):
            self.check_data()
        tokenizer = self.stage_tokenizer(run="tokenizer" in wanted)
        if "latents" in wanted or "prior" in wanted:
            self.stage_latents(tokenizer)
        priors = self.stage_priors(tokenizer, run="prior" in wanted) if any(
            s in wanted for s in ("prior", "sample", "evaluate")) else None
        result: dict[str, Any] = {}
        if not dist.is_main():  # sampling, evaluation and the report run on rank 0
            return result
        self._collective = False  # the other ranks have left: no more barriers
        if "sample" in wanted or "evaluate" in wanted:
            self.stage_sample(tokenizer, priors)
        if "evaluate" in wanted:
            result = self.stage_evaluate(tokenizer, priors)
        if "report" in wanted:
            self.stage_report(tokenizer, priors)
        return result

    def _fp_tokenizer(self) -> str:
        spec = self.recipe.tokenizer
        ckpt = file_fingerprint(spec.checkpoint) if spec.checkpoint else None
        return fingerprint("tokenizer", self.recipe.data.model_dump(), spec.model_dump(), ckpt,
                           self.recipe.train.tokenizer.model_dump(), self.recipe.seed, self.recipe.latents.holdout)

    def stage_tokenizer(self, run: bool = True) -> Tokenizer:
        fp = self._fp_tokenizer()
        model_path = self.path("tokenizer", "model.safetensors")
        if self._tokenizer is not None:
            return self._tokenizer
        if not run or not self._begin("tokenizer", fp):
            if not os.path.exists(model_path):
                raise ConfigError(f"no trained tokenizer in {self.dir}: run the tokenizer stage first")
            self._tokenizer = checkpoint.load(model_path, device=self.device)
            return self._tokenizer
        t0 = time.perf_counter()
        seed = self.train_seed("tokenizer")
        torch.manual_seed(seed)  # initial weights depend on the seed only
        tokenizer = self.build_tokenizer()
        self.check_compatible(tokenizer)
        if type(tokenizer).trainable and not self.recipe.tokenizer.checkpoint and self.recipe.train.tokenizer.steps > 0:
            train_idx, _ = self._split()
            data = AsTorchDataset(self.dataset, train_idx)
            trainer = Trainer(tokenizer, data, self.recipe.train.tokenizer, self.path("tokenizer"),
                              seed=seed, device=self.device, prepare=lambda b: b[0],
                              description=f"tokenizer ({self.recipe.tokenizer.name})", log=self.recipe.log)
            tokenizer = trainer.fit()
        self._tokenizer = self._save_model(tokenizer, model_path)
        self._finish("tokenizer", fp, time.perf_counter() - t0)
        return self._tokenizer

    def _fp_latents(self) -> str:
        return fingerprint("latents", self._fp_tokenizer(), self.recipe.latents.model_dump())

    @torch.inference_mode()
    def stage_latents(self, tokenizer: Tokenizer) -> None:
        fp = self._fp_latents()
        if not self._begin("latents", fp):
            return
        t0 = time.perf_counter()
        if not dist.is_main():  # rank 0 extracts the latents; the others wait for them
            self._finish("latents", fp, 0.0)
            return
        spec = self.recipe.latents
        train_idx, hold_idx = self._split()
        tokenizer.eval().to(self.device)
        meta = {"levels": [[lv.codebook_size, *g] for lv, g in zip(tokenizer.levels, tokenizer.grid_shapes(*self.resolution))],
                "num_classes": self.dataset.num_classes}
        for split, idx, flip in (("train", train_idx, spec.flip), ("holdout", hold_idx, False)):
            data: Any = AsTorchDataset(self.dataset, idx)
            if flip:
                data = FlipDoubled(data)
            writer = LatentWriter(self.path("latents", split), spec.shard_size, {**meta, "flip": flip})
            loader = torch.utils.data.DataLoader(data, batch_size=spec.batch_size, shuffle=False)
            with progress_bar(f"latents ({split})", total=len(data)) as bar:
                for images, labels in loader:
                    codes = tokenizer.encode(images.to(self.device))
                    writer.add(codes, labels)
                    bar.advance(images.shape[0])
            writer.close()
        self._finish("latents", fp, time.perf_counter() - t0)

    def _fp_prior(self, level: int) -> str:
        spec = self.resolved.prior_specs[level]
        ckpt = file_fingerprint(spec.checkpoint) if spec.checkpoint else None
        return fingerprint("prior", level, self._fp_latents(), spec.model_dump(), ckpt,
                           self.recipe.train.prior.model_dump(), self.recipe.class_conditional, self.recipe.seed)

    def stage_priors(self, tokenizer: Tokenizer, run: bool = True) -> list[Prior]:
        if self._priors is not None:
            return self._priors
        priors = []
        for level in range(len(tokenizer.levels)):
            stage = f"prior{level}"
            fp = self._fp_prior(level)
            model_path = self.path(stage, "model.safetensors")
            if not run or not self._begin(stage, fp):
                if not os.path.exists(model_path):
                    raise ConfigError(f"no trained prior for level {level} in {self.dir}: run the prior stage first")
                priors.append(checkpoint.load(model_path, device=self.device))
                continue
            t0 = time.perf_counter()
            torch.manual_seed(self.train_seed("prior") + 1000 + level)  # initial weights from the seed only
            prior = self.build_prior(tokenizer, level)
            if not self.resolved.prior_specs[level].checkpoint and self.recipe.train.prior.steps > 0:
                latents = LatentDataset(self.path("latents", "train"))
                conditional = self.num_classes > 0

                def prepare(batch, level=level, conditional=conditional):
                    codes, labels = batch
                    return {"codes": codes[level], "labels": labels if conditional else None,
                            "context": list(codes[:level]) or None}

                trainer = Trainer(prior, latents, self.recipe.train.prior, self.path(stage),
                                  seed=self.train_seed("prior") + level,
                                  device=self.device, prepare=prepare,
                                  description=f"prior {level} ({self.resolved.prior_specs[level].name})",
                                  log=self.recipe.log)
                prior = trainer.fit()
            priors.append(self._save_model(prior, model_path))
            self._finish(stage, fp, time.perf_counter() - t0)
        self._priors = priors
        return priors

    def _fp_sample(self) -> str:
        return fingerprint("sample", [self._fp_prior(i) for i in range(len(self.resolved.prior_specs))],
                           self.recipe.sample.model_dump(), self.recipe.seed)

    def sample_seed(self) -> int:
        return self.recipe.sample.seed if self.recipe.sample.seed is not None else self.recipe.seed

    def stage_sample(self, tokenizer: Tokenizer, priors: list[Prior]) -> None:
        fp = self._fp_sample()
        if not self._begin("samples", fp):
            return
        t0 = time.perf_counter()
        spec = self.recipe.sample
        labels = sample_labels(spec.n, self.num_classes, spec.labels)
        result = generate(tokenizer, priors, spec.n, labels=labels, seed=self.sample_seed(), batch_size=spec.batch_size,
                          sampler=self.resolved.sampler_params, device=self.device,
                          precision=self.recipe.train.prior.precision)
        write_samples(self.path("samples"), result.images, labels, self.dataset.class_names, spec.grid_columns,
                      codes=result.codes)
        io.write_json(self.path("samples", "timing.json"), {"seconds": result.seconds, "n": spec.n,
                                                            "images_per_second": result.images_per_second,
                                                            "device": str(self.device), **result.stats})
        console.print(f"[green]✓[/green] sampled {spec.n} images in {result.seconds:.1f}s "
                      f"({result.images_per_second:.2f} img/s) -> {self.path('samples')}")
        self._finish("samples", fp, time.perf_counter() - t0)

    def stage_evaluate(self, tokenizer: Tokenizer, priors: list[Prior]) -> dict[str, Any]:
        from genfw.evaluate import evaluate_run

        fp = fingerprint("evaluate", self._fp_sample(), self.recipe.evaluate.model_dump())
        if not self._begin("evaluate", fp) and os.path.exists(self.path("metrics.json")):
            return io.read_json(self.path("metrics.json"))
        t0 = time.perf_counter()
        metrics = evaluate_run(self, tokenizer, priors)
        io.write_json(self.path("metrics.json"), metrics)
        self._finish("evaluate", fp, time.perf_counter() - t0)
        return metrics

    def stage_report(self, tokenizer: Tokenizer, priors: list[Prior] | None) -> None:
        from genfw.report import write_report

        write_report(self, tokenizer, priors)
        console.print(f"[green]✓[/green] report -> {self.path('report.md')}")


def write_samples(folder: str, images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str],
                  columns: int | None = None, codes: list[torch.Tensor] | None = None) -> None:
    """One PNG per image (label in the name when conditional), ``grid.png`` and the codes."""
    import io as _io

    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        suffix = ""
        if labels is not None:
            lab = int(labels[i])
            suffix = f"_class-{safe_name(class_names[lab]) if lab < len(class_names) else lab}"
        buf = _io.BytesIO()
        to_pil(image).save(buf, format="PNG")
        io.write_bytes(os.path.join(folder, f"{i:05d}{suffix}.png"), buf.getvalue())
    if columns is None and labels is not None:
        columns = len(set(labels.tolist())) if len(set(labels.tolist())) > 1 else None
    buf = _io.BytesIO()
    make_grid(images, columns).save(buf, format="PNG")
    io.write_bytes(os.path.join(folder, "grid.png"), buf.getvalue())
    if codes is not None:
        tensors = {f"codes.{i}": c for i, c in enumerate(codes)}
        if labels is not None:
            tensors["labels"] = labels
        checkpoint.save_tensors(os.path.join(folder, "codes.safetensors"), tensors, {"type": "samples"})


def safe_name(name: str) -> str:
    """A class name fit for a file name: no separators or odd characters (names come from files)."""
    import re

    return re.sub(r"[^\w.-]", "_", str(name)).lstrip(".")[:64] or "_"


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


def load_run_models(run_dir: str, device: torch.device | str = "cpu") -> tuple[Tokenizer, list[Prior], dict[str, Any]]:
    """Tokenizer, priors and extras (class names, sampler defaults) from a run directory."""
    tok_path = os.path.join(run_dir, "tokenizer", "model.safetensors")
    if not os.path.exists(tok_path):
        raise CheckpointError(f"{run_dir} is not a finished genfw run directory (no tokenizer/model.safetensors): "
                              "give the folder `genfw run` wrote, after its tokenizer and prior stages")
    tokenizer = checkpoint.load(tok_path, device=device)
    priors = []
    for level in range(len(tokenizer.levels)):
        path = os.path.join(run_dir, f"prior{level}", "model.safetensors")
        if not os.path.exists(path):
            raise CheckpointError(f"{run_dir} has no trained prior for level {level} ({path})")
        priors.append(checkpoint.load(path, device=device))
    extra: dict[str, Any] = {}
    recipe_file = os.path.join(run_dir, "recipe.yaml")
    if os.path.exists(recipe_file):
        try:
            with open(recipe_file, "rb") as f:
                raw = yaml.safe_load(f) or {}
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
            from genfw.config import validate_recipe

            resolved = validate_recipe(raw)
            dataset = get_registry().build("dataset", resolved.recipe.data.name, resolved.data_params)
            extra["class_names"] = dataset.class_names if priors and priors[0].num_classes else []
        except GenfwError:
            extra["class_names"] = []
    return tokenizer, priors, extra
