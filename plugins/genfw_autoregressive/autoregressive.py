"""Autoregressive prior: raster-order next-code prediction on a causal backbone.

The baseline of Unleashing Transformers (papers/002, Table 4: the same transformer, causal) and
the prior family of VQ-VAE-2 (papers/004, section 3.2: one autoregressive prior per level, each
lower level conditioned on the codes above it, sampled top-down). Input is the grid shifted by
one in raster order behind a start token (id = codebook size), so position i predicts code i
from codes 0..i-1, the class label and any coarser levels; the NLL is exact.

Sampling feeds one token per step through the backbone's key/value cache; ``use_cache=False``
recomputes the whole prefix each step instead (the reference for equivalence tests and speed
benchmarks). Both paths draw exactly the same random numbers, so a seed gives the same codes.
Classifier-free guidance (``label_drop``, ``guidance_scale``, ``guidance_schedule``;
:mod:`genfw.nn.guidance`) runs the conditional and null-class sequences as one doubled batch,
with one cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field

from genfw.errors import ConfigError
from genfw.interfaces import NLLOutput, Params, Prior, StepOutput
from genfw.interfaces import Params as BaseParams  # the nested Params below shadows it in class bodies
from genfw.nn.guidance import (
    GuidanceSchedule,
    check_guidance,
    drop_labels,
    guidance_at,
    labels_or_null,
    null_class_for,
)
from genfw.nn.sampling import categorical, filter_logits


class Autoregressive(Prior):
    """p(z) = prod_i p(z_i | z_<i, label, coarser levels) in raster order, exact likelihood.

    Inpainting regenerates the masked positions in raster order and teacher-forces the others:
    each masked code is conditioned on everything *before* it (given or regenerated), but not
    on the known codes after it: causal order cannot see them. Bidirectional priors (sundae,
    absorbing) use the whole context.
    """

    needs_causal = True
    nll_kind = "exact"

    class Params(Params):
        """The architecture lives in the backbone's params."""

        label_drop: float = Field(0.0, ge=0, lt=1, description=(
            "probability of training on the null class instead of the label, which enables "
            "classifier-free guidance (0 = off; the backbone then has no null class)"))

    class SamplerParams(BaseParams):
        temperature: float = Field(1.0, gt=0, description="logits are divided by this before sampling")
        top_k: int | None = Field(None, ge=1, description="sample only among the k most likely codes (None = all)")
        top_p: float | None = Field(None, gt=0, le=1, description=(
            "nucleus sampling: the smallest set of codes with probability >= top_p (None = all)"))
        use_cache: bool = Field(True, description=(
            "decode one token per step with the key/value cache; False recomputes the prefix "
            "each step (same samples, quadratic cost)"))
        guidance_scale: float = Field(1.0, description=(
            "classifier-free guidance s: logits = uncond + s * (cond - uncond); 1 = plain "
            "conditional sampling (needs a model trained with label_drop > 0 otherwise)"))
        guidance_schedule: GuidanceSchedule = Field("constant", description=(
            "how the scale moves over the positions: constant, or from 1 at the first to s at the "
            "last position linearly or along half a cosine"))

    def __init__(self, params: Params | dict | None = None, **construct: Any) -> None:
        super().__init__(params, **construct)  # codebook_size, grid, num_classes, context, backbone
        self.start_id = self.codebook_size
        # Classifier-free guidance needs a learned "no label" embedding: class index num_classes.
        self.null_class = null_class_for(self.num_classes, self.params.label_drop)
        self.backbone = self.make_backbone(vocab_size=self.codebook_size + 1,
                                           num_classes=self.num_classes + (self.null_class is not None))
        if not self.backbone.supports_causal:
            why = type(self.backbone).causal_unsupported_reason
            raise ConfigError(f"the autoregressive prior needs a causal backbone; '{self.construct['backbone']['name']}' "
                              f"cannot be causal" + (f" ({why})" if why else ""))
        self.last_sample_stats: dict[str, Any] = {}

    def _labels(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        return labels_or_null(labels, n, self.null_class, device)

    def _shifted(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, h, w] -> the input grid [start, z_0, ..., z_{N-2}] in raster order."""
        flat = rearrange(codes, "b h w -> b (h w)")
        start = torch.full_like(flat[:, :1], self.start_id)
        return torch.cat([start, flat[:, :-1]], 1).view_as(codes)

    def _token_ce(self, codes: torch.Tensor, labels: torch.Tensor | None,
                  context: list[torch.Tensor] | None) -> torch.Tensor:
        """Per-token cross-entropy (nats) [B, N] of the causal predictions."""
        logits = self.backbone(self._shifted(codes), labels=labels, context=context, causal=True).float()
        return F.cross_entropy(rearrange(logits, "b h w k -> b k (h w)"),
                               rearrange(codes, "b h w -> b (h w)"), reduction="none")

    # -- the Prior interface -----------------------------------------------------------------

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
             context: list[torch.Tensor] | None = None) -> StepOutput:
        """Mean next-token cross-entropy."""
        labels = drop_labels(self._labels(labels, codes.shape[0], codes.device), self.null_class,
                             self.params.label_drop)
        ce = self._token_ce(codes, labels, context)
        loss = ce.mean()
        return StepOutput(losses={"main": loss}, logs={"bits_per_token": float(loss.detach()) / math.log(2)})

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, context: list[torch.Tensor] | None = None,
               init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, params: Params | None = None,
               grid: tuple[int, int] | None = None, **overrides: Any) -> torch.Tensor:
        """Draw codes one position at a time in raster order (see the class docstring for
        what inpainting conditions on)."""
        sp = self.sampler_params(params, **overrides)
        target = tuple(init.shape[1:]) if init is not None else tuple(grid) if grid is not None else self.grid
        if tuple(target) != self.grid:
            raise ValueError(f"the autoregressive prior samples its training grid {self.grid} only, not {target}")
        device = next(self.parameters()).device
        h, w = self.grid
        total = h * w
        check_guidance(sp.guidance_scale, self.null_class, labels)
        labels = self._labels(labels, n, device)
        context = [c.to(device) for c in context] if context else None
        guided = sp.guidance_scale != 1.0
        rows = 2 * n if guided else n  # guidance: conditional rows, then the same with the null class
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
            context = [torch.cat([c, c]) for c in context] if context else None
        out = torch.zeros(n, total, dtype=torch.long, device=device)
        regenerate = torch.ones(n, total, dtype=torch.bool, device=device)
        if init is not None:
            out = rearrange(init.to(device), "b h w -> b (h w)").clone()
            if mask is not None:
                regenerate = rearrange(mask.to(device).bool(), "b h w -> b (h w)")
        # Positions no sample regenerates need no draw (and, uncached, no forward).
        todo = regenerate.any(0).tolist()

        def draw(logits: torch.Tensor, i: int) -> None:
            if guided:
                cond, uncond = logits.float().chunk(2)
                logits = uncond + guidance_at(sp.guidance_scale, sp.guidance_schedule, (i + 1) / total) * (cond - uncond)
            logits = filter_logits(logits.float() / sp.temperature, sp.top_k, sp.top_p)
            token = categorical(torch.softmax(logits, dim=-1), generator)
            out[:, i] = torch.where(regenerate[:, i], token, out[:, i])

        forwards = 0
        if sp.use_cache:
            cache = self.backbone.init_cache(rows, device, self._cache_dtype())
            previous = torch.full((rows,), self.start_id, dtype=torch.long, device=device)
            for i in range(total):
                logits = self.backbone.decode_step(previous, i, cache, labels=labels, context=context)
                forwards += 1
                if todo[i]:
                    draw(logits, i)
                previous = out[:, i].repeat(rows // n)
        else:
            for i in range(total):
                if not todo[i]:
                    continue
                tokens = self._shifted(out.view(n, h, w)).repeat(rows // n, 1, 1)
                logits = self.backbone(tokens, labels=labels, context=context, causal=True)
                forwards += 1
                draw(rearrange(logits, "b h w k -> b (h w) k")[:, i], i)
        self.last_sample_stats = {"steps": forwards, "backbone_evaluations": forwards * rows}
        return out.view(n, h, w)

    def _cache_dtype(self) -> torch.dtype:
        """The dtype keys and values are computed in: autocast's when active, else the weights'."""
        param = next(self.parameters())
        if param.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(param.device.type):
            return torch.get_autocast_dtype(param.device.type)
        return param.dtype

    @torch.no_grad()
    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
            context: list[torch.Tensor] | None = None, generator: torch.Generator | None = None) -> NLLOutput:
        """Exact -log2 p(codes) / N per sample (no randomness: ``generator`` is unused)."""
        ce = self._token_ce(codes, self._labels(labels, codes.shape[0], codes.device), context)
        return NLLOutput(bits_per_token=ce.sum(1) / ce.shape[1] / math.log(2), kind="exact")
