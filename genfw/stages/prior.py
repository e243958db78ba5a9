"""The prior stage of one tokenizer level: build (or load) the prior, train it on the latents,
write ``prior<level>/model.safetensors``; with ``sample_every``, sample grids in ``previews/``."""

from __future__ import annotations

import io as _io
import os
import time
from typing import Any

import torch

from genfw import io
from genfw.context import model_file
from genfw.data import LatentDataset
from genfw.errors import ConfigError
from genfw.images import make_grid
from genfw.interfaces import Prior, Tokenizer
from genfw.progress import console
from genfw.sampling import generate, sample_labels
from genfw.stages.training import TrainingStage, source_fingerprint, warm_start

PREVIEW_IMAGES = 16  # at most this many images per preview grid


class PriorStage(TrainingStage):
    def __init__(self, run, level: int) -> None:
        super().__init__(run)
        self.level = level
        self.name = f"prior{level}"

    @property
    def spec(self):
        return self.run.resolved.prior_specs[self.level]

    def train_spec(self):
        return self.run.recipe.train.prior

    def trains(self) -> bool:
        return not self.spec.checkpoint and self.train_spec().steps > 0

    def compute_inputs(self) -> dict[str, Any]:
        recipe, spec = self.run.recipe, self.spec
        return {"level": self.level, "latents": self.run.stage("latents").output_id(),
                "name": spec.name, "params": spec.params, "backbone": spec.backbone.model_dump(mode="json"),
                "checkpoint": source_fingerprint(spec.checkpoint),
                "init_from": source_fingerprint(spec.init_from and self._init_file()),
                "train": self.semantic_train(), "class_conditional": recipe.class_conditional, "seed": recipe.seed}

    def _init_file(self) -> str:
        return model_file(self.spec.init_from, self.name)

    def execute(self, tokenizer: Tokenizer, run_it: bool = True, coarser: list[Prior] | None = None) -> Prior:
        """The trained prior of this level; ``coarser`` are the levels above (for previews)."""
        if not run_it or not self.begin():
            if not os.path.exists(self.model_path):
                raise ConfigError(f"no trained prior for level {self.level} in {self.run.dir}: run the prior stage first")
            return self.load()
        t0 = time.perf_counter()
        seed = self.run.train_seed("prior")
        torch.manual_seed(seed + 1000 + self.level)  # initial weights from the seed only
        prior = self.run.build_prior(tokenizer, self.level)
        if self.spec.init_from:
            warm_start(prior, self.spec.init_from, self.name, f"prior level {self.level} init_from")
        if self.trains():
            latents = LatentDataset(self.run.path("latents", "train"))
            conditional = self.run.num_classes > 0
            level = self.level

            def prepare(batch):
                codes, labels = batch
                return {"codes": codes[level], "labels": labels if conditional else None,
                        "context": list(codes[:level]) or None}

            every = []
            if self.train_spec().sample_every:
                every.append((self.train_spec().sample_every,
                              lambda trainer: self.preview(trainer, tokenizer, coarser or [])))
            prior = self.fit(prior, latents, seed=seed + self.level, prepare=prepare, every=every,
                             description=f"prior {self.level} ({self.spec.name})")
        prior = self.save(prior)
        self.finish(time.perf_counter() - t0)
        return prior

    def preview(self, trainer, tokenizer: Tokenizer, coarser: list[Prior]) -> None:
        """Write ``previews/step-NNNNNNN.png``: a grid sampled from the weights being trained.

        Needs every level, so in a hierarchy only the finest level's stage writes previews. The
        global random state is left as it was, so training is unchanged by previews.
        """
        if len(coarser) != self.level or self.level != len(tokenizer.levels) - 1:
            return

        spec = self.run.recipe.sample
        n = min(spec.n, PREVIEW_IMAGES)
        module = trainer.final_module()
        devices = [self.run.device] if self.run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            labels = sample_labels(n, self.run.num_classes, spec.labels)
            result = generate(tokenizer, [*coarser, module], n, labels=labels, seed=self.run.sample_seed(),
                              batch_size=spec.batch_size, sampler=self.run.resolved.sampler_params[: self.level + 1],
                              device=self.run.device, precision=trainer.spec.precision,
                              split=False)  # rank 0 alone, while the others train
        trainer.module.train()
        grid = make_grid(result.images, spec.grid_columns)
        buf = _io.BytesIO()
        grid.save(buf, format="PNG")
        path = self.file("previews", f"step-{trainer.step:07d}.png")
        io.write_bytes(path, buf.getvalue())
        loggers = getattr(trainer, "loggers", None)
        if loggers is not None and hasattr(loggers, "log_image"):
            loggers.log_image(trainer.step, "samples", grid)
        console.print(f"[dim]{self.name}: preview at step {trainer.step} -> {path}[/dim]")
