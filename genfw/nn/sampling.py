"""Sampling helpers shared by the priors: seeded draws, categorical sampling, logit filters, and
the window aggregation of Unleashing Transformers section 3.3 (eq. 8) for grids larger than the
training grid.

Random draws are made on the generator's device and then moved to the model's device, so one
seeded ``torch.Generator`` reproduces the same samples whichever device holds the model (and a
CPU generator works with a CUDA model). Without a generator the global RNG of ``device`` is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 draws of ``shape`` from ``generator``, placed on ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, high) of ``shape`` from ``generator``, placed on ``device``."""
    where = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=where).to(device)


def categorical(probs: torch.Tensor, generator: torch.Generator | None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of ``probs [..., K]`` (unnormalised is fine) by inverting the CDF.

    One uniform number per draw, so the random stream consumed depends only on the number of
    draws, never on the values: two code paths that compute the same probabilities (cached and
    uncached decoding) draw the same tokens from the same seed. ``uniform`` (``probs.shape[:-1]``,
    in [0, 1)) supplies those numbers instead of ``generator``.
    """
    cdf = probs.float().cumsum(-1)
    if uniform is None:
        uniform = rand(tuple(probs.shape[:-1]), generator, probs.device)
    u = uniform.to(probs.device)[..., None] * cdf[..., -1:]
    # side="right": the first index whose CDF exceeds u, which never has zero probability.
    index = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    return index.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)``: temperature applied to probabilities (e.g. averaged ones)."""
    if temperature == 1.0:
        return probs
    return torch.softmax(probs.clamp_min(1e-30).log() / temperature, dim=-1)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and the smallest set with probability >= ``top_p``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# --------------------------------------------------------------------------------------------
# windows (Unleashing Transformers eq. 8)


def _origins(size: int, window: int, stride: int) -> torch.Tensor:
    """Window starts covering ``size``: 0, stride, 2*stride, ... plus the last full window."""
    if window > size:
        raise ValueError(f"window {window} is larger than the grid {size}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return torch.tensor(starts)


def _ranges(rows: torch.Tensor, cols: torch.Tensor, window: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    r = rows[:, None] + torch.arange(window[0])  # [nh, h]
    c = cols[:, None] + torch.arange(window[1])  # [nw, w]
    return r.to(device), c.to(device)


def _cut(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    r, c = _ranges(rows, cols, window, x.device)
    windows = x[:, r[:, None, :, None], c[None, :, None, :]]  # b nh nw h w ...
    return rearrange(windows, "b nh nw h w ... -> (b nh nw) h w ...")


def target_grid(train_grid: tuple[int, int], grid=None, init: torch.Tensor | None = None) -> tuple[int, int]:
    """The grid to sample: ``init``'s, else ``grid``, else the training grid; never smaller."""
    target = tuple(init.shape[1:]) if init is not None else tuple(grid) if grid is not None else tuple(train_grid)
    if len(target) != 2 or target[0] < train_grid[0] or target[1] < train_grid[1]:
        raise ValueError(f"cannot sample a {target} grid with a prior trained on {tuple(train_grid)}: "
                         f"grids must be at least the training grid")
    return int(target[0]), int(target[1])



def masked_canvas(n: int, target: tuple[int, int], mask_id: int, init: torch.Tensor | None,
                  mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The grids [n, h, w] a masked-token sampler starts from: all ``mask_id``, or inpainting
    ``init`` with ``mask_id`` where ``mask`` is set (everywhere when ``mask`` is None)."""
    x = torch.full((n, *target), mask_id, dtype=torch.long, device=device)
    if init is None:
        return x
    mask = torch.ones_like(init, dtype=torch.bool) if mask is None else mask.to(device).bool()
    return torch.where(mask, x, init.to(device))

@dataclass
class Windows:
    """Training-size windows over a larger grid, all processed as one batch.

    ``split`` cuts every window out of ``[B, H, W, ...]`` into ``[B * n, h, w, ...]``
    (window-major within each sample); ``merge`` averages per-window outputs back onto the grid,
    each position divided by the number of windows that cover it.
    """

    grid: tuple[int, int]  # H, W of the target grid
    window: tuple[int, int]  # h, w of the training grid
    stride: tuple[int, int]

    def __post_init__(self) -> None:
        self.rows = _origins(self.grid[0], self.window[0], self.stride[0])
        self.cols = _origins(self.grid[1], self.window[1], self.stride[1])

    @property
    def count(self) -> int:
        """Number of windows per sample."""
        return len(self.rows) * len(self.cols)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, ...]`` -> ``[B * n, h, w, ...]``, every window of every sample."""
        return _cut(x, self.rows, self.cols, self.window)

    def split_coarse(self, x: torch.Tensor) -> torch.Tensor:
        """Cut the matching windows out of a coarser grid ``[B, Hc, Wc]`` (a hierarchy's context).

        The coarse grid must tile the target grid by an integer factor, and every window origin
        must fall on a coarse cell boundary.
        """
        _, hc, wc = x.shape
        (H, W), (h, w) = self.grid, self.window
        fh, fw = H // max(hc, 1), W // max(wc, 1)
        if not fh or not fw or hc * fh != H or wc * fw != W:
            raise ValueError(f"context grid {hc}x{wc} does not tile the target grid {H}x{W}")
        if (self.rows % fh).any() or (self.cols % fw).any() or h % fh or w % fw:
            raise ValueError(f"window origins must fall on context cells: use a window_stride that is "
                             f"a multiple of {max(fh, fw)} with this hierarchy")
        return _cut(x, self.rows // fh, self.cols // fw, (h // fh, w // fw))

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """``[B * n, h, w, K]`` -> ``[B, H, W, K]``, the mean over the windows covering each cell."""
        H, W = self.grid
        nh, nw = len(self.rows), len(self.cols)
        y = rearrange(y, "(b nh nw) h w k -> b (nh nw h w) k", nh=nh, nw=nw)
        r, c = _ranges(self.rows, self.cols, self.window, y.device)
        flat = (r[:, None, :, None] * W + c[None, :, None, :]).flatten()  # [(nh nw h w)]
        total = y.new_zeros(y.shape[0], H * W, y.shape[-1]).index_add_(1, flat, y)
        count = torch.bincount(flat, minlength=H * W).to(y.dtype)
        return rearrange(total / count[None, :, None], "b (h w) k -> b h w k", h=H)
