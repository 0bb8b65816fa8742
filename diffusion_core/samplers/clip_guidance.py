"""CLIP guidance (GLIDE, Nichol et al. 2021, Sec. 2.3, eq. 6), chapter 11.

Classifier guidance (Dhariwal & Nichol 2021, Algorithm 1) shifts the mean of every reverse step
along the gradient of a classifier's log-probability, scaled by the step's variance:

    mu_hat(x_t, c) = mu_theta(x_t, t) + s * Sigma_theta(x_t, t) * grad_{x_t} log p_phi(c | x_t)

GLIDE replaces the classifier by a CLIP model, the log-probability by the dot product of its
image embedding f and text embedding g:

    mu_hat(x_t, c) = mu_theta(x_t, t) + s * Sigma_theta(x_t, t) * grad_{x_t} ( f(x_t, t) . g(c) )   (GLIDE eq. 6)

The image tower must be *noise-aware* (it sees x_t and t: :class:`~diffusion_core.models.glide.NoisyCLIP`),
since a CLIP trained on clean images gives meaningless gradients at high noise. The score here
is whatever ``score_fn(x_t, t) -> (B,)`` returns; chapter 11 passes ``e^tau cos(f(x_t, t), g(c))``,
CLIP's logit, so that ``s`` is on the scale of a classifier's log-probability gradient.

The gradient is taken through the score only, never through the diffusion model (whose output is
computed without gradients), and in one batched backward pass: row i of ``score_fn`` must depend
on row i of ``x_t`` only (true of per-sample networks: GroupNorm, LayerNorm, no BatchNorm), so
``grad sum_i score_i`` holds each row's own gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..process.gaussian import GaussianDiffusion, ModelPrediction, randn_like
from ..process.thresholding import ThresholdLike
from .ancestral import _check_start
from .guidance import check_scale

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,)) -> (B,)


def check_clip_scale(scale: float | torch.Tensor, batch: int | None = None) -> float | torch.Tensor:
    """The CLIP guidance scale ``s``: a finite number >= 0 (0: no guidance), or a (B,) tensor of
    them (one per sample). A negative ``s`` would push samples away from the caption; NaN or inf
    would make every sample NaN."""
    return check_scale(scale, batch, what="CLIP guidance scale", meaning="0: no guidance")


def score_and_grad(score_fn: ScoreFn, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score (B,), grad_{x_t} score (B, ...))`` in one batched backward pass, in float32.

    ``score_fn(x_t, t)`` must return one finite number per sample."""
    # float32 even inside a sampler's autocast: the gradient is small and bf16 would round it coarsely
    with torch.enable_grad(), torch.autocast(xt.device.type if xt.device.type in ("cuda", "cpu") else "cpu",
                                             enabled=False):
        x = xt.detach().float().requires_grad_(True)
        score = score_fn(x, t)
        if not isinstance(score, torch.Tensor) or score.shape != (xt.shape[0],):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"score_fn must return one score per sample, shape ({xt.shape[0]},), got {got}")
        # grad_{x_t} sum_i score_i(x_t^i) = (grad_{x_t^i} score_i)_i: each row's own gradient
        (grad,) = torch.autograd.grad(score.float().sum(), x)
    if not bool(torch.isfinite(grad).all()):
        raise FloatingPointError("the CLIP score's gradient is NaN or infinite")
    return score.detach(), grad


def clip_guided_mean(p: ModelPrediction, grad: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """GLIDE eq. 6 for a batch: ``mu + s * Sigma * grad`` (shapes of ``p.mean``; a (B,) ``scale``
    gives each sample its own s)."""
    s = check_clip_scale(scale, p.mean.shape[0])
    if isinstance(s, torch.Tensor) and s.ndim == 1:
        s = s.to(p.mean).reshape(-1, *([1] * (p.mean.ndim - 1)))
    if grad.shape != p.mean.shape:
        raise ValueError(f"the gradient has shape {tuple(grad.shape)}, the mean {tuple(p.mean.shape)}")
    # mu_hat = mu_theta(x_t, t) + s * Sigma_theta(x_t, t) * grad_{x_t} (f(x_t, t) . g(c))
    return p.mean + s * p.variance * grad.to(p.mean.dtype)


def clip_guided_p_mean_variance(model_output: torch.Tensor, diffusion: GaussianDiffusion, xt: torch.Tensor,
                                t: torch.Tensor, score_fn: ScoreFn, scale: float | torch.Tensor, *,
                                clip_denoised: bool = True, threshold: ThresholdLike = None) -> ModelPrediction:
    """p(x_{t-1} | x_t) with its mean guided by CLIP: :meth:`GaussianDiffusion.p_mean_variance`, then
    ``mean = mu + s Sigma grad (f . g)``. ``t`` is the step index of ``diffusion`` (B,); the score
    sees the network's timestep ``diffusion.model_t(t)`` (they differ after respacing), the noise
    level the CLIP was trained at. ``s = 0`` (a float) returns the unguided prediction without
    evaluating the score."""
    s = check_clip_scale(scale, xt.shape[0])
    p = diffusion.p_mean_variance(model_output, xt, t, clip_denoised=clip_denoised, threshold=threshold)
    if isinstance(s, float) and s == 0.0:
        return p
    _, grad = score_and_grad(score_fn, xt, diffusion.model_t(t))
    return ModelPrediction(mean=clip_guided_mean(p, grad, s), variance=p.variance, log_variance=p.log_variance,
                           x0=p.x0, eps=p.eps)


@torch.no_grad()
def clip_guided_sample(model: Callable[..., torch.Tensor], diffusion: GaussianDiffusion, x_T: torch.Tensor,
                       score_fn: ScoreFn, scale: float | torch.Tensor, *, clip_denoised: bool = True,
                       threshold: ThresholdLike = None, generator: torch.Generator | None = None,
                       model_kwargs: dict[str, Any] | None = None, progress: bool = True) -> torch.Tensor:
    """Ancestral sampling (DDPM Algorithm 2) with CLIP-guided means:

        x_{t-1} = mu_hat(x_t, c) + sigma_t z,   z ~ N(0, I)   (z = 0 at the last step)

    ``model(x_t, t, **model_kwargs)`` is the diffusion network (fixed or learned variance, as
    ``diffusion`` says), ``score_fn(x_t, t) -> (B,)`` the guiding score (its gradient is taken
    here), ``scale`` s >= 0. With ``s = 0`` and the same ``generator`` this is
    :func:`~diffusion_core.samplers.ancestral.ddpm_sample` exactly (the same numbers, the same
    noise draws)."""
    _check_start(x_T, None)
    s = check_clip_scale(scale, x_T.shape[0])
    kw = model_kwargs or {}
    x = x_T
    for step in tqdm(range(diffusion.T - 1, -1, -1), desc="CLIP-guided sampling", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        out = model(x, diffusion.model_t(t), **kw)
        p = clip_guided_p_mean_variance(out, diffusion, x, t, score_fn, s, clip_denoised=clip_denoised,
                                        threshold=threshold)
        x = p.mean
        if step > 0:
            # x_{t-1} = mu_hat + sigma_t z,  sigma_t = exp(log Sigma / 2)
            x = x + (0.5 * p.log_variance).exp() * randn_like(x, generator)
    return x
