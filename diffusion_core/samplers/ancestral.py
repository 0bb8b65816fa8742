"""Ancestral sampling, DDPM Algorithm 2 (chapter 01).

    x_T ~ N(0, I)
    for t = T-1, ..., 0:   x_{t-1} = mu_theta(x_t, t) + sigma_t z,   z ~ N(0, I) (z = 0 at the last step)

With a respaced process (``diffusion.respace(...)``, chapter 02) the same loop runs in K steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..process.gaussian import GaussianDiffusion, randn_like


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
                clip_denoised: bool = True, generator: torch.Generator | None = None,
                model_kwargs: dict[str, Any] | None = None, progress: bool = True,
                keep_every: int | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run p(x_{t-1} | x_t) from x_T down to x_0. ``model(x_t, t, **model_kwargs)`` gives the network
    output; ``keep_every=k`` also returns the trajectory [x_T, ..., x_0] every k steps."""
    _check_start(x_T, keep_every)
    x = x_T
    kept = [x.cpu()] if keep_every else []
    steps = range(diffusion.T - 1, -1, -1)
    for i in tqdm(steps, desc="DDPM sampling", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model(x, diffusion.model_t(t), **(model_kwargs or {})), x, t,
                                      clip_denoised=clip_denoised, check=False)
        z = randn_like(x, generator) if i > 0 else torch.zeros_like(x)
        # x_{t-1} = mu_theta(x_t, t) + sigma_t z
        x = p.mean + (0.5 * p.log_variance).exp() * z
        if keep_every and (i % keep_every == 0):
            kept.append(x.cpu())
    return (x, kept) if keep_every else x
