"""The sample stage: ``sample.n`` images from the trained priors into ``samples/``."""

from __future__ import annotations

import time
from typing import Any

from genfw import io
from genfw.interfaces import Prior, Tokenizer
from genfw.progress import console
from genfw.samples import write_samples
from genfw.sampling import generate, sample_labels
from genfw.stages.base import Stage


class SampleStage(Stage):
    name = "samples"

    def compute_inputs(self) -> dict[str, Any]:
        run = self.run
        return {"priors": [run.stage(f"prior{i}").output_id() for i in range(len(run.resolved.prior_specs))],
                "sample": run.recipe.sample.model_dump(mode="json"), "seed": run.recipe.seed,
                "precision": run.recipe.train.prior.precision}

    def execute(self, tokenizer: Tokenizer, priors: list[Prior]) -> None:
        if not self.begin(collective=False):
            return
        t0 = time.perf_counter()
        run, spec = self.run, self.run.recipe.sample
        labels = sample_labels(spec.n, run.num_classes, spec.labels)
        result = generate(tokenizer, priors, spec.n, labels=labels, seed=run.sample_seed(), batch_size=spec.batch_size,
                          sampler=run.resolved.sampler_params, device=run.device,
                          precision=run.recipe.train.prior.precision)
        write_samples(self.folder, result.images, labels, run.dataset.class_names, spec.grid_columns,
                      codes=result.codes)
        io.write_json(self.file("timing.json"), {"seconds": result.seconds, "n": spec.n,
                                                 "images_per_second": result.images_per_second,
                                                 "device": str(run.device), **result.stats})
        console.print(f"[green]✓[/green] sampled {spec.n} images in {result.seconds:.1f}s "
                      f"({result.images_per_second:.2f} img/s) -> {self.folder}")
        self.finish(time.perf_counter() - t0, collective=False)
