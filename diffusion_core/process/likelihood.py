"""Gaussian KL divergences and the discretised Gaussian decoder (DDPM Sec. 3.3), in nats, and the
one estimator of a model's variational bound in bits/dim (:func:`bound_bpd`).

Chapter 01 derives both and scores its models with :func:`bound_bpd`; chapter 02 trains on them and
scores its models with the same function. Divide nats by log(2) and by the number of dimensions to get
bits per dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # gaussian.py imports this module
    from .gaussian import GaussianDiffusion


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


# ------------------------------------------------------------------------------------------------------
# The variational bound of a model, estimated (chapters 01 and 02 both use this one estimator)
# ------------------------------------------------------------------------------------------------------

#: the parts :func:`bound_bpd` splits the bound into (each (B,), they sum to ``total``)
BOUND_PARTS = ("prior", "decoder", "first", "middle", "last")


def _count(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


@torch.no_grad()
def bound_bpd(model: Callable[..., torch.Tensor], diffusion: GaussianDiffusion, x0: torch.Tensor, exact: int,
              strata: int, seed: int = 0, model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The variational bound on -log p(x0) in bits/dim for each image x0 (B, ...) in [-1, 1]:

        L_vlb = L_T + L_0 + L_1 + ... + L_{T-1}      (DDPM eq. 5, the book's 0-based terms)

    with L_T = KL(q(x_T | x_0) || N(0, I)) (``diffusion.prior_bpd``), L_0 = -log p(x_0 | x_1) (the
    discretised decoder) and L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (``diffusion.vb_terms_bpd``).
    ``model(x_t, diffusion.model_t(t), **model_kwargs)`` is the network of any :class:`GaussianDiffusion`,
    run in the caller's precision (no autocast here).

    L_T and the first and last E = ``exact`` terms are computed one by one: the first terms hold most
    of the bound, and the last can be large with a clipped schedule. The t in E..T-E-1 are split into
    ``strata`` equal runs of integers [a, b); each image draws its own t uniformly in each run and adds
    (b - a) L_t, an unbiased estimate of that run's sum. Because every image draws its own timesteps,
    the spread over images includes the spread over timesteps, so the standard error over images is
    the estimate's whole standard error. ``exact >= (T + 1) / 2`` sums every term (then ``strata`` is
    ignored). The same ``seed`` gives every model the same timesteps and noise, so differences between
    models are paired.

    Returns (B,) float64 tensors on the CPU: ``total`` and its parts (:data:`BOUND_PARTS`) ``prior``
    (L_T), ``decoder`` (L_0), ``first`` (L_1 .. L_{E-1}), ``middle`` and ``last`` (L_{T-E} .. L_{T-1});
    also ``final_step``, L_{T-1} alone.
    """
    if x0.ndim < 2 or x0.shape[0] == 0 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a non-empty float batch, (B, ...), got shape {tuple(x0.shape)} {x0.dtype}")
    exact, strata = _count("exact", exact), _count("strata", strata)
    lo, hi = float(x0.min()), float(x0.max())
    if not (-1.0 - 1e-6 <= lo and hi <= 1.0 + 1e-6):  # NaN fails too
        raise ValueError(f"x0 must be data in [-1, 1] (the discretised decoder's bins), got values in "
                         f"[{lo:.4g}, {hi:.4g}]; map images in [0, 1] with 2 x - 1")
    T, B, dev = diffusion.T, x0.shape[0], x0.device
    if exact < 1:
        raise ValueError(f"exact must be at least 1 (the decoder L_0 is always computed), got {exact}")
    exact = min(exact, (T + 1) // 2)
    inner = T - 2 * exact                                    # terms left to the strata
    if inner > 0 and not 1 <= strata <= inner:
        raise ValueError(f"strata must lie in 1..{inner} to cover t = {exact}..{T - exact - 1}, got {strata}")
    g = torch.Generator().manual_seed(seed)
    kw = model_kwargs or {}

    def term(t: torch.Tensor) -> torch.Tensor:
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(dev))
        return diffusion.vb_terms_bpd(model(xt, diffusion.model_t(t), **kw), x0, xt, t).double().cpu()

    def exact_terms(ts: range) -> list[torch.Tensor]:
        return [term(torch.full((B,), t, device=dev, dtype=torch.long)) for t in ts]

    zero = torch.zeros(B, dtype=torch.float64)
    head = exact_terms(range(exact))                         # L_0 .. L_{E-1}
    tail = exact_terms(range(max(exact, T - exact), T))      # L_{T-E} .. L_{T-1}
    middle = zero.clone()
    if inner > 0:
        edges = torch.linspace(exact, T - exact, strata + 1, dtype=torch.float64).round().long().tolist()
        for a, b in zip(edges[:-1], edges[1:]):              # sum_{t=a}^{b-1} L_t ~ (b - a) L_t, t ~ U{a..b-1}
            t = torch.randint(a, b, (B,), generator=g).to(dev)
            middle = middle + (b - a) * term(t)
    parts = {"prior": diffusion.prior_bpd(x0).double().cpu(), "decoder": head[0],
             "first": sum(head[1:], zero), "middle": middle, "last": sum(tail, zero)}
    return {"total": sum(parts.values(), zero), **parts, "final_step": tail[-1] if tail else head[-1]}
