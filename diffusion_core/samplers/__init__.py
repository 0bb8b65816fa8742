"""Samplers: short functions of (model, diffusion, x_T) that a chapter can print in full."""

from .ancestral import ddpm_sample

__all__ = ["ddpm_sample"]
