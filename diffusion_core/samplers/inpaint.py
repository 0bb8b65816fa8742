"""Inpainting with a diffusion model (GLIDE Sec. 4; chapter 11): fill the unknown region of an
image (``mask = 0``) so that it agrees with the known region (``mask = 1``) and a caption.

Two ways, each a few lines:

* **Replacement** (the naive baseline GLIDE compares against; Sohl-Dickstein et al. 2015, Song et
  al. 2021, RePaint without its resampling): sample with an ordinary model, and before every step
  overwrite the known region of ``x_t`` with a fresh sample of the known pixels at that noise level,

      x_t <- m * q_sample(x_known, t) + (1 - m) * x_t,     q_sample = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps

  (:func:`replacement_inpaint_sample`). The model never sees the known region *as* known, only
  as noisy context, which is why seams appear (GLIDE: "the model cannot see the entire context").
* **A model trained to inpaint** (GLIDE's): the known pixels and the mask are extra input
  channels; its sampler is plain ancestral sampling, with GLIDE's ``denoised_fn`` that puts the
  known pixels into every x0 estimate (:func:`known_region_x0`), so the final image keeps them exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..process.gaussian import GaussianDiffusion, randn_like
from ..process.thresholding import ThresholdLike, resolve_threshold
from .ancestral import _check_start


def check_mask(known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``known`` (B, C, H, W) images in [-1, 1]; ``mask`` (B, 1, H, W) or (B, C, H, W) with 1 =
    known, 0 = to fill (bool or {0, 1} floats). Returns the mask as ``known``'s dtype."""
    if not torch.is_tensor(known) or known.ndim != 4 or not known.is_floating_point():
        raise ValueError(f"known must be float images (B, C, H, W), got "
                         f"{tuple(known.shape) if torch.is_tensor(known) else type(known).__name__}")
    if not torch.is_tensor(mask) or mask.ndim != 4 or mask.shape[0] != known.shape[0] or \
            mask.shape[2:] != known.shape[2:] or mask.shape[1] not in (1, known.shape[1]):
        raise ValueError(f"mask must be (B, 1, H, W) = {(known.shape[0], 1, *known.shape[2:])} (1 = known, "
                         f"0 = fill), got {tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold 1 (known) and 0 (to fill), or be boolean")
    return mask.to(known.dtype)


def known_region_x0(known: torch.Tensor, mask: torch.Tensor, clip_denoised: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """GLIDE's ``denoised_fn`` for inpainting: ``x0 -> m * x_known + (1 - m) * clip(x0)``, the x0
    transform of every step (pass it as a sampler's ``threshold``)."""
    m = check_mask(known, mask)

    def x0_fn(x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        return m * known.to(x0) + (1 - m) * x0
    return x0_fn


def replace_known(diffusion: GaussianDiffusion, xt: torch.Tensor, known: torch.Tensor, mask: torch.Tensor,
                  t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``m * q_sample(x_known, t) + (1 - m) * x_t``: the known region at noise level t."""
    return mask * diffusion.q_sample(known, t, generator=generator) + (1 - mask) * xt


@torch.no_grad()
def replacement_inpaint_sample(model: Callable[..., torch.Tensor], diffusion: GaussianDiffusion, x_T: torch.Tensor,
                               known: torch.Tensor, mask: torch.Tensor, *, clip_denoised: bool = True,
                               threshold: ThresholdLike = None, generator: torch.Generator | None = None,
                               model_kwargs: dict[str, Any] | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (DDPM Algorithm 2) with the known region replaced before every step:

        x_t     <- m * q_sample(x_known, t) + (1 - m) * x_t
        x_{t-1}  = mu_theta(x_t, t) + sigma_t z
        x_0     <- m * x_known + (1 - m) * x_0               (the known pixels exactly, at the end)

    ``model(x_t, t, **model_kwargs)`` is an ordinary (non-inpainting) model; ``known`` (B, C, H, W)
    in [-1, 1], ``mask`` (B, 1, H, W) with 1 = known."""
    _check_start(x_T, None)
    m = check_mask(known, mask).to(x_T.device)
    known = known.to(x_T)
    if known.shape != x_T.shape:
        raise ValueError(f"known must have x_T's shape {tuple(x_T.shape)}, got {tuple(known.shape)}")
    x0_fn = resolve_threshold(threshold, clip_denoised)
    kw = model_kwargs or {}
    x = x_T
    for step in tqdm(range(diffusion.T - 1, -1, -1), desc="inpainting (replacement)", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x = replace_known(diffusion, x, known, m, t, generator)
        p = diffusion.p_mean_variance(model(x, diffusion.model_t(t), **kw), x, t, threshold=x0_fn or "none")
        x = p.mean
        if step > 0:
            x = x + (0.5 * p.log_variance).exp() * randn_like(x, generator)
    return m * known + (1 - m) * x
