"""Prior metrics: held-out negative log-likelihood in bits per token, with its kind.

The kind is exact, bound or estimate; SUNDAE's denoising loss is named as not a likelihood and
never appears under an NLL key (:func:`nll_value_key`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from genfw.errors import DataError
from genfw.interfaces import Prior
from genfw.metrics.base import _eval_mode, _module_device

#: What each likelihood kind means, as reports and comparison tables say it.
NLL_KIND_LABELS = {
    "exact": "exact NLL",
    "bound": "NLL upper bound (ELBO, Monte Carlo)",
    "estimate": "NLL estimate (quadrature of the ELBO; error column)",
    "not_likelihood": "denoising cross-entropy (not a likelihood)",
}


def nll_value_key(kind: str) -> str:
    """The metrics key of a prior's held-out value of this kind: only likelihoods are ``nll_*``."""
    return "denoising_ce_bits_per_token" if kind == "not_likelihood" else "nll_bits_per_token"


@torch.no_grad()
def prior_nll(prior: Prior, batches: Iterable[dict[str, Any]], generator: torch.Generator | None = None,
              device: str | torch.device | None = None) -> dict[str, Any]:
    """A prior's mean held-out value in bits per token over every sample the batches yield.

    Each batch is a dict with ``codes`` [B, h, w], optional ``labels`` [B] and ``context``
    (coarser code grids), as :meth:`genfw.interfaces.Prior.nll` takes. ``nll_kind`` says what
    the value is (``exact``, ``bound``, ``estimate`` or ``not_likelihood``, see
    :data:`genfw.interfaces.NLLKind`); the value's key is ``nll_bits_per_token`` for the first
    three and ``denoising_ce_bits_per_token`` for the last, so a loss that is not a likelihood
    never appears under an NLL name. An ``estimate`` also gets ``nll_error_bits_per_token``; a
    prior with an ``nll_bounds`` sentence (which sampling process the bound is for) gets it too.
    """
    device = torch.device(device) if device is not None else _module_device(prior)
    values, errors = [], []
    kind = prior.nll_kind
    with _eval_mode(prior):
        for batch in batches:
            labels = batch.get("labels")
            context = batch.get("context")
            result = prior.nll(
                batch["codes"].to(device),
                labels.to(device) if labels is not None else None,
                [c.to(device) for c in context] if context else None,
                generator=generator,
            )
            values.append(result.bits_per_token.detach().double().cpu())
            if result.error_bits_per_token is not None:
                errors.append(result.error_bits_per_token.detach().double().cpu())
            kind = result.kind
    if not values:
        raise DataError("no held-out codes to evaluate the prior's likelihood on (latents.holdout is 0?)")
    if kind not in NLL_KIND_LABELS:
        raise ValueError(f"{type(prior).__name__}.nll returned kind {kind!r}; "
                         f"expected one of {', '.join(NLL_KIND_LABELS)}")
    bits = torch.cat(values)
    key = nll_value_key(kind)
    out = {
        key: float(bits.mean()),
        # standard error of the mean: how far another held-out draw could move the number
        f"{key}_sem": float(bits.std() / math.sqrt(bits.numel())) if bits.numel() > 1 else 0.0,
        "nll_kind": kind,
        "num_samples": int(bits.numel()),
    }
    if kind == "estimate" and errors:
        out["nll_error_bits_per_token"] = float(torch.cat(errors).mean().abs())
    bounds = getattr(prior, "nll_bounds", None)  # optional: which sampling process a bound is for
    if isinstance(bounds, str) and bounds:
        out["nll_bounds"] = bounds
    return out
