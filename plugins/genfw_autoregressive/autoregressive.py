"""Autoregressive prior: raster-order next-code prediction on a causal backbone.

The baseline of Unleashing Transformers (papers/002, Table 4: the same transformer, causal) and
the prior family of VQ-VAE-2 (papers/004, section 3.2: one autoregressive prior per level, each
lower level conditioned on the codes above it, sampled top-down). Input is the grid shifted by
one in raster order behind a start token (id = codebook size), so position i predicts code i
from codes 0..i-1, the class label and any coarser levels; the NLL is exact.

Sampling feeds one token per step through the backbone's key/value cache; ``use_cache=False``
recomputes the whole prefix each step instead (the reference for equivalence tests and speed
benchmarks). Both paths draw exactly the same random numbers, so a seed gives the same codes.
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
        """No options: the architecture lives in the backbone's params."""

    class SamplerParams(BaseParams):
        temperature: float = Field(1.0, gt=0, description="logits are divided by this before sampling")
        top_k: int | None = Field(None, ge=1, description="sample only among the k most likely codes (None = all)")
        top_p: float | None = Field(None, gt=0, le=1, description=(
            "nucleus sampling: the smallest set of codes with probability >= top_p (None = all)"))
        use_cache: bool = Field(True, description=(
            "decode one token per step with the key/value cache; False recomputes the prefix "
            "each step (same samples, quadratic cost)"))

    def __init__(self, params: Params | dict | None = None, **construct: Any) -> None:
        super().__init__(params, **construct)  # codebook_size, grid, num_classes, context, backbone
        self.start_id = self.codebook_size
        self.backbone = self.make_backbone(vocab_size=self.codebook_size + 1)
        if not self.backbone.supports_causal:
            why = type(self.backbone).causal_unsupported_reason
            raise ConfigError(f"the autoregressive prior needs a causal backbone; '{self.construct['backbone']['name']}' "
                              f"cannot be causal" + (f" ({why})" if why else ""))
        self.last_sample_stats: dict[str, Any] = {}

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
        labels = labels.to(device).long() if labels is not None else None
        context = [c.to(device) for c in context] if context else None
        out = torch.zeros(n, total, dtype=torch.long, device=device)
        regenerate = torch.ones(n, total, dtype=torch.bool, device=device)
        if init is not None:
            out = rearrange(init.to(device), "b h w -> b (h w)").clone()
            if mask is not None:
                regenerate = rearrange(mask.to(device).bool(), "b h w -> b (h w)")
        # Positions no sample regenerates need no draw (and, uncached, no forward).
        todo = regenerate.any(0).tolist()

        def draw(logits: torch.Tensor, i: int) -> None:
            logits = filter_logits(logits.float() / sp.temperature, sp.top_k, sp.top_p)
            token = categorical(torch.softmax(logits, dim=-1), generator)
            out[:, i] = torch.where(regenerate[:, i], token, out[:, i])

        forwards = 0
        if sp.use_cache:
            cache = self.backbone.init_cache(n, device, self._cache_dtype())
            previous = torch.full((n,), self.start_id, dtype=torch.long, device=device)
            for i in range(total):
                logits = self.backbone.decode_step(previous, i, cache, labels=labels, context=context)
                forwards += 1
                if todo[i]:
                    draw(logits, i)
                previous = out[:, i]
        else:
            for i in range(total):
                if not todo[i]:
                    continue
                tokens = self._shifted(out.view(n, h, w))
                logits = self.backbone(tokens, labels=labels, context=context, causal=True)
                forwards += 1
                draw(rearrange(logits, "b h w k -> b (h w) k")[:, i], i)
        self.last_sample_stats = {"steps": forwards, "backbone_evaluations": forwards * n}
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
        ce = self._token_ce(codes, labels, context)
        return NLLOutput(bits_per_token=ce.sum(1) / ce.shape[1] / math.log(2), kind="exact")
