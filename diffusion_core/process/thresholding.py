"""What a sampler does to its prediction x0_hat before it steps: nothing, static clipping, or
Imagen's dynamic thresholding (chapter 13; static clipping is chapter 01's ``clip_denoised``).

Saharia et al. (2022), "Photorealistic Text-to-Image Diffusion Models with Deep Language
Understanding" (Imagen), Sec. 2.3:

    "Static thresholding: We refer to elementwise clipping the x-prediction to [-1, 1] as static
    thresholding. [...] Dynamic thresholding: At each sampling step we set s to a certain percentile
    absolute pixel value in x0_hat_t, and if s > 1, then we threshold x0_hat_t to the range [-s, s]
    and then divide by s. Dynamic thresholding pushes saturated pixels (those near -1 and 1) inwards,
    thereby actively preventing pixels from saturation at each step."

The paper's pseudo-code (in its appendix) takes s = max(percentile_p(|x0_hat|), 1) per sample, with
p = 99.5; so where s <= 1 the rule is static clipping to [-1, 1] (which leaves a sample already in
[-1, 1] unchanged, and only its top 0.5% of |x| can lie outside), and the output always lies in
[-1, 1].

diffusers' schedulers with ``thresholding=True`` (``DDPMScheduler._threshold_sample``) compute the
same s with ``torch.quantile(|x0|, dynamic_thresholding_ratio)`` over each sample's C H W values and
clamp it to [1, ``sample_max_value``]. The lower bound 1 is the paper's max(s, 1); the upper bound is
theirs: with s capped at m, values beyond m are clipped to +-m before the division, so the result
still lies in [-1, 1]. Two consequences worth knowing:

* ``sample_max_value=1.0`` (diffusers' default) makes s = 1 always: plain static clipping, whatever
  the ratio;
* DeepFloyd IF stage I (the public Imagen-style model) uses ratio 0.95 and ``sample_max_value=1.5``:
  the 95th percentile, and never more than a 1.5-fold rescaling.

:class:`Threshold` holds one choice (``"none"``, ``"static"`` or ``"dynamic"`` with its quantile and
its cap); :func:`resolve_threshold` turns a sampler's ``threshold=`` argument (and its older
``clip_denoised`` switch) into the function applied to x0_hat. Every sampler in the package
(:func:`~diffusion_core.samplers.ddpm_sample`, :func:`~diffusion_core.samplers.ddim_sample`,
:meth:`GaussianDiffusion.p_mean_variance`, the diffusers-equivalent schedulers) goes through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

METHODS = ("none", "static", "dynamic")

X0Fn = Callable[[torch.Tensor], torch.Tensor]


def static_threshold(x0: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Static thresholding: clip x0_hat elementwise to [-max_value, max_value] (Imagen Sec. 2.3;
    DDPM's sampler clips to [-1, 1])."""
    return x0.clamp(-max_value, max_value)


def dynamic_threshold(x0: torch.Tensor, quantile: float = 0.995, max_value: float | None = None) -> torch.Tensor:
    """Imagen's dynamic thresholding of x0_hat (B, ...), per sample; the result lies in [-1, 1].

        s = quantile_q( |x0_hat| over the sample's values )      (q = 0.995: the 99.5th percentile)
        s = min( max(s, 1), max_value )                           (paper: s >= 1; diffusers: also s <= m)
        x0_hat <- clip(x0_hat, -s, s) / s

    ``quantile`` is a fraction in (0, 1] (the paper's p-th percentile is p / 100), computed with
    linear interpolation between order statistics (numpy's and torch's default). ``max_value`` is
    diffusers' ``sample_max_value`` (None: no cap, as in the paper; 1.0: static clipping). Half
    precision is computed in float32 and returned in the input's dtype, as diffusers does.
    """
    _check_quantile(quantile)
    _check_max_value(max_value, allow_none=True)
    if x0.ndim < 1 or x0.shape[0] == 0:
        return x0
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    # s = the q-quantile of |x0_hat|, one per sample: (B, 1)
    s = torch.quantile(flat.abs(), quantile, dim=1, keepdim=True)
    # "if s > 1": below 1 the rule is plain clipping to [-1, 1]; diffusers also caps s at sample_max_value
    s = s.clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=float(max_value))
    # "threshold x0_hat to the range [-s, s] and then divide by s"
    out = torch.maximum(torch.minimum(flat, s), -s) / s
    return out.reshape(x0.shape).to(dtype)


def _check_quantile(q: Any) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < float(q) <= 1.0):
        raise ValueError(f"the dynamic-thresholding quantile must be a fraction in (0, 1] (Imagen's 99.5th "
                         f"percentile is 0.995), got {q!r}")


def _check_max_value(m: Any, allow_none: bool) -> None:
    if m is None and allow_none:
        return
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m > 0):
        raise ValueError(f"the threshold's max_value must be a finite number > 0, got {m!r}")


@dataclass(frozen=True)
class Threshold:
    """One choice of what to do with x0_hat at each sampling step; callable on x0_hat (B, ...).

    Args:
        method: ``"none"`` (leave it), ``"static"`` (clip to [-max_value, max_value], default 1) or
            ``"dynamic"`` (:func:`dynamic_threshold` with ``quantile`` and ``max_value``, default no cap).
        quantile: dynamic only: the fraction q of the per-sample |x0_hat| quantile (0.995 in Imagen).
        max_value: static: the clipping range (diffusers' ``clip_sample_range``); dynamic: the cap on s
            (diffusers' ``sample_max_value``; None: none).
    """

    method: str = "dynamic"
    quantile: float = 0.995
    max_value: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown thresholding method {self.method!r}; expected one of {METHODS}")
        _check_quantile(self.quantile)
        _check_max_value(self.max_value, allow_none=True)

    @classmethod
    def imagen(cls) -> Threshold:
        """Imagen's setting: the 99.5th percentile, s uncapped."""
        return cls("dynamic", 0.995, None)

    @classmethod
    def deepfloyd_if(cls) -> Threshold:
        """DeepFloyd IF stage I's scheduler: ratio 0.95, sample_max_value 1.5."""
        return cls("dynamic", 0.95, 1.5)

    @classmethod
    def from_diffusers_config(cls, config: Any) -> Threshold:
        """The choice a diffusers DDPM/DDIM scheduler config makes: ``thresholding`` takes precedence
        over ``clip_sample`` (as in their ``step``)."""
        if config.get("thresholding", False):
            return cls("dynamic", float(config.get("dynamic_thresholding_ratio", 0.995)),
                       float(config.get("sample_max_value", 1.0)))
        if config.get("clip_sample", True):
            return cls("static", max_value=float(config.get("clip_sample_range", 1.0)))
        return cls("none")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.method == "none":
            return x0
        if self.method == "static":
            return static_threshold(x0, 1.0 if self.max_value is None else self.max_value)
        return dynamic_threshold(x0, self.quantile, self.max_value)


ThresholdLike = None | str | Threshold | X0Fn


def resolve_threshold(threshold: ThresholdLike = None, clip_denoised: bool | None = True) -> X0Fn | None:
    """The function a sampler applies to x0_hat, or None for "leave it" (the samplers then skip the step).

    ``threshold`` is None (defer to ``clip_denoised``), ``"none"``, ``"static"``, ``"dynamic"``
    (Imagen's: 99.5th percentile, uncapped), a :class:`Threshold`, or any callable x0 -> x0.
    When given, it replaces ``clip_denoised`` (as diffusers' ``thresholding`` replaces
    ``clip_sample``); otherwise ``clip_denoised=True`` is ``"static"`` and False is ``"none"``.
    ``clip_denoised=None`` with no ``threshold`` is an error: the caller must choose.
    """
    if threshold is None:
        if clip_denoised is None:
            raise ValueError("choose what to do with x0_hat: clip_denoised=True/False or threshold="
                             "'none' / 'static' / 'dynamic' / a Threshold")
        if not isinstance(clip_denoised, bool):
            raise TypeError(f"clip_denoised must be True or False, got {clip_denoised!r}")
        threshold = "static" if clip_denoised else "none"
    if isinstance(threshold, str):
        if threshold not in METHODS:
            raise ValueError(f"unknown threshold {threshold!r}; expected one of {METHODS}, a Threshold or a callable")
        threshold = Threshold.imagen() if threshold == "dynamic" else Threshold(threshold)
    if isinstance(threshold, Threshold):
        return None if threshold.method == "none" else threshold
    if callable(threshold):
        return threshold
    raise TypeError(f"threshold must be None, 'none', 'static', 'dynamic', a Threshold or a callable, "
                    f"got {type(threshold).__name__}")
