"""Gaussian KL divergences and the discretised Gaussian decoder (DDPM Sec. 3.3), in nats.

Chapter 01 derives both; chapter 02 trains on them. Divide by log(2) and by the number of
dimensions to get bits per dimension.
"""

from __future__ import annotations

import math

import torch


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ) elementwise, in nats:

    KL = 1/2 [ -1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2) ].
    Arguments broadcast against each other.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log p(x) of 8-bit data x in [-1, 1] under N(mean, e^(2 log_scale)) integrated over each bin
    (DDPM eq. 13): the bin of x is [x - 1/255, x + 1/255], widened to -inf at x = -1 and +inf at x = 1.

    Uses log Phi (``torch.special.log_ndtr``) so tails stay finite. Returns nats per element.
    """
    if x.shape != mean.shape:
        raise ValueError(f"x and mean must have the same shape, got {tuple(x.shape)} and {tuple(mean.shape)}")
    half_bin = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)              # log Phi(upper): the bin at x = -1
    log_sf_lower = torch.special.log_ndtr(-lower)              # log (1 - Phi(lower)): the bin at x = 1
    # log (Phi(upper) - Phi(lower)), computed as log Phi(upper) + log(1 - Phi(lower)/Phi(upper)),
    # which stays accurate when both CDFs are tiny; the symmetric form serves the upper tail.
    log_cdf_lower = torch.special.log_ndtr(lower)
    mid_left = log_cdf_upper + torch.log(-torch.expm1(log_cdf_lower - log_cdf_upper).clamp(max=-1e-30))
    log_sf_upper = torch.special.log_ndtr(-upper)
    mid_right = log_sf_lower + torch.log(-torch.expm1(log_sf_upper - log_sf_lower).clamp(max=-1e-30))
    middle = torch.where(x - mean < 0, mid_left, mid_right)
    return torch.where(x < -1 + half_bin / 2, log_cdf_upper, torch.where(x > 1 - half_bin / 2, log_sf_lower, middle))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def to_bits_per_dim(nats_per_dim: torch.Tensor) -> torch.Tensor:
    return nats_per_dim / math.log(2.0)
