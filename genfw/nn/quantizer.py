"""Vector quantization with the straight-through estimator (van den Oord et al. 2017; VQ-VAE-2,
Razavi et al. 2019, sec. 2.1).

The loss is VQ-VAE-2 eq. 2 without its reconstruction term::

    ||sg[E(x)] - e||^2  +  beta * ||E(x) - sg[e]||^2      (codebook term, commitment term)

with beta = 0.25 on the commitment (encoder) side. taming-transformers puts beta on the codebook
term instead; ``legacy_beta=True`` reproduces that for loading and comparing its models.
With ``ema=True`` the codebook follows exponential moving averages of the encoder outputs
assigned to each code (VQ-VAE-2 sec. 2.1, gamma = 0.99, Laplace-smoothed counts) and the
codebook term is dropped; under ``torch.distributed`` the statistics are summed over ranks.

Codebook health: optional k-means initialisation from the first training batch, dead-code
restart (codes unused for ``restart_after`` training steps are re-seeded from the current
batch's encoder outputs), and per-step statistics (perplexity, fraction used, dead codes).
Nearest-codeword search always runs in fp32, even under autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as td
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn

from genfw.interfaces import Params

#: Codes unused for this many training steps count as dead in the statistics when no
#: ``restart_after`` is set (with restart, "dead" means "due for restart").
DEFAULT_DEAD_AFTER = 256


class QuantizerParams(Params):
    """Quantizer fields shared by every VQ tokenizer's ``Params``."""

    codebook_size: int = Field(512, ge=2, description="K: number of codewords")
    embed_dim: int = Field(64, ge=1, description="D: dimension of each codeword")
    commitment_beta: float = Field(0.25, ge=0, description="beta on the commitment term (VQ-VAE-2 eq. 2)")
    legacy_beta: bool = Field(False, description="taming-transformers' placement: beta on the codebook term")
    ema: bool = Field(True, description="EMA codebook updates (VQ-VAE-2 sec. 2.1) instead of the codebook loss")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="gamma of the EMA codebook")
    ema_eps: float = Field(1e-5, gt=0, description="Laplace smoothing of the EMA code counts")
    kmeans_init: bool = Field(False, description="initialise the codebook by k-means on the first batch")
    kmeans_iters: int = Field(10, ge=1, description="Lloyd iterations of the k-means initialisation")
    restart_after: int | None = Field(
        None, ge=1, description="re-seed codes unused for this many training steps (None: never)"
    )


class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns."""

    quantized: torch.Tensor  # like the input, straight-through gradients to it
    codes: torch.Tensor  # long, the input's shape without the channel axis
    loss: torch.Tensor  # scalar: codebook term (unless EMA) + commitment term
    stats: dict[str, torch.Tensor]  # detached scalars: perplexity, usage, dead_codes


def _distributed() -> bool:
    return td.is_available() and td.is_initialized()


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows of ``x`` [N, D] (fp32): (centroids [k, D], counts [k]).

    Starts from k random rows (with repetition when N < k); an empty cluster keeps its centroid.
    """
    n = x.shape[0]
    idx = (torch.randperm(n, generator=generator, device="cpu")[:k] if n >= k
           else torch.randint(0, n, (k,), generator=generator, device="cpu")).to(x.device)
    centroids = x[idx].clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, counts


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantizer over the channel axis of ``[B, D, *spatial]`` inputs.

    The codebook is ``self.embedding`` (an ``nn.Embedding``, the name taming-transformers uses),
    trained by gradient unless ``ema`` is set. Buffers: ``unused_steps`` (per code, training
    steps since last use), and with ``ema`` the moving averages ``ema_count``/``ema_sum``.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        commitment_beta: float = 0.25,  # beta of VQ-VAE-2 eq. 2, on the encoder side
        legacy_beta: bool = False,  # taming's placement: beta on the codebook term
        ema: bool = False,  # codebook by moving averages instead of the codebook loss
        ema_decay: float = 0.99,  # gamma
        ema_eps: float = 1e-5,  # Laplace smoothing of counts
        kmeans_init: bool = False,  # k-means on the first training batch
        kmeans_iters: int = 10,
        restart_after: int | None = None,  # re-seed codes unused this many steps
    ) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_beta, self.legacy_beta = commitment_beta, legacy_beta
        self.ema, self.ema_decay, self.ema_eps = ema, ema_decay, ema_eps
        self.kmeans_iters, self.restart_after = kmeans_iters, restart_after
        self.embedding = nn.Embedding(codebook_size, dim)
        if ema:
            # EMA codebooks start N(0, 1) like the VQ-VAE-2 reimplementations; each code counts
            # as seen once, so an unused code keeps its vector instead of drifting to zero.
            nn.init.normal_(self.embedding.weight)
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", self.embedding.weight.detach().clone())
        else:
            nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # as taming
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(not kmeans_init))

    @classmethod
    def from_params(cls, p: QuantizerParams) -> VectorQuantizer:
        """Build from the shared :class:`QuantizerParams` fields of a tokenizer."""
        return cls(p.codebook_size, p.embed_dim, commitment_beta=p.commitment_beta, legacy_beta=p.legacy_beta,
                   ema=p.ema, ema_decay=p.ema_decay, ema_eps=p.ema_eps, kmeans_init=p.kmeans_init,
                   kmeans_iters=p.kmeans_iters, restart_after=p.restart_after)

    @property
    def dead_after(self) -> int:
        return self.restart_after or DEFAULT_DEAD_AFTER

    # -- lookup ---------------------------------------------------------------------------------

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Codes [N] of the nearest codewords to rows of ``flat`` [N, D], searched in fp32."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            z = flat.float()
            e = self.embedding.weight.float()
            # ||z||^2 - 2 z.e + ||e||^2, without materialising N x K x D
            dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)[None]
            return dist.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, *spatial] -> codewords [B, D, *spatial]."""
        return torch.movedim(self.embedding(codes), -1, 1)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` [B, D, *spatial]; in training mode also update codebook statistics."""
        b, d, *spatial = z.shape
        flat = rearrange(z, "b d ... -> (b ...) d")
        if self.training and not bool(self.initialised):
            self._kmeans_init(flat.detach().float())
        codes = self.nearest(flat)
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = flat.float()
            # The codewords before this step's EMA update, as in Sonnet and the VQ-VAE-2 code.
            e = self.embedding(codes).float()
            codebook_term = F.mse_loss(e, zf.detach())  # moves codewords (unless EMA)
            commitment_term = F.mse_loss(zf, e.detach())  # moves the encoder
            beta = self.commitment_beta
            if self.ema:
                # EMA replaces the codebook term; taming's legacy placement leaves commitment at 1.
                loss = commitment_term * (1.0 if self.legacy_beta else beta)
            elif self.legacy_beta:
                loss = beta * codebook_term + commitment_term
            else:
                loss = codebook_term + beta * commitment_term
        if self.training:
            # Counts summed over ranks, so every rank updates (and restarts) identically.
            global_counts = counts.clone()
            if _distributed():
                td.all_reduce(global_counts)
            with torch.no_grad():
                if self.ema:
                    self._ema_update(zf.detach(), codes, global_counts)
                self.unused_steps.add_(1).masked_fill_(global_counts > 0, 0)
                if self.restart_after is not None:
                    self._restart_dead(zf.detach())
        quantized_flat = flat + (e.to(flat.dtype) - flat).detach()  # straight-through
        quantized = torch.movedim(quantized_flat.reshape(b, *spatial, d), -1, 1)
        codes = codes.reshape(b, *spatial)
        stats = {
            "perplexity": _perplexity(counts).detach(),
            "usage": (counts > 0).float().mean().detach(),
            "dead_codes": (self.unused_steps >= self.dead_after).sum().detach().float(),
        }
        return QuantizerOutput(quantized, codes, loss, stats)

    # -- codebook maintenance -------------------------------------------------------------------

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        centroids, counts = kmeans(flat, self.codebook_size, self.kmeans_iters)
        if _distributed():  # rank 0's clustering for everyone
            td.broadcast(centroids, 0)
            td.broadcast(counts, 0)
        self.embedding.weight.data.copy_(centroids)
        if self.ema:
            self.ema_count.copy_(counts.clamp_min(1))
            self.ema_sum.copy_(centroids * self.ema_count[:, None])
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros(self.codebook_size, self.dim, device=flat.device).index_add_(0, codes, flat)
        if _distributed():
            td.all_reduce(sums)
        gamma = self.ema_decay
        self.ema_count.mul_(gamma).add_(counts, alpha=1 - gamma)
        self.ema_sum.mul_(gamma).add_(sums, alpha=1 - gamma)
        # Laplace smoothing keeps a zero count from dividing by zero; total mass is unchanged.
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.ema_eps) / (total + self.codebook_size * self.ema_eps) * total
        self.embedding.weight.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        dead = (self.unused_steps >= self.restart_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = flat[pick]
        # Several dead codes may draw the same output: a little noise lets them separate.
        fresh = fresh + 0.01 * fresh.std().clamp_min(1e-6) * torch.randn_like(fresh)
        if _distributed():
            td.broadcast(fresh, 0)
        self.embedding.weight.data[dead] = fresh.to(self.embedding.weight.dtype)
        if self.ema:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = fresh
        self.unused_steps[dead] = 0

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """Codebook state from training: dead codes (unused for ``dead_after`` steps) and their fraction."""
        dead = int((self.unused_steps >= self.dead_after).sum())
        return {"dead_codes": float(dead), "dead_fraction": dead / self.codebook_size}


class CodeUsage(nn.Module):
    """Usage bookkeeping for quantizers with an implicit codebook (FSQ, LFQ): the same
    ``perplexity``/``usage``/``dead_codes`` step statistics and :meth:`health` as
    :class:`VectorQuantizer`, so every tokenizer reports its codebook the same way.
    (Nothing restarts a dead implicit code: the statistics only show how the encoder uses them.)
    """

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    @property
    def dead_after(self) -> int:
        return DEFAULT_DEAD_AFTER

    def usage_stats(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Step statistics of ``codes``; in training mode also ages the unused codes."""
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        if self.training:
            global_counts = counts.clone()
            if _distributed():
                td.all_reduce(global_counts)
            with torch.no_grad():
                self.unused_steps.add_(1).masked_fill_(global_counts > 0, 0)
        return {
            "perplexity": _perplexity(counts).detach(),
            "usage": (counts > 0).float().mean().detach(),
            "dead_codes": (self.unused_steps >= self.dead_after).sum().detach().float(),
        }

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """Codes unused for ``dead_after`` training steps and their fraction."""
        dead = int((self.unused_steps >= self.dead_after).sum())
        return {"dead_codes": float(dead), "dead_fraction": dead / self.codebook_size}
