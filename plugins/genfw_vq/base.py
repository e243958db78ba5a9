"""What the VQ tokenizers share: construction arguments, image-size checks and codebook logs."""

from __future__ import annotations

import torch

from genfw.errors import ConfigError
from genfw.interfaces import Tokenizer
from genfw.nn.quantizer import QuantizerOutput, VectorQuantizer


class VQTokenizer(Tokenizer):
    """Base of the VQ tokenizers: image-size checks and codebook health.

    Subclasses keep their quantizers, coarsest level first, in ``self.quantizers()``.
    """

    def check_resolution(self, factor: int) -> None:
        h, w = self.resolution
        if h % factor or w % factor:
            raise ConfigError(
                f"{type(self).__name__}: image size {h}x{w} is not divisible by the total "
                f"downsampling factor {factor}: choose a data.params.resolution divisible by {factor}"
            )

    def quantizers(self) -> list[VectorQuantizer]:
        raise NotImplementedError

    @staticmethod
    def quantizer_logs(outputs: list[QuantizerOutput]) -> dict[str, float]:
        """Per-level codebook statistics of one training step, coarsest level first."""
        logs: dict[str, float] = {}
        for i, q in enumerate(outputs):
            logs[f"level{i}/vq_loss"] = float(q.loss.detach())
            for k, v in q.stats.items():
                logs[f"level{i}/{k}"] = float(v)
        return logs

    @torch.no_grad()
    def codebook_stats(self, codes: list[torch.Tensor]) -> dict[str, float]:
        """Perplexity and usage over ``codes``, plus dead codes tracked during training."""
        out = super().codebook_stats(codes)
        for i, q in enumerate(self.quantizers()):
            for k, v in q.health().items():
                out[f"level{i}/{k}"] = v
        return out
