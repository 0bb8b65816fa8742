"""The diffusion process: schedules, q and p, the bound and the losses (chapters 01-03)."""

from .gaussian import GaussianDiffusion, ModelPrediction, randn_like
from .likelihood import BOUND_PARTS, bound_bpd, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import (
    ScheduleError,
    alpha_bar_from_betas,
    check_betas,
    cosine_betas,
    linear_betas,
    linear_betas_for,
    log_snr,
    make_betas,
    scaled_linear_betas,
    snr,
)
from .thresholding import Threshold, dynamic_threshold, resolve_threshold, static_threshold

__all__ = [
    "GaussianDiffusion", "ModelPrediction", "randn_like", "BOUND_PARTS", "bound_bpd",
    "discretized_gaussian_log_likelihood", "mean_flat",
    "normal_kl", "ScheduleError", "alpha_bar_from_betas", "check_betas", "cosine_betas", "linear_betas",
    "linear_betas_for", "log_snr", "make_betas", "scaled_linear_betas", "snr",
    "Threshold", "dynamic_threshold", "resolve_threshold", "static_threshold",
]
