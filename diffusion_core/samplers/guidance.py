"""Classifier-free guidance (Ho & Salimans 2021). Chapter 06 defines it; chapters 11-13 reuse it.

One network learns both the conditional noise prediction ``eps(x_t, c)`` and the unconditional one
``eps(x_t, null)``: during training the condition is replaced by a null condition with probability
``p_uncond`` (:func:`drop_condition`). At sampling time the two predictions are extrapolated away
from the unconditional one (:func:`cfg_eps`):

    eps_hat = eps_u + s * (eps_c - eps_u)

The weight convention. This package uses ``s`` (GLIDE's "guidance scale", also diffusers'
``guidance_scale``): ``s = 1`` is the plain conditional model (no guidance), ``s = 0`` the
unconditional one, ``s > 1`` guides. Ho & Salimans write the same rule as
``eps_hat = (1 + w) eps_c - w eps_u``, so their ``w = s - 1`` (their ``w = 0`` is no guidance).
Imagen's guidance weight ``w`` is the same number as GLIDE's ``s``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..distributed import batch_rand
from ..process.gaussian import GaussianDiffusion
from ..process.thresholding import ThresholdLike, resolve_threshold
from .ddim import ddim_sample

Cond = Any  # a tensor (B, ...), or a dict / tuple / list of them (passed to model_fn as one object)


def check_scale(scale: float | torch.Tensor, batch: int | None = None, what: str = "guidance scale",
                meaning: str = "0: unconditional, 1: conditional, > 1: guided") -> float | torch.Tensor:
    """The guidance scale ``s`` as a float (or a per-sample tensor), checked: a finite number >= 0
    (0: unconditional, 1: conditional, > 1: guided). A tensor is 0-d, or ``(B,)`` / ``(1,)`` with
    ``batch`` = B. NaN or inf would turn every sample into NaN; a negative s extrapolates past the
    unconditional model, away from the condition (to steer away from a condition, pass it as
    ``null_cond`` with s > 1, the "negative prompt"). ``what`` and ``meaning`` name the scale in the
    errors (CLIP guidance checks its scale here too)."""
    rule = f"the {what} s must be a finite number >= 0 ({meaning})"
    if isinstance(scale, torch.Tensor):
        if scale.dtype == torch.bool or scale.is_complex():
            raise TypeError(f"{rule}; got a tensor of dtype {scale.dtype}")
        if scale.ndim > 1 or (scale.ndim == 1 and batch is not None and scale.numel() not in (1, batch)):
            raise ValueError(f"a per-sample {what} must have shape ({batch if batch is not None else 'B'},), "
                             f"got {tuple(scale.shape)}")
        if scale.numel() and not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            raise ValueError(f"{rule}; got {scale.tolist()}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{rule}; got {type(scale).__name__} {scale!r}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"{rule}; got {scale!r}")
    return float(scale)


def _check_null_kind(u: torch.Tensor, c: torch.Tensor, what: str) -> None:
    """An integer condition (class labels) needs an integer null condition: 10.5 is not a class."""
    if not (c.is_floating_point() or c.is_complex()) and (u.is_floating_point() or u.is_complex()):
        if u.numel() and not bool((u == u.round()).all()):
            raise ValueError(f"null_cond must be a class index like {what} (integers), got {u.flatten()[:4].tolist()}")


def _match(u: Cond, c: Cond, what: str = "cond") -> Cond:
    """Broadcast the null condition ``u`` to the structure and shape of ``c``: a null tensor may
    have batch 1 or no batch dimension (a scalar null class label, one null embedding)."""
    if isinstance(c, torch.Tensor):
        if isinstance(u, (int, float)):  # a null class index given as a number
            u = torch.tensor(u, device=c.device)
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"cfg_eps: {what} is a tensor but null_cond is {type(u).__name__}")
        if u.ndim == c.ndim - 1:
            u = u.unsqueeze(0)
        if u.ndim == c.ndim and u.ndim > 0 and u.shape[0] == 1:
            u = u.expand(c.shape[0], *u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(
                f"cfg_eps: null_cond has shape {tuple(u.shape)} but {what} has shape {tuple(c.shape)}; "
                "they must match (the null condition may have batch 1)"
            )
        _check_null_kind(u, c, what)
        return u.to(c.dtype)
    if isinstance(c, Mapping):
        if not isinstance(u, Mapping) or set(u) != set(c):
            raise ValueError(f"cfg_eps: null_cond must have the same keys as {what}")
        return {k: _match(u[k], c[k], f"{what}[{k!r}]") for k in c}
    if isinstance(c, (tuple, list)):
        if not isinstance(u, (tuple, list)) or len(u) != len(c):
            raise ValueError(f"cfg_eps: null_cond must have as many entries as {what}")
        return type(c)(_match(a, b, f"{what}[{i}]") for i, (a, b) in enumerate(zip(u, c)))
    if c is None and u is None:
        return None
    raise TypeError(f"cfg_eps: cannot batch a {what} of type {type(c).__name__}")


def _cat(u: Cond, c: Cond) -> Cond:
    """``[u; c]`` along the batch, for tensors nested in dicts / tuples of the same structure."""
    if isinstance(c, torch.Tensor):
        return torch.cat([u, c], dim=0)
    if isinstance(c, Mapping):
        return {k: _cat(u[k], c[k]) for k in c}
    if isinstance(c, (tuple, list)):
        return type(c)(_cat(a, b) for a, b in zip(u, c))
    return None


def cfg_eps(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    xt: torch.Tensor,
    t: torch.Tensor | int,
    cond: Cond,
    null_cond: Cond,
    scale: float | torch.Tensor,
    eps_channels: int | None = None,
) -> torch.Tensor:
    """Guided noise prediction ``eps_u + s (eps_c - eps_u)`` from ONE batched forward pass.

    Args:
        model_fn: ``model_fn(x, t, cond) -> eps``, with ``x`` of shape ``(B, C, H, W)``.
        xt: the noisy sample ``(B, C, H, W)``.
        t: timesteps, a scalar or ``(B,)``.
        cond: the condition, a tensor ``(B, ...)`` (class labels, text embeddings) or a dict /
            tuple of them.
        null_cond: the null condition of the same structure; a tensor may have batch 1 (or no
            batch dimension) and is broadcast.
        scale: ``s`` (GLIDE convention): 1 = conditional, 0 = unconditional, > 1 = guided. A float
            or a ``(B,)`` tensor (one scale per sample), finite and >= 0 (:func:`check_scale`).
        eps_channels: if the model also outputs other channels (a learned variance, as in
            Improved DDPM / GLIDE), guide only the first ``eps_channels`` and take the rest from the
            conditional output.

    Returns:
        ``(B, C_out, H, W)``. ``s = 1`` and ``s = 0`` skip the unneeded half and are exact.
    """
    scale = check_scale(scale, xt.shape[0])
    if isinstance(scale, float):
        if scale == 1:
            return model_fn(xt, t, cond)
        if scale == 0:
            return model_fn(xt, t, _match(null_cond, cond))
    # [x_t; x_t] with [null; c]: one forward of batch 2B instead of two of batch B
    x2 = torch.cat([xt, xt], dim=0)
    t = torch.as_tensor(t, device=xt.device)
    t2 = torch.cat([t, t], dim=0) if t.ndim > 0 else t
    out = model_fn(x2, t2, _cat(_match(null_cond, cond), cond))
    out_u, out_c = out.chunk(2, dim=0)
    if isinstance(scale, torch.Tensor) and scale.ndim > 0:
        scale = scale.reshape(-1, *([1] * (out.ndim - 1))).to(out)
    k = out.shape[1] if eps_channels is None else eps_channels
    eps_u, eps_c = out_u[:, :k], out_c[:, :k]
    # eps_hat = eps_u + s (eps_c - eps_u)      (Ho & Salimans: (1 + w) eps_c - w eps_u with w = s - 1)
    eps = eps_u + scale * (eps_c - eps_u)
    if k < out.shape[1]:
        eps = torch.cat([eps, out_c[:, k:]], dim=1)
    return eps


def drop_condition(
    cond: torch.Tensor,
    null_cond: torch.Tensor | int | float,
    p_uncond: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Condition dropout for training: each row of ``cond`` becomes ``null_cond`` with probability
    ``p_uncond`` (Ho & Salimans use 0.1 or 0.2).

    Args:
        cond: ``(B, ...)``, e.g. class labels ``(B,)`` or text embeddings ``(B, M, D)``.
        null_cond: the null condition: a scalar (a null class index), a tensor of one row's shape
            ``(...)``, of shape ``(1, ...)``, or ``(B, ...)``.
        p_uncond: the probability of dropping, in ``[0, 1]``.
        generator: for reproducible masks (on the generator's device).

    Returns:
        A new tensor shaped like ``cond``.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"drop_condition: p_uncond must be in [0, 1], got {p_uncond}")
    if not torch.is_tensor(cond) or cond.ndim < 1:
        raise ValueError(f"drop_condition: cond must be a batched tensor (B, ...), got "
                         f"{tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__}")
    b = cond.shape[0]
    null = torch.as_tensor(null_cond, device=cond.device)
    _check_null_kind(null, cond, "cond")
    null = null.to(cond.dtype)
    if null.ndim == cond.ndim - 1:
        null = null.unsqueeze(0)
    try:
        null = null.expand_as(cond) if null.ndim == cond.ndim else null.expand(cond.shape)
    except RuntimeError:
        raise ValueError(
            f"drop_condition: null_cond of shape {tuple(null.shape)} does not broadcast to cond of "
            f"shape {tuple(cond.shape)}"
        ) from None
    gen_device = generator.device if generator is not None else cond.device
    drop = batch_rand((b,), generator=generator, device=gen_device).to(cond.device) < p_uncond
    drop = drop.reshape(b, *([1] * (cond.ndim - 1)))
    return torch.where(drop, null, cond)


@torch.no_grad()
def guided_sample(model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], diffusion: GaussianDiffusion,
                  x_T: torch.Tensor, cond: Any, null_cond: Any, scale: float, steps: int, eta: float = 0.0,
                  generator: torch.Generator | None = None, progress: bool = False, *,
                  clip_denoised: bool | None = None, threshold: ThresholdLike = None) -> torch.Tensor:
    """DDIM from ``x_T`` with the guided noise prediction eps_u + s (eps_c - eps_u) at every step
    (``cfg_eps``: one batched forward of [null; cond]). ``clip_denoised`` is the data's choice, with no
    default: True clips each x0 estimate to [-1, 1] (images), False leaves it (a 2-D toy spread to +-2);
    or ``threshold`` instead ("none", "static", "dynamic": Imagen's dynamic thresholding, chapter 13)."""
    x0_fn = resolve_threshold(threshold, clip_denoised)  # neither given: an error, the choice is the caller's

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cfg_eps(model_fn, x, t, cond, null_cond, scale)

    return ddim_sample(eps_fn, diffusion, x_T, steps, eta, generator=generator, progress=progress,
                       threshold=x0_fn or "none")



def float_output(model_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``model_fn`` with its output cast to float32: under bf16 autocast the network runs in bf16,
    and the guided combination eps_u + s (eps_c - eps_u), which multiplies a difference by s, is
    then done in float32 rather than rounded to bf16 once more."""

    def fn(*args: Any) -> torch.Tensor:
        return model_fn(*args).float()

    return fn
