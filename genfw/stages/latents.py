"""The latents stage: encode the train and held-out images into sharded code grids."""

from __future__ import annotations

import time
from typing import Any

import torch

from genfw import dist
from genfw.data import AsTorchDataset, FlipDoubled, LatentWriter
from genfw.errors import GenfwError
from genfw.interfaces import Tokenizer
from genfw.progress import progress_bar
from genfw.stages.base import Stage


class LatentsStage(Stage):
    name = "latents"

    def compute_inputs(self) -> dict[str, Any]:
        spec = self.run.recipe.latents
        # shard_size and batch_size change how the codes are stored and computed, not the codes
        return {"tokenizer": self.run.stage("tokenizer").output_id(), "flip": spec.flip, "holdout": spec.holdout}

    @torch.inference_mode()
    def execute(self, tokenizer: Tokenizer) -> None:
        if not self.begin():
            return
        t0 = time.perf_counter()
        if not dist.is_main():  # rank 0 extracts the latents; the others wait for them
            self.finish(0.0)
            return
        run = self.run
        spec = run.recipe.latents
        train_idx, hold_idx = run.split()
        tokenizer.eval().to(run.device)
        meta = {"levels": [[lv.codebook_size, *g] for lv, g in zip(tokenizer.levels, tokenizer.grid_shapes(*run.resolution))],
                "num_classes": run.dataset.num_classes}
        for split, idx, flip in (("train", train_idx, spec.flip), ("holdout", hold_idx, False)):
            data: Any = AsTorchDataset(run.dataset, idx)
            if flip:
                data = FlipDoubled(data)
            writer = LatentWriter(self.file(split), spec.shard_size, {**meta, "flip": flip})
            loader = torch.utils.data.DataLoader(data, batch_size=spec.batch_size, shuffle=False)
            done = 0
            try:
                with progress_bar(f"latents ({split})", total=len(data)) as bar:
                    for images, labels in loader:
                        codes = tokenizer.encode(images.to(run.device))
                        writer.add(codes, labels)
                        done += images.shape[0]
                        bar.advance(images.shape[0])
            except KeyboardInterrupt:
                raise GenfwError(
                    f"latents: interrupted after encoding {done} of {len(data)} {split} images; the trained tokenizer "
                    f"is kept, the unfinished latents are not used; run the same command again to extract them "
                    "(this stage starts over, the finished stages are reused)"
                ) from None
            writer.close()
        self.finish(time.perf_counter() - t0)
