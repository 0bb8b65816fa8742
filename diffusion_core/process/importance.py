"""Importance-sampled timesteps for training on the bound L_vlb (chapter 02, Improved DDPM Sec. 3.3).

Training on L_vlb = sum_t L_t by drawing one t uniformly is unbiased but noisy: the terms differ by
orders of magnitude (the first few dominate), so the one-sample estimate T * L_t varies wildly from
batch to batch. Nichol & Dhariwal (2021, eq. 18) draw t with probability p_t instead, weighting
the term by 1 / p_t:

    L_vlb = E_{t ~ p_t} [ L_t / p_t ],     p_t  proportional to  sqrt( E[L_t^2] ),   sum_t p_t = 1

E[L_t^2] is estimated from a history of the last 10 values of each term, updated during training;
until every t has 10, t is drawn uniformly. We also mix in a little of the uniform distribution,

    p_t <- (1 - u) p_t + u / T,     u = 1e-3,

so that no t ever gets p_t = 0 (then its weight would be unbounded and its history would never be
refreshed); the paper's released code makes the same choice with the same u.

In this book's scaling (``GaussianDiffusion.training_losses`` returns T * L_t for ``loss="vlb"``),
the weight returned with each t is w_t = 1 / (T p_t), which is 1 under the uniform distribution:

    t, w = sampler.sample(B, generator)
    terms = diffusion.training_losses(model, x0, t=t, loss="vlb")
    (w * terms["loss"]).mean().backward()          # an unbiased estimate of L_vlb
    sampler.update(t, terms["loss"])
"""

from __future__ import annotations

import torch


class UniformSampler:
    """t ~ Uniform{0..T-1} with weights 1, behind the same interface as :class:`ImportanceSampler`."""

    def __init__(self, T: int):
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        self.T = T

    def probs(self) -> torch.Tensor:
        """p_t = 1 / T, (T,) float64."""
        return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(t, w): t (batch,) long drawn from ``probs()``; w (batch,) float32 = 1 / (T p_t)."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        p = self.probs()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        w = 1.0 / (self.T * p[t])
        return t.to(device), w.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Nothing to learn for the uniform sampler."""


class ImportanceSampler(UniformSampler):
    """Improved DDPM's loss-aware sampler: p_t proportional to sqrt(E[L_t^2]) over the last ``history``
    values of each L_t, mixed with ``uniform_mix`` of the uniform distribution (module docstring)."""

    def __init__(self, T: int, history: int = 10, uniform_mix: float = 1e-3):
        super().__init__(T)
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        if not 0.0 < uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must lie in (0, 1] so that every p_t > 0, got {uniform_mix}")
        self.history = history
        self.uniform_mix = uniform_mix
        self.losses = torch.zeros(T, history, dtype=torch.float64)  # a ring buffer of L_t per t
        self.counts = torch.zeros(T, dtype=torch.long)               # values seen per t

    @property
    def warmed_up(self) -> bool:
        """Whether every t has a full history (before that, t is drawn uniformly)."""
        return bool((self.counts >= self.history).all())

    def probs(self) -> torch.Tensor:
        """p_t, (T,) float64: uniform until warmed up, then (1 - u) sqrt(E[L_t^2]) / sum + u / T."""
        if not self.warmed_up:
            return super().probs()
        # p_t proportional to sqrt( E[L_t^2] ), the mean over the last `history` values   (Improved DDPM eq. 18)
        rms = self.losses.square().mean(dim=1).sqrt()
        total = rms.sum()
        if not total > 0:  # every recorded loss is zero: nothing to prefer
            return super().probs()
        p = rms / total
        # p_t <- (1 - u) p_t + u / T: every t keeps a little probability
        return (1.0 - self.uniform_mix) * p + self.uniform_mix / self.T

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record L_t for each sample: ``t`` (B,) integers in 0..T-1, ``losses`` (B,) (detached here)."""
        t = torch.as_tensor(t).detach().cpu().reshape(-1)
        losses = torch.as_tensor(losses).detach().cpu().to(torch.float64).reshape(-1)
        if t.is_floating_point():
            raise TypeError("t must hold integer timesteps")
        if t.shape != losses.shape:
            raise ValueError(f"t and losses must have one value per sample, got {tuple(t.shape)} and {tuple(losses.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"timesteps must lie in 0..{self.T - 1}, got [{int(t.min())}, {int(t.max())}]")
        if not torch.isfinite(losses).all():
            raise ValueError("losses contain NaN or infinity; refusing to record them")
        for ti, li in zip(t.tolist(), losses.tolist()):
            # the oldest value is overwritten once the history is full
            self.losses[ti, self.counts[ti] % self.history] = li
            self.counts[ti] += 1
