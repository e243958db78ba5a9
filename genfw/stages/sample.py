"""The sample stage: ``sample.n`` images from the trained priors into ``samples/``."""

from __future__ import annotations

import os
import time
from typing import Any

from genfw import dist, io
from genfw.errors import GenfwError
from genfw.interfaces import Prior, Tokenizer
from genfw.progress import console
from genfw.samples import image_name, write_images, write_samples
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
        # under torchrun every rank samples its share of the chunks (genfw.sampling.generate)
        if not self.begin():
            return
        t0 = time.perf_counter()
        run, spec = self.run, self.run.recipe.sample
        labels = sample_labels(spec.n, run.num_classes, spec.labels)
        class_names = run.dataset.class_names
        written: list[str] = []
        writing: list[str] = []  # the PNG being written now, if any

        def keep(start: int, images, _codes) -> None:
            # as they come, by the rank that made them (torchrun), one by one: an interruption keeps
            # them and the count of kept images is exact
            for i in range(images.shape[0]):
                label = labels[start + i : start + i + 1] if labels is not None else None
                writing[:] = [os.path.join(self.folder, image_name(
                    start + i, int(label[0]) if label is not None else None, class_names))]
                written.extend(write_images(self.folder, images[i : i + 1], label, class_names, start=start + i))
                writing.clear()

        try:
            result = generate(tokenizer, priors, spec.n, labels=labels, seed=run.sample_seed(),
                              batch_size=spec.batch_size, sampler=run.resolved.sampler_params, device=run.device,
                              precision=run.recipe.train.prior.precision, on_chunk=keep)
        except KeyboardInterrupt:
            # interrupted between a PNG's atomic rename and the count: that image is kept too
            kept = len(written) + sum(1 for path in writing if os.path.exists(path))
            raise GenfwError(
                f"samples: interrupted after {kept} of {spec.n} images; those are kept in {self.folder}; run "
                "the same command again to finish the stage (it samples them all again, to the same images)"
            ) from None
        if dist.is_main():
            write_samples(self.folder, result.images, labels, class_names, spec.grid_columns, codes=result.codes,
                          pngs=False)
            io.write_json(self.file("timing.json"), {"seconds": result.seconds, "n": spec.n,
                                                     "images_per_second": result.images_per_second,
                                                     "device": str(run.device), "processes": dist.world_size(),
                                                     **result.stats})
            console.print(f"[green]✓[/green] sampled {spec.n} images in {result.seconds:.1f}s "
                          f"({result.images_per_second:.2f} img/s) -> {self.folder}")
        self.finish(time.perf_counter() - t0)
