"""MaskGIT prior over one level's code grid (Chang et al. 2022, *MaskGIT: Masked Generative Image
Transformer*, CVPR; arXiv:2202.04200).

Training (sec. 3.1): draw r ~ U[0, 1), mask ceil(gamma(r) N) random tokens of the grid with the
mask schedule gamma (cosine by default, sec. 3.3), predict them (cross-entropy over the masked
tokens only, label smoothing 0.1 as in the paper's setup). Decoding (sec. 3.2): start from all
masked; at each of T steps sample every masked token, keep the most confident and mask the
rest again so that gamma(t/T) of the initially masked tokens stay masked (see
:mod:`genfw_maskgit.schedule`). Confidence gets Gumbel noise annealed as in the authors' decoder
(``choice_temperature * (1 - t/T)``, google-research/maskgit ``parallel_decode.py``).

Additions, as for the other genfw priors: class conditioning with classifier-free guidance
(:mod:`genfw.nn.guidance`; Muse, Chang et al. 2023, uses it with MaskGIT decoding), a sampling
temperature with optional linear annealing, inpainting (``init``/``mask``: only masked positions
are generated; the schedule runs over their count) and grids larger than the training grid by
averaging the probabilities of every training-size window (Unleashing Transformers eq. 8).

Likelihood: MaskGIT's confidence-ordered decoder has no tractable likelihood, and the masked
cross-entropy it is trained on neither is one nor bounds one for that decoder. :meth:`nll`
reports that cross-entropy (kind ``not_likelihood``): comparable across MaskGIT models only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field

from genfw.interfaces import NLLOutput, Params, Prior, StepOutput
from genfw.interfaces import Params as BaseParams  # the nested Params below shadows it in class bodies
from genfw.nn.guidance import (
    check_guidance,
    drop_labels,
    guidance_at,
    guided_logits,
    labels_or_null,
    null_class_for,
)
from genfw.nn.sampling import Windows, categorical, masked_canvas, rand, target_grid, tempered
from genfw_maskgit.schedule import gumbel, mask_ratio, remask

Schedule = Literal["cosine", "linear", "sqrt", "square"]


class MaskGIT(Prior):
    """Masked-token prediction; confidence-ordered parallel decoding over a mask schedule."""

    #: The masked-token cross-entropy is not a likelihood (see :meth:`nll`).
    nll_kind = "not_likelihood"

    class Params(Params):
        train_schedule: Schedule = Field("cosine", description=(
            "gamma of the training masks: ceil(gamma(r) N) tokens masked, r ~ U[0, 1) (paper: cosine)"))
        label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the masked cross-entropy (paper: 0.1)")
        label_drop: float = Field(0.0, ge=0, lt=1, description=(
            "probability of training on the null class instead of the label, which enables "
            "classifier-free guidance (0 = off; the backbone then has no null class)"))
        nll_ratios: int = Field(8, ge=1, description=(
            "mask ratios r (midpoints of equal strata of [0, 1)) at which nll() averages the masked "
            "cross-entropy"))

    class SamplerParams(BaseParams):
        steps: int = Field(12, ge=1, description="T: decoding steps (paper: 8-12 on ImageNet)")
        schedule: Schedule = Field("cosine", description=(
            "gamma of the decoding: after step t, gamma(t/T) of the initially masked tokens stay "
            "masked (paper: cosine; also linear, sqrt = 1 - sqrt(r), square = 1 - r^2)"))
        temperature: float = Field(1.0, gt=0, description="softmax temperature of the token draws at the first step")
        temperature_end: float | None = Field(None, gt=0, description=(
            "temperature at the last step, linearly annealed from `temperature` (None: constant)"))
        choice_temperature: float = Field(4.5, ge=0, description=(
            "scale of the Gumbel noise on the confidence, annealed by (1 - t/T) (the authors' "
            "ImageNet setting: 4.5; 0 = keep strictly the most confident)"))
        guidance_scale: float = Field(1.0, description=(
            "classifier-free guidance s: logits = uncond + s * (cond - uncond); 1 = plain "
            "conditional sampling (needs a model trained with label_drop > 0 otherwise)"))
        guidance_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description=(
            "how the scale moves over the steps: constant, or from 1 at the start to s at the last "
            "step linearly (Muse) or along half a cosine"))
        window_stride: int = Field(1, ge=1, description=(
            "stride of the training-size windows when sampling a larger grid (Unleashing Transformers "
            "eq. 8; 1 = every window)"))

    def __init__(self, params: Params | dict | None = None, **construct: Any) -> None:
        super().__init__(params, **construct)  # codebook_size, grid, num_classes, context, backbone
        self.mask_id = self.codebook_size  # the [MASK] token: one extra input token, never an output
        self.null_class = null_class_for(self.num_classes, self.params.label_drop)
        self.backbone = self.make_backbone(vocab_size=self.codebook_size + 1,
                                           num_classes=self.num_classes + (self.null_class is not None))
        self.last_sample_stats: dict[str, Any] = {}
        self._rows = 0  # backbone rows evaluated by the current sample() call

    # -- helpers ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _labels(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        return labels_or_null(labels, n, self.null_class, device)

    def masks(self, shape: tuple[int, ...], r: torch.Tensor, schedule: str,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Training masks [B, h, w] for progress ``r [B]``: ceil(gamma(r) N) random tokens each."""
        b, n = shape[0], math.prod(shape[1:])
        count = torch.ceil(mask_ratio(r.double(), schedule) * n).clamp(1, n).long()
        keys = rand((b, n), generator, r.device)
        return (keys.argsort(1).argsort(1) < count[:, None]).view(shape)

    def _masked_ce(self, codes: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor | None,
                   context: list[torch.Tensor] | None, smoothing: float) -> torch.Tensor:
        """Mean cross-entropy (nats) over each sample's masked tokens [B]."""
        x = codes.masked_fill(masked, self.mask_id)
        logits = self.backbone(x, labels=labels, context=context).float()
        ce = F.cross_entropy(rearrange(logits, "b h w k -> b k h w"), codes, reduction="none",
                             label_smoothing=smoothing)
        return (ce * masked).flatten(1).sum(1) / masked.flatten(1).sum(1).clamp_min(1)

    def _probs(self, x: torch.Tensor, labels: torch.Tensor | None, context: list[torch.Tensor] | None,
               temperature: float, guidance: float, windows: Windows | None) -> torch.Tensor:
        """Token distribution [B, H, W, K] at ``temperature`` (window-averaged on big grids)."""
        rows = x.shape[0] * (windows.count if windows else 1) * (1 if guidance == 1.0 else 2)
        self._rows += rows
        if windows is None:
            return torch.softmax(guided_logits(self.backbone, x, labels, context, guidance, self.null_class)
                                 / temperature, dim=-1)
        n = windows.count
        labels = labels.repeat_interleave(n) if labels is not None else None
        context = [windows.split_coarse(c) for c in context] if context else None
        logits = guided_logits(self.backbone, windows.split(x), labels, context, guidance, self.null_class)
        return tempered(windows.merge(torch.softmax(logits, dim=-1)), temperature)

    # -- the Prior interface -----------------------------------------------------------------

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
             context: list[torch.Tensor] | None = None) -> StepOutput:
        """Mask ceil(gamma(r) N) tokens, r ~ U[0, 1); cross-entropy over the masked tokens."""
        labels = drop_labels(self._labels(labels, codes.shape[0], codes.device), self.null_class,
                             self.params.label_drop)
        r = torch.rand(codes.shape[0], device=codes.device)
        masked = self.masks(tuple(codes.shape), r, self.params.train_schedule)
        ce = self._masked_ce(codes, masked, labels, context, self.params.label_smoothing)
        logs = {"masked_fraction": float(masked.float().mean())}
        return StepOutput(losses={"main": ce.mean()}, logs=logs)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, context: list[torch.Tensor] | None = None,
               init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, params: Params | None = None,
               grid: tuple[int, int] | None = None, **overrides: Any) -> torch.Tensor:
        """Decode ``n`` grids in ``steps`` steps from all-masked (or inpaint ``init`` where ``mask``)."""
        sp = self.sampler_params(params, **overrides)
        device = self._device()
        target = target_grid(self.grid, grid, init)
        windows = None if target == self.grid else Windows(target, self.grid, (sp.window_stride,) * 2)
        check_guidance(sp.guidance_scale, self.null_class, labels)
        labels = self._labels(labels, n, device)
        context = [c.to(device) for c in context] if context else None

        x = masked_canvas(n, target, self.mask_id, init, mask, device)
        x = rearrange(x, "b h w -> b (h w)")
        unknown_at_start = (x == self.mask_id).sum(1)
        t_end = sp.temperature if sp.temperature_end is None else sp.temperature_end
        temperatures = torch.linspace(sp.temperature, t_end, sp.steps).tolist()

        self._rows, forwards = 0, 0
        for step in range(sp.steps):
            unknown = x == self.mask_id  # b (h w)
            # Every sample's draws are made, the active ones used (same stream whatever is done).
            u_token, u_choice = rand((2, *x.shape), generator, device)
            active = unknown.any(1).nonzero().squeeze(1)
            if len(active) == 0:
                break
            ratio = (step + 1) / sp.steps
            scale = guidance_at(sp.guidance_scale, sp.guidance_schedule, ratio)
            grid_x = rearrange(x[active], "b (h w) -> b h w", h=target[0])
            probs = self._probs(grid_x, labels[active] if labels is not None else None,
                                [c[active] for c in context] if context else None,
                                temperatures[step], scale, windows)
            probs = rearrange(probs, "b h w k -> b (h w) k")
            drawn = categorical(probs, generator, uniform=u_token[active])
            known = ~unknown[active]
            drawn = torch.where(known, x[active], drawn)
            forwards += 1
            if step + 1 < sp.steps:
                selected = probs.gather(-1, drawn[..., None])[..., 0]
                again = remask(selected, unknown[active], unknown_at_start[active], ratio, sp.schedule,
                               sp.choice_temperature, gumbel(u_choice[active]))
                drawn = drawn.masked_fill(again, self.mask_id)
            x[active] = drawn
        self.last_sample_stats = {"steps": forwards, "backbone_evaluations": self._rows,
                                  "windows": windows.count if windows else 1}
        return rearrange(x, "b (h w) -> b h w", h=target[0])

    @torch.no_grad()
    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
            context: list[torch.Tensor] | None = None, generator: torch.Generator | None = None) -> NLLOutput:
        """The masked-token cross-entropy in bits per masked token, per sample: the mean over
        ``nll_ratios`` mask ratios (midpoints of equal strata of r, masks drawn from ``generator``,
        no label smoothing). Not a likelihood nor a bound on MaskGIT's (kind ``not_likelihood``).
        """
        labels = self._labels(labels, codes.shape[0], codes.device)
        k = self.params.nll_ratios
        total = torch.zeros(codes.shape[0], device=codes.device)
        for j in range(k):
            r = torch.full((codes.shape[0],), (j + 0.5) / k, device=codes.device)
            masked = self.masks(tuple(codes.shape), r, self.params.train_schedule, generator)
            total += self._masked_ce(codes, masked, labels, context, 0.0)
        return NLLOutput(bits_per_token=total / k / math.log(2), kind="not_likelihood")
