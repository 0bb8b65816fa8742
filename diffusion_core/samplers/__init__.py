"""Samplers: short functions of (model, diffusion, x_T) that a chapter can print in full."""

from .ancestral import ddpm_sample
from .ddim import ddim_invert, ddim_sample, ddim_sigma, ddim_step, x0_eps_from_prediction
from .interpolation import lerp, slerp

__all__ = ["ddpm_sample"]
__all__ += ["ddim_sample", "ddim_invert", "ddim_sigma", "ddim_step", "x0_eps_from_prediction", "slerp", "lerp"]
from .clip_guidance import clip_guided_mean, clip_guided_p_mean_variance, clip_guided_sample  # noqa: E402
from .inpaint import known_region_x0, replacement_inpaint_sample  # noqa: E402

__all__ += ["clip_guided_sample", "clip_guided_p_mean_variance", "clip_guided_mean", "replacement_inpaint_sample",
            "known_region_x0"]
