"""The tokenizer stage: build (or load) the tokenizer, train it, write ``tokenizer/model.safetensors``."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from genfw.context import model_file
from genfw.data import AsTorchDataset
from genfw.errors import ConfigError
from genfw.interfaces import Tokenizer
from genfw.stages.training import TrainingStage, source_fingerprint, warm_start


class TokenizerStage(TrainingStage):
    name = "tokenizer"

    def train_spec(self):
        return self.run.recipe.train.tokenizer

    def trains(self) -> bool:
        spec = self.run.recipe.tokenizer
        cls = self.run.registry.load("tokenizer", spec.name)
        return bool(cls.trainable and not spec.checkpoint and self.train_spec().steps > 0)

    def compute_inputs(self) -> dict[str, Any]:
        recipe = self.run.recipe
        spec = recipe.tokenizer
        return {"data": recipe.data.model_dump(mode="json"), "name": spec.name, "params": spec.params,
                "checkpoint": source_fingerprint(spec.checkpoint),
                "init_from": source_fingerprint(spec.init_from and self._init_file()),
                "train": self.semantic_train(), "seed": recipe.seed, "holdout": recipe.latents.holdout}

    def _init_file(self) -> str:
        return model_file(self.run.recipe.tokenizer.init_from, "tokenizer")

    def execute(self, run_it: bool = True) -> Tokenizer:
        """The trained tokenizer: reused when unchanged, else built and trained."""
        if not run_it or not self.begin():
            if not os.path.exists(self.model_path):
                raise ConfigError(f"no trained tokenizer in {self.run.dir}: run the tokenizer stage first")
            return self.load()
        t0 = time.perf_counter()
        seed = self.run.train_seed("tokenizer")
        torch.manual_seed(seed)  # initial weights depend on the seed only
        tokenizer = self.run.build_tokenizer()
        self.run.check_compatible(tokenizer)
        spec = self.run.recipe.tokenizer
        if spec.init_from:
            warm_start(tokenizer, spec.init_from, "tokenizer", "tokenizer.init_from")
        if self.trains():
            train_idx, _ = self.run.split()
            tokenizer = self.fit(tokenizer, AsTorchDataset(self.run.dataset, train_idx), seed=seed,
                                 prepare=lambda b: b[0], description=f"tokenizer ({spec.name})")
        tokenizer = self.save(tokenizer)
        self.finish(time.perf_counter() - t0)
        return tokenizer
