"""Noise schedules beta_1..beta_T and the quantities derived from them (chapters 01 and 02).

Notation (the book's, every chapter): ``t`` runs over 0..T-1 (the paper's t = 1..T shifted by one),
``beta[t]`` is the variance added at step t, ``alpha = 1 - beta`` and
``alpha_bar[t] = prod_{s <= t} alpha[s]``, so that q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
All schedules are computed in float64.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "scaled_linear")


class ScheduleError(ValueError):
    """A schedule outside its valid range (betas must lie strictly inside (0, 1))."""


def check_betas(betas: torch.Tensor) -> torch.Tensor:
    """Validate a schedule: a 1-D, finite tensor with every beta in (0, 1). Returns it as float64."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() == 0:
        raise ScheduleError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ScheduleError("betas contain NaN or infinity")
    lo, hi = betas.min().item(), betas.max().item()
    if lo <= 0.0 or hi >= 1.0:
        raise ScheduleError(f"every beta must lie in (0, 1); this schedule spans [{lo:.3g}, {hi:.3g}]")
    return betas


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM (Ho et al. 2020, Sec. 4): beta rises linearly from 1e-4 to 0.02 over T = 1000 steps.

    For other T the endpoints are usually rescaled by 1000 / T (Nichol & Dhariwal 2021) so that
    alpha_bar_T stays near zero: use :func:`linear_betas_for` for that.
    """
    _check_T(T)
    return check_betas(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))


def linear_betas_for(T: int) -> torch.Tensor:
    """The linear schedule rescaled to T steps: beta from 1e-4 * 1000/T to 0.02 * 1000/T."""
    _check_T(T)
    scale = 1000.0 / T
    return linear_betas(T, 1e-4 * scale, min(0.02 * scale, 0.999))


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent Diffusion / Stable Diffusion: linear in sqrt(beta), beta = linspace(sqrt(b0), sqrt(b1))^2."""
    _check_T(T)
    return check_betas(torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2)


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM eq. 17: f(u) = cos^2( (u + s) / (1 + s) * pi / 2 ), alpha_bar(u) = f(u) / f(0), u = t/T."""
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): beta_t = 1 - alpha_bar(t) / alpha_bar(t-1),
    clipped at ``max_beta`` = 0.999 to avoid the singularity at t = T."""
    _check_T(T)
    if not 0.0 <= s < 1.0:
        raise ScheduleError(f"the cosine offset s must lie in [0, 1), got {s}")
    u = torch.arange(T + 1, dtype=torch.float64) / T
    ab = cosine_alpha_bar(u, s)
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    return check_betas(betas)


def make_betas(name: str, T: int = 1000, **kwargs: float) -> torch.Tensor:
    """A schedule by name: ``linear`` (rescaled to T), ``cosine`` or ``scaled_linear``."""
    if name == "linear":
        return linear_betas(T, **kwargs) if kwargs else linear_betas_for(T)
    if name == "cosine":
        return cosine_betas(T, **kwargs)
    if name == "scaled_linear":
        return scaled_linear_betas(T, **kwargs)
    raise ScheduleError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s=0}^{t} (1 - beta_s)."""
    return torch.cumprod(1.0 - check_betas(betas), dim=0)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of q(x_t | x_0): SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    return alpha_bar / (1.0 - alpha_bar)


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log SNR(t) = log alpha_bar_t - log(1 - alpha_bar_t)."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ScheduleError(f"the number of diffusion steps T must be a positive integer, got {T!r}")
