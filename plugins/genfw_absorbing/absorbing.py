"""Absorbing-state discrete diffusion prior over one level's code grid.

Bond-Taylor et al., *Unleashing Transformers* (papers/002): section 3.1 (absorbing diffusion:
tokens are masked with probability t/T, the network predicts x0 from x_t, the ELBO of eq. 6,
sampling with step skipping), 3.2 (the reweighted ELBO of eq. 7) and 3.3 (samples larger than
the training grid by averaging the probabilities of every training-size window, eq. 8).
Details the paper leaves open follow the authors' code (``models/absorbing_diffusion.py`` of
Unleashing Transformers): mask id = codebook size,
T = 256, the network is not told t, the loss normalisations below.

Sampling (``unmasking``): ``random`` is the paper's reverse process: at timestep t each
still-masked position is unmasked with probability 1/t (the reverse of masking each token with
probability t/T; Austin et al.'s absorbing process), its value drawn from p(x0 | x_t); the ELBO
of eq. 6 bounds the NLL of exactly this process when it runs every timestep (steps = T) at
temperature 1. With steps S < T it visits the timesteps T = tau_S > ... > tau_1 > tau_0 = 0
(tau_k = floor(k T / S)) and a step from tau_k to tau_{k-1} unmasks each still-masked position
with probability (tau_k - tau_{k-1}) / tau_k: the paper's p(z_{t-k} | z_t) ("Fast Sampling", sec.
3.1). ``fixed`` reveals a scheduled *number* of positions per step in a random order (the
reverse of the ``masking: fixed`` forward process): exactly ``steps`` forwards, but eq. 6 is not
a bound on its NLL (docs/priors.md).

The authors' ``sample`` with ``sample_steps`` S runs t = S, ..., 1 with probability 1/t, which
gives every step probability 1/S of revealing a given position: the same process as ours when S
divides T (otherwise the strata differ by at most one timestep). Differences from the reference
code, on purpose: inpainting works for any mask (starting at the timestep that the number of
masked positions gives, as the paper's sec. 4.5 describes); the larger-than-training sampler is
parallel (all windows in one batch, the same steps), not one token per step.
An addition: classifier-free guidance (``label_drop`` in training; ``guidance_scale`` and
``guidance_schedule`` at sampling; :mod:`genfw.nn.guidance`).
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
    GuidanceSchedule,
    check_guidance,
    drop_labels,
    guidance_at,
    guided_logits,
    labels_or_null,
    null_class_for,
)
from genfw.nn.sampling import Windows, categorical, masked_canvas, rand, randint, target_grid, tempered


class Absorbing(Prior):
    """Masked-token diffusion: train to predict masked codes, sample by progressive unmasking."""

    @property
    def nll_kind(self) -> str:  # type: ignore[override]
        """``bound`` with every timestep (Monte Carlo over masks: unbiased for the ELBO);
        ``estimate`` with ``nll_timesteps`` < T (deterministic quadrature: biased, error estimated)."""
        T = self.params.timesteps
        return "bound" if min(self.params.nll_timesteps or T, T) >= T else "estimate"

    @property
    def nll_bounds(self) -> str:
        """What :meth:`nll`'s figure bounds, in words (metrics.json ``nll_bounds``)."""
        T = self.params.timesteps
        return (f"the ELBO (eq. 6) bounds the NLL of the paper's sampler (unmasking: random, steps = T = {T}, "
                "temperature 1); it is not a bound for unmasking: fixed, steps < T or another temperature")

    class Params(Params):
        timesteps: int = Field(256, ge=1, description="T: diffusion steps; at time t each token is masked w.p. t/T")
        masking: Literal["random", "fixed"] = Field("random", description=(
            "'random': each token masked independently with probability t/T; "
            "'fixed': exactly round(t/T * N) tokens masked"))
        loss_type: Literal["elbo", "reweighted_elbo", "mlm"] = Field("reweighted_elbo", description=(
            "'elbo' (eq. 6), 'reweighted_elbo' (eq. 7, weight 1 - t/T as in the authors' code; "
            "the paper writes (T - t + 1)/T) or 'mlm' (mean cross-entropy of masked tokens)"))
        nll_timesteps: int | None = Field(None, ge=1, description=(
            "timesteps used by nll(): None = all T (the authors' evaluation; an unbiased Monte-Carlo "
            "estimate of the ELBO, kind 'bound'); k < T = the midpoints of k equal strata, each "
            "weighted T/k: a deterministic quadrature, cheaper but biased (kind 'estimate', "
            "reported with the difference from a k/2-point quadrature as its error)"))
        label_drop: float = Field(0.0, ge=0, lt=1, description=(
            "probability of training on the null class instead of the label, which enables "
            "classifier-free guidance (0 = off; the backbone then has no null class)"))

    class SamplerParams(BaseParams):
        steps: int = Field(256, ge=1, description=(
            "S <= T denoising steps; S < T skips timesteps (Table 3): 'random' unmasking visits S "
            "evenly spaced timesteps, each step unmasking w.p. (t - t')/t; 'fixed' reveals N/S "
            "positions per step"))
        unmasking: Literal["random", "fixed"] = Field("random", description=(
            "'random': each still-masked position is unmasked w.p. 1/t at timestep t (the paper's "
            "reverse process; the ELBO bounds its NLL at steps = T, temperature 1); 'fixed': a "
            "fixed number of positions per step in `reveal_order` (exactly `steps` forwards; "
            "the ELBO is not a bound on this process's NLL)"))
        temperature: float = Field(1.0, gt=0, description="tau applied to the x0 distribution (FID runs: 0.9)")
        window_stride: int = Field(1, ge=1, description=(
            "stride of the training-size windows when sampling a larger grid (eq. 8; the authors "
            "use 1, i.e. every window)"))
        reveal_order: Literal["random", "raster"] = Field("random", description=(
            "which positions take the earliest reveal steps: 'random' (a new order per sample, "
            "the paper's sampler) or 'raster' (the authors' order for larger-than-training "
            "grids: each new code is next to decided ones, so windows that cannot see each "
            "other do not decide distant regions independently)"))
        guidance_scale: float = Field(1.0, description=(
            "classifier-free guidance s: logits = uncond + s * (cond - uncond); 1 = plain "
            "conditional sampling (needs a model trained with label_drop > 0 otherwise)"))
        guidance_schedule: GuidanceSchedule = Field("constant", description=(
            "how the scale moves over the steps: constant, or from 1 at the start to s at the last "
            "step linearly or along half a cosine"))

    def __init__(self, params: Params | dict | None = None, **construct: Any) -> None:
        super().__init__(params, **construct)  # codebook_size, grid, num_classes, context, backbone
        self.mask_id = self.codebook_size  # the absorbing state: one extra input token, never an output
        # Classifier-free guidance needs a learned "no label" embedding: class index num_classes.
        self.null_class = null_class_for(self.num_classes, self.params.label_drop)
        self.backbone = self.make_backbone(vocab_size=self.codebook_size + 1,
                                           num_classes=self.num_classes + (self.null_class is not None))
        self.last_sample_stats: dict[str, Any] = {}
        self._rows = 0  # backbone rows evaluated by the current sample() call

    # -- helpers ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _mask(self, t: torch.Tensor, shape: tuple[int, ...], masking: str,
              generator: torch.Generator | None) -> torch.Tensor:
        """Which tokens are absorbed at times ``t [B]``: boolean [B, h, w]."""
        b, n = shape[0], math.prod(shape[1:])
        u = rand((b, n), generator, t.device)
        ratio = (t.float() / self.params.timesteps)[:, None]
        if masking == "random":
            masked = u < ratio
        else:  # exactly round(t/T * N) tokens: the smallest u's are masked
            count = (ratio * n).round()
            masked = u.argsort(1).argsort(1) < count
        return masked.view(shape)

    def _masked_ce(self, codes: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor | None,
                   context: list[torch.Tensor] | None) -> torch.Tensor:
        """Cross-entropy (nats) summed over the masked tokens, per sample [B]."""
        x_t = torch.where(masked, torch.full_like(codes, self.mask_id), codes)
        logits = self.backbone(x_t, labels=labels, context=context).float()
        ce = F.cross_entropy(rearrange(logits, "b h w k -> b k h w"), codes, reduction="none")
        return (ce * masked).flatten(1).sum(1)

    def _labels(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        return labels_or_null(labels, n, self.null_class, device)

    def _guided_logits(self, x: torch.Tensor, labels: torch.Tensor | None,
                       context: list[torch.Tensor] | None, guidance: float) -> torch.Tensor:
        """x0 logits [B, h, w, K]; classifier-free guidance mixes cond and null in one doubled batch."""
        self._rows += x.shape[0] * (1 if guidance == 1.0 else 2)
        return guided_logits(self.backbone, x, labels, context, guidance, self.null_class)

    def _probs(self, x: torch.Tensor, labels: torch.Tensor | None, context: list[torch.Tensor] | None,
               temperature: float, windows: Windows | None, guidance: float = 1.0) -> torch.Tensor:
        """x0 distribution [B, H, W, K] at ``temperature`` (window-averaged on big grids)."""
        if windows is None:
            logits = self._guided_logits(x, labels, context, guidance)
            return torch.softmax(logits / temperature, dim=-1)
        n = windows.count
        labels = labels.repeat_interleave(n) if labels is not None else None
        context = [windows.split_coarse(c) for c in context] if context else None
        probs = torch.softmax(self._guided_logits(windows.split(x), labels, context, guidance), dim=-1)
        # eq. 8: average the windows' probabilities at each position, then apply temperature.
        return tempered(windows.merge(probs), temperature)

    # -- the Prior interface -----------------------------------------------------------------

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
             context: list[torch.Tensor] | None = None) -> StepOutput:
        """Mask at a random t ~ U{1..T}, predict x0 at the masked tokens (eq. 6 / eq. 7 / MLM)."""
        b, n, T = codes.shape[0], codes[0].numel(), self.params.timesteps
        t = randint(T, (b,), None, codes.device) + 1
        masked = self._mask(t, tuple(codes.shape), self.params.masking, None)
        labels = drop_labels(self._labels(labels, b, codes.device), self.null_class, self.params.label_drop)
        ce = self._masked_ce(codes, masked, labels, context)  # b, nats summed over masked tokens
        # Normalisations of the authors' code: bits per token over all N tokens; p(t) = 1/T.
        elbo = ce * T / t / (math.log(2) * n)
        if self.params.loss_type == "elbo":
            loss = elbo.mean()
        elif self.params.loss_type == "reweighted_elbo":
            loss = ((1 - t / T) * ce / (math.log(2) * n)).mean()
        else:
            loss = (ce / masked.flatten(1).sum(1).clamp_min(1)).mean()
        count = masked.sum().clamp_min(1)
        logs = {"elbo_bits_per_token": float(elbo.detach().mean()),
                "masked_bits_per_token": float(ce.detach().sum() / count) / math.log(2),
                "masked_fraction": float(masked.float().mean())}
        return StepOutput(losses={"main": loss}, logs=logs)

    def reveal_steps(self, masked: torch.Tensor, sp: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """The step (1..S) at which each masked position of ``masked [B, N]`` is revealed; S + 1
        where nothing is to be revealed.

        ``random`` (the paper's process): a position masked at T is revealed at a time drawn
        uniformly from 1..T, independently of the others (what unmasking w.p. 1/t at each t
        amounts to), and at the step whose interval (tau_{k-1}, tau_k] holds that time; a sample
        with only M of N positions masked (inpainting) starts at t0 = round(T M / N) instead,
        times uniform on 1..t0, so steps above t0 reveal nothing for it. ``fixed``:
        round(N (S - s) / S) positions are still masked after step s; a sample with fewer masked
        positions (inpainting) joins when the schedule drops below its count. ``reveal_order``
        decides which positions take the earliest steps: a uniformly random permutation (so
        ``random`` keeps independent reveal times) or raster order.
        """
        b, total = masked.shape
        device, S, T = masked.device, sp.steps, self.params.timesteps
        count = masked.sum(1)  # M per sample
        # Rank 0 is revealed first; positions not to be revealed rank last.
        if sp.reveal_order == "random":
            keys = rand((b, total), generator, device)
        else:
            keys = torch.linspace(0, 1, total, device=device).expand(b, total)
        rank = keys.masked_fill(~masked, 2.0).argsort(1).argsort(1)
        if sp.unmasking == "fixed":
            schedule = torch.tensor([round(total * (S - s) / S) for s in range(S + 1)], device=device)
            after = count[:, None] - torch.minimum(count[:, None], schedule)  # b, S+1: revealed by step s
            return torch.searchsorted(after.contiguous(), rank, right=True)
        # tau_0 = 0 < tau_1 < ... < tau_S = T; the step from tau_k to tau_{k-1} is step S - k + 1.
        tau = torch.tensor([k * T // S for k in range(1, S + 1)], device=device)
        # Start at t0 = T M / N, "counting the number of masked latents" (the paper's image editing,
        # sec. 4.5); t0 = T unconditionally. From t0 each position is revealed at a time U{1..t0}.
        start = (count * T / total).round().clamp(1, T)[:, None]
        time = (rand((b, total), generator, device) * start).long().clamp_max(start.long() - 1) + 1
        step = S + 1 - (torch.searchsorted(tau, time) + 1)
        step = step.masked_fill(~masked, S + 1).sort(1).values  # b, ascending over the masked
        return step.gather(1, rank)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, context: list[torch.Tensor] | None = None,
               init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, params: Params | None = None,
               grid: tuple[int, int] | None = None, **overrides: Any) -> torch.Tensor:
        """Unmask ``n`` grids in ``steps`` steps from all-masked (or inpaint ``init`` where ``mask``).

        Each masked position gets the step that reveals it before any forward (:meth:`reveal_steps`);
        then each step runs the backbone on the samples that reveal something and draws x0 there.
        Steps where no sample reveals anything are skipped, so ``last_sample_stats['steps']`` can
        be below ``steps``.
        """
        sp = self.sampler_params(params, **overrides)
        if sp.steps > self.params.timesteps:
            raise ValueError(f"steps ({sp.steps}) cannot exceed the prior's timesteps T = {self.params.timesteps}")
        device = self._device()
        target = target_grid(self.grid, grid, init)
        windows = None if target == self.grid else Windows(target, self.grid, (sp.window_stride,) * 2)
        check_guidance(sp.guidance_scale, self.null_class, labels)
        labels = self._labels(labels, n, device)
        context = [c.to(device) for c in context] if context else None

        x = masked_canvas(n, target, self.mask_id, init, mask, device)
        when = self.reveal_steps(rearrange(x == self.mask_id, "b h w -> b (h w)"), sp, generator)

        self._rows, forwards = 0, 0
        for s in range(1, sp.steps + 1):
            reveal = when == s  # b (h w)
            active = reveal.any(1).nonzero().squeeze(1)
            if len(active) == 0:
                continue
            probs = self._probs(x[active], labels[active] if labels is not None else None,
                                [c[active] for c in context] if context else None, sp.temperature, windows,
                                guidance_at(sp.guidance_scale, sp.guidance_schedule, s / sp.steps))
            chosen = reveal[active]
            drawn = categorical(rearrange(probs, "b h w k -> b (h w) k")[chosen], generator)
            flat = rearrange(x[active], "b h w -> b (h w)")
            flat[chosen] = drawn
            x[active] = flat.view(-1, *target)
            forwards += 1
        self.last_sample_stats = {"steps": forwards, "backbone_evaluations": self._rows,
                                  "windows": windows.count if windows else 1}
        return x

    @torch.no_grad()
    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
            context: list[torch.Tensor] | None = None, generator: torch.Generator | None = None) -> NLLOutput:
        """The ELBO (eq. 6) in bits per token: an upper bound on the NLL, or an estimate of it.

        One random masking per timestep t (independent masking w.p. t/T: the forward process
        the ELBO is defined on, whatever ``masking`` trained the model). With all T timesteps
        the result is an unbiased Monte-Carlo estimate of the bound (kind ``bound``). With
        ``nll_timesteps`` k < T it is a midpoint quadrature over k strata, each weighted T/k
        (kind ``estimate``): deterministic in t, so biased by however much the per-t loss
        varies within a stratum; ``error_bits_per_token`` is then its difference from the
        quadrature with k/2 points (2 when k = 1), which usually overstates the error.
        """
        T = self.params.timesteps
        k = min(self.params.nll_timesteps or T, T)
        labels = self._labels(labels, codes.shape[0], codes.device)
        bits = self._quadrature(codes, labels, context, generator, k)
        if k >= T:
            return NLLOutput(bits_per_token=bits, kind="bound")
        coarse = self._quadrature(codes, labels, context, generator, k // 2 if k >= 2 else 2)
        return NLLOutput(bits_per_token=bits, kind="estimate", error_bits_per_token=bits - coarse)

    def _quadrature(self, codes: torch.Tensor, labels: torch.Tensor | None, context: list[torch.Tensor] | None,
                    generator: torch.Generator | None, k: int) -> torch.Tensor:
        """sum over the k strata midpoints t of (T/k) CE_t / t, in bits per token, per sample [B]."""
        T, n = self.params.timesteps, codes[0].numel()
        times = [math.floor((j + 0.5) * T / k) + 1 for j in range(k)]
        total = torch.zeros(codes.shape[0], device=codes.device)
        for t in times:
            tt = torch.full((codes.shape[0],), t, device=codes.device)
            masked = self._mask(tt, tuple(codes.shape), "random", generator)
            total += self._masked_ce(codes, masked, labels, context) / t
        return total * (T / k) / (math.log(2) * n)
