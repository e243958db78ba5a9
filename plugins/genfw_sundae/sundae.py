"""SUNDAE: step-unrolled denoising autoencoder prior over one level's code grid.

McKinney & Willcocks, *Megapixel Image Generation with Step-Unrolled Denoising Autoencoders*
(papers/000): section 2.3 (the method of Savinov et al. 2022), 3.3 (corruption, eq. 5, and the
unrolled loss, eq. 6), 3.4 (sampler: annealed temperature, sample proportion, sample-wise
self-stopping), 3.6 (arbitrary-mask inpainting) and 4.2 (class conditioning through a learned
class embedding, which the backbone adds to every input embedding).

Two additions the reference code lacks: classifier-free guidance (Ho & Salimans 2022: drop the
label to a null class with probability ``label_drop`` in training, mix conditional and
unconditional logits at sampling, both in one batched forward), and grids larger than the
training grid by averaging the probabilities of training-size windows (Unleashing Transformers
section 3.3, eq. 8), all windows batched into one forward per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field

from genfw.interfaces import NLLOutput, Params, Prior, StepOutput
from genfw.interfaces import Params as BaseParams  # the nested Params below shadows it in class bodies
from genfw.nn.guidance import GuidanceSchedule, check_guidance, guidance_at, labels_or_null, null_class_for
from genfw.nn.sampling import Windows, categorical, rand, randint, target_grid, tempered


def sampler_ends(sp: Any) -> tuple[float, float]:
    """(temperature at the last step, sample proportion at the last step): an end value left
    unset equals its start value, so nothing anneals unless asked (the authors' default)."""
    t_end = sp.temperature if sp.temperature_end is None else sp.temperature_end
    p_end = sp.sample_proportion if sp.sample_proportion_end is None else sp.sample_proportion_end
    return float(t_end), float(p_end)


class Sundae(Prior):
    """Uniform-noise corruption, ``unroll_steps`` denoising steps in training, and the
    self-stopping parallel sampler of the megapixel-SUNDAE paper."""

    #: The unrolled denoising cross-entropy is not a likelihood (see :meth:`nll`).
    nll_kind = "not_likelihood"

    class Params(Params):
        unroll_steps: int = Field(3, ge=1, le=8, description=(
            "U: denoising steps unrolled in training, each fed the previous step's samples "
            "(paper Table 3: 3 for VQ latents, 2 for MNIST; the authors' ffhq1024-hourglass-2122-4.toml uses 3)"))
        label_drop: float = Field(0.0, ge=0, lt=1, description=(
            "probability of training on the null class instead of the label, which enables "
            "classifier-free guidance (0 = off; the backbone then has no null class)"))

    class SamplerParams(BaseParams):
        # Defaults: the sampler of the authors' released 256x256 configs
        # (config/ffhq256/ffhq256-hourglass-2102-4.toml and -3103-4.toml: 100 steps, tau 0.8 -> 0.8,
        # proportion 0.5 -> 0.5), which is also what their bulk sampler sample.py runs.
        steps: int = Field(100, ge=1, description=(
            "T: maximum number of denoising steps (the authors' FFHQ256 configs: 100; paper: 100 for FFHQ1024)"))
        temperature: float = Field(0.8, gt=0, description=(
            "tau at the first step (the authors' FFHQ256 and CelebA configs: 0.8; paper sec. 3.4 "
            "anneals from about 1.0, Fig. 13 finds 0.5-0.7 best)"))
        temperature_end: float | None = Field(None, gt=0, description=(
            "tau at the last step, linearly annealed from `temperature`; default (None): equal to "
            "`temperature`, i.e. constant, as in the authors' FFHQ256 configs and their sample.py, which "
            "ignores a config's end temperature (FFHQ1024's config anneals 1.0 -> 0.7)"))
        sample_proportion: float = Field(0.5, gt=0, le=1, description=(
            "fraction of positions updated at the first step (the authors' FFHQ256 configs: 0.5; "
            "paper: 0.5-0.8 for few steps, lower with many steps, Fig. 8; MNIST 1.0)"))
        sample_proportion_end: float | None = Field(None, gt=0, le=1, description=(
            "fraction of positions updated at the last step, linearly annealed; default (None): "
            "equal to `sample_proportion`, i.e. constant, as in the authors' sampler"))
        min_steps: int = Field(10, ge=0, description=(
            "steps run before sample-wise self-stopping may freeze a sample (paper code: 10)"))
        self_stopping: bool = Field(True, description=(
            "freeze a sample (and drop it from the batch) once a step leaves it unchanged"))
        guidance_scale: float = Field(1.0, description=(
            "classifier-free guidance s: logits = uncond + s * (cond - uncond); 1 = plain "
            "conditional sampling (needs a model trained with label_drop > 0 otherwise)"))
        guidance_schedule: GuidanceSchedule = Field("constant", description=(
            "how the scale moves over the steps: constant, or from 1 at the first to s at the last "
            "step linearly or along half a cosine"))
        window_stride: int = Field(1, ge=1, description=(
            "stride of the training-size windows when sampling a larger grid (eq. 8 of "
            "Unleashing Transformers; 1 = every window)"))

    def __init__(self, params: Params | dict | None = None, **construct: Any) -> None:
        super().__init__(params, **construct)  # codebook_size, grid, num_classes, context, backbone
        # Classifier-free guidance needs a learned "no label" embedding: class index num_classes.
        self.null_class = null_class_for(self.num_classes, self.params.label_drop)
        self.backbone = self.make_backbone(vocab_size=self.codebook_size,
                                           num_classes=self.num_classes + (self.null_class is not None))
        self.last_sample_stats: dict[str, Any] = {}
        self._rows = 0  # backbone rows evaluated by the current sample() call

    # -- helpers ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _labels(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        return labels_or_null(labels, n, self.null_class, device)

    def _logits(self, x: torch.Tensor, labels: torch.Tensor | None, context: list[torch.Tensor] | None,
                guidance: float) -> torch.Tensor:
        """Backbone logits [B, h, w, K], with classifier-free guidance in one doubled batch."""
        if guidance == 1.0:
            self._rows += x.shape[0]
            return self.backbone(x, labels=labels, context=context).float()
        null = torch.full_like(labels, self.null_class)
        ctx = [torch.cat([c, c]) for c in context] if context else None
        self._rows += 2 * x.shape[0]
        both = self.backbone(torch.cat([x, x]), labels=torch.cat([labels, null]), context=ctx).float()
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def _probs(self, x: torch.Tensor, labels: torch.Tensor | None, context: list[torch.Tensor] | None,
               temperature: float, guidance: float, windows: Windows | None) -> torch.Tensor:
        """Denoising distribution [B, H, W, K] at ``temperature`` (window-averaged on big grids)."""
        if windows is None:
            return torch.softmax(self._logits(x, labels, context, guidance) / temperature, dim=-1)
        n = windows.count
        labels = labels.repeat_interleave(n) if labels is not None else None
        context = [windows.split_coarse(c) for c in context] if context else None
        probs = torch.softmax(self._logits(windows.split(x), labels, context, guidance), dim=-1)
        # eq. 8: average the windows' probabilities at each position, then apply temperature.
        return tempered(windows.merge(probs), temperature)

    def _unroll(self, codes: torch.Tensor, labels: torch.Tensor | None, context: list[torch.Tensor] | None,
                generator: torch.Generator | None) -> list[torch.Tensor]:
        """eq. 5 corruption, then ``unroll_steps`` denoising steps; the logits of each."""
        b, device, k = codes.shape[0], codes.device, self.codebook_size
        rate = rand((b, 1, 1), generator, device)  # one corruption rate per sample
        corrupt = rand(tuple(codes.shape), generator, device) < rate
        x = torch.where(corrupt, randint(k, tuple(codes.shape), generator, device), codes)
        out = []
        for step in range(self.params.unroll_steps):
            logits = self.backbone(x, labels=labels, context=context)
            out.append(logits)
            if step + 1 < self.params.unroll_steps:
                with torch.no_grad():  # no gradient through the sampling of the next input
                    x = categorical(torch.softmax(logits.detach().float(), dim=-1), generator)
        return out

    def _cross_entropies(self, logits: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all tokens, per unroll step and sample: [U, B] (nats)."""
        target = rearrange(codes, "b h w -> b (h w)")
        return torch.stack([
            F.cross_entropy(rearrange(lg.float(), "b h w k -> b k (h w)"), target, reduction="none").mean(1)
            for lg in logits
        ])

    # -- the Prior interface -----------------------------------------------------------------

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
             context: list[torch.Tensor] | None = None) -> StepOutput:
        """eq. 6: the mean over unroll steps of the cross-entropy over every token."""
        labels = self._labels(labels, codes.shape[0], codes.device)
        if labels is not None and self.null_class is not None:
            drop = torch.rand(labels.shape, device=labels.device) < self.params.label_drop
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        logits = self._unroll(codes, labels, context, generator=None)
        ce = self._cross_entropies(logits, codes)  # u b
        bits = ce.detach() / math.log(2)
        logs = {f"bits_per_token/unroll{i + 1}": float(c.mean()) for i, c in enumerate(bits)}
        logs["bits_per_token"] = float(bits.mean())
        logs["accuracy"] = float((logits[-1].argmax(-1) == codes).float().mean())
        return StepOutput(losses={"main": ce.mean()}, logs=logs)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, context: list[torch.Tensor] | None = None,
               init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, params: Params | None = None,
               grid: tuple[int, int] | None = None, **overrides: Any) -> torch.Tensor:
        """Denoise ``n`` grids from uniform noise (or inpaint ``init`` where ``mask``).

        Sample-wise self-stopping drops frozen samples from the batch, so later steps run
        smaller forwards; ``last_sample_stats`` records the work done.
        """
        sp = self.sampler_params(params, **overrides)
        device, k = self._device(), self.codebook_size
        target = target_grid(self.grid, grid, init)
        windows = None if target == self.grid else Windows(target, self.grid, (sp.window_stride,) * 2)
        check_guidance(sp.guidance_scale, self.null_class, labels)
        labels = self._labels(labels, n, device)
        context = [c.to(device) for c in context] if context else None

        x = randint(k, (n, *target), generator, device)
        if init is not None:
            mask = torch.ones_like(init, dtype=torch.bool) if mask is None else mask.to(device).bool()
            x = torch.where(mask, x, init.to(device))  # 3.6: randomise only what is inpainted
        t_end, p_end = sampler_ends(sp)
        temperatures = torch.linspace(sp.temperature, t_end, sp.steps).tolist()
        proportions = torch.linspace(sp.sample_proportion, p_end, sp.steps).tolist()

        self._rows, sample_steps, steps_run = 0, 0, 0
        active = torch.arange(n, device=device)  # samples not frozen yet
        frozen_at = torch.full((n,), -1, dtype=torch.long, device=device)
        for step in range(sp.steps):
            # Every sample's draws are made, the active ones used: what a sample becomes does not
            # depend on which others were dropped, so self-stopping changes no sample's path.
            u_token, u_update = rand((2, n, *target), generator, device)
            xa = x[active]
            probs = self._probs(xa, labels[active] if labels is not None else None,
                                [c[active] for c in context] if context else None,
                                temperatures[step],
                                guidance_at(sp.guidance_scale, sp.guidance_schedule, (step + 1) / sp.steps), windows)
            proposal = categorical(probs, generator, uniform=u_token[active])
            update = u_update[active] < proportions[step]
            if mask is not None:
                update &= mask[active]
            new = torch.where(update, proposal, xa)
            x[active] = new
            sample_steps += len(active)
            steps_run += 1
            if sp.self_stopping and step + 1 >= sp.min_steps:
                changed = (new != xa).flatten(1).any(1)
                frozen_at[active[~changed]] = step
                active = active[changed]
                if len(active) == 0:
                    break
        # backbone_evaluations counts rows fed to the backbone (windows and guidance included);
        # frozen_at: the step after which each sample stopped changing (-1: ran to the end).
        self.last_sample_stats = {"steps": steps_run, "sample_steps": sample_steps,
                                  "backbone_evaluations": self._rows, "windows": windows.count if windows else 1,
                                  "frozen_at": frozen_at.tolist()}
        return x

    @torch.no_grad()
    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
            context: list[torch.Tensor] | None = None, generator: torch.Generator | None = None) -> NLLOutput:
        """The unrolled denoising loss (eq. 6) per sample, in bits per token, one Monte-Carlo draw.

        Not a likelihood, nor a bound on one (kind ``not_likelihood``): the loss conditions on a
        corrupted copy of the data, so a network that only copies its input scores below the
        entropy of the data (on uniformly random codes, below log2 K, which bounds every
        model's true NLL from below). Compare it across SUNDAE models only; metrics name it
        ``denoising_ce_bits_per_token``, never ``nll``.
        """
        labels = self._labels(labels, codes.shape[0], codes.device)
        ce = self._cross_entropies(self._unroll(codes, labels, context, generator), codes)
        return NLLOutput(bits_per_token=ce.mean(0) / math.log(2), kind="not_likelihood")
