"""DDIM: sampling a DDPM-trained network in few steps, and inverting it (chapter 03).

Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models". The same network eps_theta, trained
exactly as in DDPM, defines a family of non-Markovian reverse processes indexed by sigma. Over a
subsequence tau_0 < ... < tau_{K-1} of the training steps, write t = tau_i and t-1 for its
predecessor tau_{i-1} (with alpha_bar = 1 before tau_0, i.e. the last step lands on x_0):

    x0_hat = ( x_t - sqrt(1 - alpha_bar_t) eps_hat ) / sqrt(alpha_bar_t)                       (DDIM eq. 9)
    x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat
              + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z,   z ~ N(0, I)      (DDIM eq. 12)
    sigma_t(eta) = eta sqrt( (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) )
                       sqrt( 1 - alpha_bar_t / alpha_bar_{t-1} )                                (DDIM eq. 16)

eta = 0 is DDIM proper: deterministic, an Euler discretisation of an ODE (DDIM eq. 14), which can be
run backwards (:func:`ddim_invert`) to encode an image into its x_T. eta = 1 gives sigma_t^2 =
beta_tilde_t of the respaced process, and the update is then DDPM's ancestral step on that
subsequence with the "fixed_small" variance (``ddpm_sample(model, diffusion.respace(tau), ...)``).

Notation as in :mod:`diffusion_core.process.gaussian` (the DDIM paper writes alpha_t for this book's
alpha_bar_t); the network may predict eps, x0 or v, and a learned-variance network's second half is
ignored (DDIM chooses its own sigma).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..process.gaussian import GaussianDiffusion, randn_like
from ..process.parameterization import x0_eps_from_prediction  # noqa: F401 (re-exported: samplers.ddim is where chapter 03 reads it)
from ..process.respacing import space_timesteps
from ..process.thresholding import ThresholdLike, resolve_threshold


def check_eta(eta: float) -> float:
    """eta must be a finite number >= 0 (0: DDIM, 1: DDPM's variance)."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"eta must be a finite number >= 0 (0: DDIM, 1: DDPM), got {eta!r}")
    return value


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma_t(eta) = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1})
    (DDIM eq. 16). Zero when eta = 0, and zero on a last step that lands on alpha_bar_{t-1} = 1."""
    check_eta(eta)
    return eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)) * math.sqrt(1.0 - alpha_bar_t / alpha_bar_prev)


def ddim_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_bar_prev: float, sigma: float = 0.0,
              z: torch.Tensor | None = None) -> torch.Tensor:
    """One generalised DDIM step (DDIM eq. 12), the three terms as the paper names them:

        x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat                     "predicted x0"
                  + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat   "direction pointing to x_t"
                  + sigma_t z                                       "random noise"
    """
    direction_sq = 1.0 - alpha_bar_prev - sigma**2
    if direction_sq < -1e-12:
        raise ValueError(f"sigma_t = {sigma:.4g} is too large for this step: 1 - alpha_bar_(t-1) - sigma_t^2 = "
                         f"{direction_sq:.3g} < 0 (lower eta)")
    x_prev = math.sqrt(alpha_bar_prev) * x0_hat + math.sqrt(max(direction_sq, 0.0)) * eps_hat
    if z is not None:
        x_prev = x_prev + sigma * z
    return x_prev


def sampling_timesteps(diffusion: GaussianDiffusion, steps: int | None,
                       timesteps: Sequence[int] | torch.Tensor | None = None, spacing: str = "uniform") -> torch.Tensor:
    """The subsequence tau, ascending, (K,) long: ``timesteps`` if given (any order, distinct, in
    0..T-1), else ``space_timesteps(T, steps, spacing)``."""
    if timesteps is None:
        if steps is None:
            raise ValueError("give either steps or timesteps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if steps > diffusion.T:
            raise ValueError(f"steps = {steps} exceeds the process's T = {diffusion.T} steps")
        return space_timesteps(diffusion.T, steps, spacing)
    tau = torch.as_tensor(timesteps).reshape(-1)
    if tau.is_floating_point() or tau.dtype == torch.bool or tau.numel() == 0:
        raise ValueError("timesteps must be a non-empty sequence of integers")
    tau = tau.long().sort().values
    if int(tau[0]) < 0 or int(tau[-1]) >= diffusion.T:
        raise ValueError(f"timesteps must lie in 0..{diffusion.T - 1}, got [{int(tau[0])}, {int(tau[-1])}]")
    if tau.numel() > 1 and not bool((tau[1:] > tau[:-1]).all()):
        raise ValueError("timesteps must be distinct")
    return tau


def _check_common(x: torch.Tensor, keep_every: int | None) -> None:
    if not torch.is_tensor(x) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"expected a float tensor batched as (B, ...), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
        raise ValueError(f"keep_every must be a positive integer or None, got {keep_every!r}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("the starting sample contains NaN or infinity; every step would propagate it")


@torch.no_grad()
def ddim_sample(model: Callable[..., torch.Tensor], diffusion: GaussianDiffusion, x_T: torch.Tensor,
                steps: int | None = 50, eta: float = 0.0, *, timesteps: Sequence[int] | torch.Tensor | None = None,
                spacing: str = "uniform", clip_denoised: bool = True, threshold: ThresholdLike = None,
                generator: torch.Generator | None = None,
                model_kwargs: dict[str, Any] | None = None, progress: bool = True,
                keep_every: int | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate x_0 from x_T (B, ...) in K = ``steps`` DDIM steps (eq. 12) with sigma_t(eta) (eq. 16).

    The subsequence tau is ``timesteps`` if given, else ``space_timesteps(T, steps, spacing)``.
    ``model(x_t, t, **model_kwargs)`` receives the training timestep ``diffusion.model_t(t)``, (B,).
    ``clip_denoised`` clips x0_hat to [-1, 1] and re-derives eps_hat from it, so that with eta = 1
    this is exactly DDPM's step on the subsequence. ``threshold`` (``"none"``, ``"static"``,
    ``"dynamic"``: Imagen's dynamic thresholding, a :class:`~diffusion_core.process.thresholding.Threshold`
    or a callable) replaces ``clip_denoised`` when given, eps_hat re-derived likewise. Noise z is drawn from ``generator`` at every step
    when eta > 0. ``keep_every=k`` also returns [x_T, ..., x_0] (on the CPU) every k steps.
    """
    _check_common(x_T, keep_every)
    tau = sampling_timesteps(diffusion, steps, timesteps, spacing)
    eta = check_eta(eta)
    x0_fn = resolve_threshold(threshold, clip_denoised)
    kw = model_kwargs or {}
    # alpha_bar_t at each tau_i, and alpha_bar_{t-1} at its predecessor (1 before tau_0: land on x_0)
    alpha_bar = diffusion.alpha_bar[tau].tolist()
    alpha_bar_prev = [1.0, *alpha_bar[:-1]]
    model_ts = diffusion.model_t(tau).to(x_T.device)
    x = x_T
    kept = [x.cpu()] if keep_every else []
    for i in tqdm(range(len(alpha_bar) - 1, -1, -1), desc="DDIM sampling", disable=not progress, leave=False):
        a_t, a_prev = alpha_bar[i], alpha_bar_prev[i]
        out = model(x, model_ts[i].expand(x.shape[0]), **kw)
        pred, _ = diffusion.split_output(out, x)  # a learned variance's second half is not used
        x0_hat, eps_hat = x0_eps_from_prediction(pred, x, diffusion.prediction, a_t)
        if x0_fn is not None:  # clip to [-1, 1], or dynamic thresholding (Imagen Sec. 2.3)
            x0_hat = x0_fn(x0_hat)
            # eps_hat = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t), consistent with the clipped x0_hat
            eps_hat = (x - math.sqrt(a_t) * x0_hat) / math.sqrt(1.0 - a_t)
        sigma = ddim_sigma(a_t, a_prev, eta)
        z = randn_like(x, generator) if eta > 0 else None
        # x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z
        x = ddim_step(x0_hat, eps_hat, a_prev, sigma, z)
        if keep_every and i % keep_every == 0:
            kept.append(x.cpu())
    return (x, kept) if keep_every else x


@torch.no_grad()
def ddim_invert(model: Callable[..., torch.Tensor], diffusion: GaussianDiffusion, x0: torch.Tensor,
                steps: int | None = 50, *, timesteps: Sequence[int] | torch.Tensor | None = None,
                spacing: str = "uniform", model_kwargs: dict[str, Any] | None = None, progress: bool = True,
                keep_every: int | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Encode x_0 (B, ...) into x_T by running the eta = 0 update (DDIM eq. 12-13) upwards:

        x_{t+1} = sqrt(alpha_bar_{t+1}) x0_hat(x_t) + sqrt(1 - alpha_bar_{t+1}) eps_hat(x_t)

    over the same subsequence tau that :func:`ddim_sample` would use with these arguments; from x_0
    the first step starts at alpha_bar = 1. eps_hat is the network's output at the step's target
    timestep tau_{i+1} evaluated at the current x (the usual approximation x_{t+1} ~ x_t in the
    implicit update, exact as the steps shrink); x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) /
    sqrt(alpha_bar_t) at the current x's own alpha_bar. No clipping, so that sampling back with
    ``ddim_sample(..., eta=0, clip_denoised=False)`` reconstructs x_0 up to discretisation error.
    """
    _check_common(x0, keep_every)
    tau = sampling_timesteps(diffusion, steps, timesteps, spacing)
    kw = model_kwargs or {}
    alpha_bar = diffusion.alpha_bar[tau].tolist()
    alpha_bar_cur = [1.0, *alpha_bar[:-1]]  # where x is before step i: x_0 (alpha_bar = 1), then tau_0, ...
    model_ts = diffusion.model_t(tau).to(x0.device)
    x = x0
    kept = [x.cpu()] if keep_every else []
    for i in tqdm(range(len(alpha_bar)), desc="DDIM inversion", disable=not progress, leave=False):
        a_cur, a_next = alpha_bar_cur[i], alpha_bar[i]
        out = model(x, model_ts[i].expand(x.shape[0]), **kw)
        pred, _ = diffusion.split_output(out, x)
        _, eps_hat = x0_eps_from_prediction(pred, x, diffusion.prediction, a_next)
        # x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
        x0_hat = (x - math.sqrt(1.0 - a_cur) * eps_hat) / math.sqrt(a_cur)
        # x_{t+1} = sqrt(alpha_bar_{t+1}) x0_hat + sqrt(1 - alpha_bar_{t+1}) eps_hat
        x = ddim_step(x0_hat, eps_hat, a_next)
        if keep_every and (len(alpha_bar) - 1 - i) % keep_every == 0:
            kept.append(x.cpu())
    return (x, kept) if keep_every else x
