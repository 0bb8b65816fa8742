"""What a network's output means: the conversions between its prediction and (x0_hat, eps_hat), and
Improved DDPM's learned variance. The process (:class:`~diffusion_core.process.GaussianDiffusion`, per
sample t from its tables) and the samplers and converted schedulers (one step at a time, alpha_bar a
number) use these formulas; the process's ``predict_x0_eps`` is the same three lines over tensors of t
(tests/test_process.py checks that the two agree).
"""

from __future__ import annotations

import math

import torch


def x0_eps_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, prediction: str, alpha_bar_t: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) implied by a network output at a step whose alpha_bar_t is a number.

    eps:  x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
    x0:   eps_hat = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t)
    v:    x0_hat = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v,  eps_hat = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v
    """
    a, b = math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t)
    if prediction == "eps":
        return (x_t - b * pred) / a, pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / b
    if prediction == "v":
        return a * x_t - b * pred, b * x_t + a * pred
    raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'x0' or 'v'")


def learned_log_variance(v: torch.Tensor, log_beta: torch.Tensor | float, log_beta_tilde: torch.Tensor | float
                         ) -> torch.Tensor:
    """Improved DDPM eq. 15: the network's variance output v in [-1, 1] interpolates the log-variances
    of the two fixed choices, log Sigma = v' log beta_t + (1 - v') log beta_tilde_t with v' = (v + 1) / 2
    (v = 1: beta_t, the largest; v = -1: beta_tilde_t). ``log_beta`` and ``log_beta_tilde`` are numbers
    (one step) or tensors broadcasting against v."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde
