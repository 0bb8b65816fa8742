"""A small denoiser for 2-D toy data (chapter 01): an MLP on (x_t, embedding of t)."""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import timestep_embedding


class ToyMLP(nn.Module):
    """eps_theta(x_t, t) for points x_t of shape (B, D): [x_t, emb(t)] -> hidden layers -> (B, D)."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_dim: int = 32):
        super().__init__()
        self.dim, self.time_dim = dim, time_dim
        mods: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ToyMLP takes points of shape (B, {self.dim}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(torch.cat([x, timestep_embedding(t, self.time_dim)], dim=1))
