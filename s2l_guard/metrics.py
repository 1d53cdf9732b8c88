"""Pure metric functions: image distances and bootstrap intervals.

Tiled normalized L2 follows Carlini et al., "Extracting Training Data from
Diffusion Models" (USENIX Security 2023, sec. 4.2): split both images into a
``grid x grid`` array of tiles, take the root mean squared difference of [0, 1]
pixels in each tile, and keep the largest. ``grid = 1`` is the plain
normalized L2 distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def _tiles(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, grid*grid, C*(H/grid)*(W/grid)]``."""
    n, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"a {grid}x{grid} tile grid does not divide {h}x{w} images; pick a grid that divides the size")
    x = x.reshape(n, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, grid * grid, -1)


def tiled_l2(a: torch.Tensor, b: torch.Tensor, *, grid: int = 1) -> torch.Tensor:
    """Pairwise tiled normalized L2 ``[N, M]`` between image batches in [0, 1]."""
    ta, tb = _tiles(a.double(), grid), _tiles(b.double(), grid)
    pixels = ta.shape[-1]
    # ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y, per tile, for all pairs at once.
    sq = (ta**2).sum(-1)[:, None, :] + (tb**2).sum(-1)[None, :, :] - 2 * torch.einsum("nkp,mkp->nmk", ta, tb)
    return (sq.clamp_min(0) / pixels).sqrt().amax(-1).float()


def nearest(
    queries: torch.Tensor, references: torch.Tensor, *, grid: int = 1, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the distance to and index of its nearest reference image.

    Memory stays bounded by ``chunk x len(references)`` pair distances.
    """
    if len(references) == 0:
        raise ValueError("no reference images to compare with")
    dist, index = [], []
    for i in range(0, len(queries), chunk):
        d = tiled_l2(queries[i : i + chunk], references, grid=grid)
        best = d.min(1)
        dist.append(best.values)
        index.append(best.indices)
    if not dist:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(dist), torch.cat(index)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap 95% interval and its sample count."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


def bootstrap(
    statistic: Callable[..., float], *samples: np.ndarray, resamples: int = 1000, seed: int = 0
) -> Estimate:
    """Percentile bootstrap of ``statistic(*samples)``; each sample is resampled independently."""
    samples = tuple(np.asarray(s, dtype=float) for s in samples)
    rng = np.random.default_rng(seed)
    values = [
        statistic(*(s[rng.integers(0, len(s), len(s))] for s in samples)) for _ in range(resamples)
    ]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return Estimate(float(statistic(*samples)), float(low), float(high), sum(len(s) for s in samples))
