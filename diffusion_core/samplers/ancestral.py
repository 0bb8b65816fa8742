"""Ancestral sampling, DDPM Algorithm 2 (chapter 01).

    x_T ~ N(0, I)
    for t = T-1, ..., 0:   x <- mu_theta(x, t) + sigma_t z,   z ~ N(0, I) (z = 0 at the last step)

t is the array index, which holds the paper's step t + 1 (chapter 01's notation box): the loop is the
paper's x_{t-1} = mu_theta(x_t, t) + sigma_t z for t = T, ..., 1, and its last step gives x_0.

With a respaced process (``diffusion.respace(...)``, chapter 02) the same loop runs in K steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..process.gaussian import GaussianDiffusion, randn_like
from ..process.thresholding import ThresholdLike, resolve_threshold


def _check_start(x_T: torch.Tensor, keep_every: int | None) -> None:
    """x_T: a finite float tensor (B, ...); keep_every: None or a positive integer."""
    if not torch.is_tensor(x_T) or x_T.ndim < 2 or not x_T.is_floating_point():
        raise ValueError(f"x_T must be a float tensor batched as (B, ...), got "
                         f"{tuple(x_T.shape) if torch.is_tensor(x_T) else type(x_T).__name__}"
                         f"{' of ' + str(x_T.dtype) if torch.is_tensor(x_T) else ''}")
    if keep_every is not None and (not isinstance(keep_every, int) or isinstance(keep_every, bool) or keep_every < 1):
        raise ValueError(f"keep_every must be a positive integer or None, got {keep_every!r}")
    if x_T.numel() and not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T contains NaN or infinity; every step would propagate it")


@torch.no_grad()
def ddpm_sample(model: Callable[..., torch.Tensor], diffusion: GaussianDiffusion, x_T: torch.Tensor, *,
                clip_denoised: bool = True, threshold: ThresholdLike = None, generator: torch.Generator | None = None,
                model_kwargs: dict[str, Any] | None = None, progress: bool = True,
                keep_every: int | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run p(x_{t-1} | x_t) from x_T down to x_0. ``model(x_t, t, **model_kwargs)`` gives the network
    output; ``keep_every=k`` also returns the trajectory [x_T, ..., x_0] every k steps.
    ``clip_denoised`` clips each x0_hat to [-1, 1]; ``threshold`` (``"none"``, ``"static"``,
    ``"dynamic"``, a :class:`~diffusion_core.process.thresholding.Threshold` or a callable) replaces
    it when given (chapter 13).

    The numbers are those of ``diffusion.p_mean_variance`` at each step; its per-step coefficients are
    read once, as Python floats, so the loop itself is only the few elementwise operations below."""
    _check_start(x_T, keep_every)
    x0_fn = resolve_threshold(threshold, clip_denoised)
    d, kw = diffusion, model_kwargs or {}
    # x0_hat = a_t x_t - b_t pred:  eps: 1/sqrt(alpha_bar_t), sqrt(1/alpha_bar_t - 1);  v: sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)
    a, b = ((d.sqrt_alpha_bar, d.sqrt_one_minus_alpha_bar) if d.prediction == "v"
            else (d.sqrt_recip_alpha_bar, d.sqrt_recipm1_alpha_bar))
    a, b, coef1, coef2 = a.tolist(), b.tolist(), d.posterior_mean_coef1.tolist(), d.posterior_mean_coef2.tolist()
    # fixed variances: sigma_t^2 = beta_tilde_t (fixed_small) or beta_t (fixed_large)
    log_var = d.posterior_log_variance_clipped if d.variance == "fixed_small" else d.log_large_variance
    sigma = (0.5 * log_var.to(x_T.dtype)).exp().tolist()  # in x's precision, as p_mean_variance computes it
    log_beta, log_beta_tilde = d.log_betas.tolist(), d.posterior_log_variance_clipped.tolist()
    model_t = d.timestep_map.to(x_T.device)[:, None].expand(d.T, x_T.shape[0])  # row t: the network's t, (B,)
    x = x_T
    kept = [x.cpu()] if keep_every else []
    for t in tqdm(range(d.T - 1, -1, -1), desc="DDPM sampling", disable=not progress, leave=False):
        pred, v = d.split_output(model(x, model_t[t], **kw), x)
        x0 = pred if d.prediction == "x0" else a[t] * x - b[t] * pred
        if x0_fn is not None:  # clip to [-1, 1], or dynamic thresholding (Imagen Sec. 2.3)
            x0 = x0_fn(x0)
        # mu_theta(x_t, t) = mu_tilde_t(x_t, x0_hat) = coef1_t x0_hat + coef2_t x_t   (DDPM eq. 7)
        x = coef1[t] * x0 + coef2[t] * x
        if t > 0:
            sigma_t = sigma[t]
            if v is not None:  # log Sigma = v' log beta_t + (1 - v') log beta_tilde_t, v' = (v + 1) / 2  (Improved DDPM eq. 15)
                frac = (v + 1.0) / 2.0
                sigma_t = (0.5 * (frac * log_beta[t] + (1.0 - frac) * log_beta_tilde[t])).exp()
            # x_{t-1} = mu_theta(x_t, t) + sigma_t z,   z ~ N(0, I)   (z = 0 at the last step)
            x = x + sigma_t * randn_like(x, generator)
        if keep_every and (t % keep_every == 0):
            kept.append(x.cpu())
    return (x, kept) if keep_every else x
