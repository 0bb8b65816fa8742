"""2-D toy distributions (chapter 01): small enough to watch every point diffuse and come back."""

from __future__ import annotations

import math
import numbers

import torch

TOYS = ("moons", "rings", "mixture", "spiral")


def toy2d(name: str, n: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """``n`` points (n, 2) from a named 2-D distribution, scaled to roughly [-1, 1], plus Gaussian
    ``noise`` of that standard deviation (a finite number >= 0)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"toy2d: n must be a positive integer, got {n!r}")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"toy2d: noise must be a finite standard deviation >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    if name == "moons":
        k = torch.randint(0, 2, (n,), generator=g)
        a = torch.rand(n, generator=g) * math.pi
        x = torch.where(k == 0, torch.cos(a), 1 - torch.cos(a))
        y = torch.where(k == 0, torch.sin(a), 0.5 - torch.sin(a))
        pts = torch.stack([x - 0.5, y - 0.25], 1) / 1.2
    elif name == "rings":
        k = torch.randint(0, 2, (n,), generator=g)
        a = torch.rand(n, generator=g) * 2 * math.pi
        r = torch.where(k == 0, 0.4, 0.9)
        pts = torch.stack([r * torch.cos(a), r * torch.sin(a)], 1)
    elif name == "mixture":
        k = torch.randint(0, 8, (n,), generator=g).float()
        a = k * 2 * math.pi / 8
        pts = 0.75 * torch.stack([torch.cos(a), torch.sin(a)], 1)
        noise = max(noise, 0.05)
    elif name == "spiral":
        u = torch.rand(n, generator=g)
        a = 3 * math.pi * u
        pts = 0.85 * torch.stack([u * torch.cos(a), u * torch.sin(a)], 1)
    else:
        raise ValueError(f"unknown toy distribution {name!r}; known: {', '.join(TOYS)}")
    return pts + noise * torch.randn(n, 2, generator=g)
