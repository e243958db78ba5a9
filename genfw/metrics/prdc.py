"""Density and coverage (Naeem et al. 2020), the half of PRDC that torch-fidelity does not compute.

Precision and recall (Kynkaanniemi et al. 2019) come from torch-fidelity in
:mod:`genfw.metrics.fidelity_scores`, on the same features and the same ``k``.
"""

from __future__ import annotations

import torch

from genfw.errors import ConfigError


def _kth_neighbour_distance(x: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    out = [torch.cdist(part, x).kthvalue(k + 1, dim=1).values for part in x.split(chunk)]  # +1: itself
    return torch.cat(out)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5,
                     chunk: int = 4096) -> dict[str, float]:
    """Density and coverage of fake features [M, D] against real features [N, D].

    With r_i the distance from real X_i to its k-th nearest other real point:
    density = 1/(kM) sum_j sum_i 1[|Y_j - X_i| < r_i]; coverage = 1/N sum_i 1[min_j |Y_j - X_i| < r_i].
    Strict inequalities as in Naeem et al.'s reference code: identical sets give exactly 1 and 1.
    """
    real, fake = real.double(), fake.double()
    if real.shape[0] <= k:
        raise ConfigError(f"density/coverage with k={k} need more than {k} reference images, "
                          f"got {real.shape[0]}")
    radii = _kth_neighbour_distance(real, k, chunk)  # [N]
    inside = torch.zeros(fake.shape[0], dtype=torch.float64)  # per fake: how many real balls hold it
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for start in range(0, real.shape[0], chunk):
        d = torch.cdist(real[start : start + chunk], fake)  # [n, M]
        hit = d < radii[start : start + chunk, None]
        inside += hit.sum(0)
        covered[start : start + chunk] = hit.any(1)
    return {"density": float(inside.sum() / (k * fake.shape[0])), "coverage": float(covered.double().mean())}
