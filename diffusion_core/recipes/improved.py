"""Improved DDPM's digit models (chapter 02 trains them; chapter 03 uses chapter 01's ``digits-ddpm``).

Nichol & Dhariwal (2021) change two things about DDPM: the cosine noise schedule (their eq. 17) and a
learned variance Sigma_theta = exp(v log beta_t + (1 - v) log beta_tilde_t) trained with
L_hybrid = L_simple + lambda L_vlb, lambda = 0.001, the mean stopped inside L_vlb (their Sec. 3.1).
Each recipe here is ``digits-ddpm`` with exactly those switches changed and *everything else equal*:
the same UNet (two output channels instead of one: the second half is v), the same data, steps,
batch size, learning rate, EMA, seed and training loop (``digits-ddpm``'s own ``train``, which runs
under bfloat16 autocast where the CPU has native bf16: ``TrainConfig(cpu_amp=True)``), so the
comparisons of chapter 02 are at an equal budget.

* ``digits-iddpm-hybrid``         cosine schedule, learned variance, L_hybrid (the paper's improved model)
* ``digits-iddpm-hybrid-linear``  linear schedule, learned variance, L_hybrid (isolates the schedule
                                  against the first, and the loss/variance against ``digits-ddpm``)
"""

from __future__ import annotations

from typing import Any

from ..profiles import Profile
from ..store import Recipe, register
from .digits import DIGITS_DDPM

#: what each recipe changes in ``digits-ddpm``'s configuration (loss, variance, schedule); nothing else
VARIANTS: dict[str, dict[str, str]] = {
    "digits-ddpm": {"loss": "simple", "variance": "fixed_large", "schedule": "linear"},
    "digits-iddpm-hybrid": {"loss": "hybrid", "variance": "learned_range", "schedule": "cosine"},
    "digits-iddpm-hybrid-linear": {"loss": "hybrid", "variance": "learned_range", "schedule": "linear"},
}


def _config(name: str):
    changes = VARIANTS[name]

    def config(p: Profile) -> dict[str, Any]:
        # digits-ddpm's budget (width, steps, batch, lr, EMA, seed) with only these switches changed
        return {**DIGITS_DDPM.config(p), **changes}
    return config


def budget(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a recipe's configuration that make its training budget (equal across chapter 02)."""
    return {k: config[k] for k in ("width", "steps", "batch_size", "lr", "ema_decay", "dropout", "seed")}


# version 2: trained in bf16 on CPUs with native bf16 (digits-ddpm v2's training loop, cpu_amp=True)
DIGITS_IDDPM_HYBRID = register(Recipe(
    "digits-iddpm-hybrid", 2, _config("digits-iddpm-hybrid"), DIGITS_DDPM.build, DIGITS_DDPM.train,
    "Improved DDPM on 16x16 digits: cosine schedule, learned variance (range), L_hybrid; digits-ddpm's budget",
    process=DIGITS_DDPM.process))
DIGITS_IDDPM_HYBRID_LINEAR = register(Recipe(
    "digits-iddpm-hybrid-linear", 2, _config("digits-iddpm-hybrid-linear"), DIGITS_DDPM.build, DIGITS_DDPM.train,
    "linear schedule, learned variance (range), L_hybrid; digits-ddpm's budget", process=DIGITS_DDPM.process))
