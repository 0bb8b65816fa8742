"""Diffusers' DDPM and DDIM schedulers as diffusion_core processes (chapters 02 and 03).

``from_diffusers(DDPMScheduler(...))`` and ``from_diffusers(DDIMScheduler(...))`` (or, with no
diffusers at all, :func:`ddpm_from_diffusers_config` / :func:`ddim_from_diffusers_config` of a
``scheduler_config.json`` dict, which ``interop.load_pretrained`` reads) return an object
that holds the equivalent :class:`GaussianDiffusion` (``.diffusion``, T training steps) and whose
``sample(model, x_T, steps, ...)`` produces, step for step and from the same noise, what diffusers'
loop produces:

    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=g).prev_sample

What diffusers does, in this book's terms (read from diffusers 0.42):

* The process. alpha_bar is diffusers' ``alphas_cumprod`` (a float32 cumulative product of its
  float32 betas); our float64 process is built from those very numbers, beta_t = 1 - alpha_bar_t /
  alpha_bar_{t-1}, so both run the same alpha_bar (the schedules agree with ours to float32
  precision: "linear" with diffusers' beta_start/beta_end is :func:`linear_betas`,
  "scaled_linear" is :func:`scaled_linear_betas`, "squaredcos_cap_v2" is :func:`cosine_betas`).
* Timesteps. ``timestep_spacing`` "linspace" / "leading" / "trailing" are our ``space_timesteps``
  kinds "uniform" / "leading" / "trailing" (``steps_offset`` shifts "leading" only), in reverse.
* DDPMScheduler with K steps runs ancestral sampling on the *respaced* process
  ``diffusion.respace(tau)``: its "previous timestep" is the next one in its list, and
  1 - alpha_bar_t / alpha_bar_prev is the respaced beta. Variances: "fixed_small" and
  "fixed_small_log" are beta_tilde (floored at 1e-20), "fixed_large" is the respaced beta (with no
  beta_tilde_1 substitute at the end), "learned_range" interpolates their logs (Improved DDPM eq. 15).
  Noise is added whenever the *timestep* is > 0, so with "trailing" spacing or a ``steps_offset``
  the last step (timestep tau_0 > 0, landing on alpha_bar = 1) draws noise too: negligible for
  fixed_small (std 1e-10), but std sqrt(1 - alpha_bar_{tau_0}) for fixed_large.
* x0_hat, in both schedulers: with ``thresholding=True``, Imagen's dynamic thresholding with
  q = ``dynamic_thresholding_ratio`` and s capped at ``sample_max_value`` (which takes precedence
  over ``clip_sample``; see :mod:`diffusion_core.process.thresholding` for how this relates to the
  paper's rule); else clipped to [-clip_sample_range, clip_sample_range] when ``clip_sample``. The
  equivalents hold this choice as one :class:`Threshold` (``.threshold``). DeepFloyd IF stage I's
  scheduler (learned_range, squaredcos_cap_v2, thresholding with ratio 0.95 and sample_max_value
  1.5) is therefore converted exactly.
* DDIMScheduler steps from t to t - T // K whatever the spacing ("linspace" and "trailing" lists
  then need not step to the next listed timestep), lands on alpha_bar = 1 at the end (or on
  alpha_bar_0 when ``set_alpha_to_one=False``), and by default keeps the network's own eps_hat after
  clipping x0_hat (``use_clipped_model_output=False``), unlike :func:`ddim_sample`, which re-derives
  it. When eta > 0 it draws noise at every step.

Not supported (a clear error): ``rescale_betas_zero_snr``
(beta_T = 1 lies outside GaussianDiffusion), and the variance types "learned" and
"fixed_large_log" (the latter takes the square root of a log variance in diffusers' step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .process.gaussian import GaussianDiffusion, randn_like
from .process.parameterization import learned_log_variance, x0_eps_from_prediction
from .process.respacing import space_timesteps
from .process.schedules import ScheduleError
from .process.thresholding import Threshold
from .samplers.ddim import check_eta, ddim_sigma, ddim_step

PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE_FROM_DIFFUSERS = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                           "fixed_large": "fixed_large", "learned_range": "learned_range"}
SPACING_FROM_DIFFUSERS = {"linspace": "uniform", "leading": "leading", "trailing": "trailing"}

ModelFn = Callable[..., torch.Tensor]


def diffusers_alpha_bar(config: Mapping[str, Any]) -> torch.Tensor:
    """alpha_bar (T,) float32, as a diffusers DDPM/DDIM scheduler with this config holds it
    (``alphas_cumprod``): its betas in float32, then the float32 cumulative product of 1 - beta.

        linear:            beta_t = linspace(beta_start, beta_end, T)                    (DDPM Sec. 4)
        scaled_linear:     beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2      (LDM)
        squaredcos_cap_v2: beta_t = min(1 - f((t + 1) / T) / f(t / T), 0.999),
                           f(u) = cos^2( (u + 0.008) / 1.008 * pi / 2 )                  (Improved DDPM eq. 17)
        sigmoid:           beta_t = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start
        trained_betas:     the listed betas

    Used where there is no scheduler object (a ``scheduler_config.json`` read by
    :func:`diffusion_core.interop.load_pretrained`); equal to the object's own ``alphas_cumprod``
    (tested)."""
    T = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    name = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif name == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    elif name == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
    elif name == "squaredcos_cap_v2":
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((t + 1) / T) / f(t / T), 0.999) for t in range(T)], dtype=torch.float32)
    elif name == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (b1 - b0) + b0
    else:
        raise NotImplementedError(f"beta_schedule {name!r} is not converted; supported: linear, scaled_linear, "
                                  "squaredcos_cap_v2, sigmoid, or trained_betas")
    return torch.cumprod(1.0 - betas, dim=0)


def diffusion_from_diffusers_config(config: Mapping[str, Any], alpha_bar: torch.Tensor | None = None,
                                    variance: str = "fixed_small") -> GaussianDiffusion:
    """The GaussianDiffusion of a diffusers DDPM/DDIM scheduler config whose alpha_bar is ``alpha_bar``
    (the scheduler's ``alphas_cumprod``; default :func:`diffusers_alpha_bar` of the config), in float64."""
    cfg = dict(config)
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_FROM_DIFFUSERS:
        raise ValueError(f"unknown prediction_type {prediction!r}; expected one of {tuple(PREDICTION_FROM_DIFFUSERS)}")
    zero_snr = ("zero terminal SNR (rescale_betas_zero_snr=True) puts beta_T = 1, outside GaussianDiffusion")
    if cfg.get("rescale_betas_zero_snr", False) and alpha_bar is None:
        raise ScheduleError(f"the schedule cannot be converted: {zero_snr}")
    alpha_bar = (diffusers_alpha_bar(cfg) if alpha_bar is None else alpha_bar).detach().to(torch.float64).cpu()
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}: the float64 cumprod of 1 - beta_t returns alpha_bar exactly
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    try:
        return GaussianDiffusion(1.0 - alpha_bar / prev, PREDICTION_FROM_DIFFUSERS[prediction], variance)
    except ScheduleError as err:
        raise ScheduleError(f"the schedule cannot be converted ({err}); {zero_snr}") from err


def diffusion_from_scheduler(scheduler: Any, variance: str = "fixed_small") -> GaussianDiffusion:
    """The GaussianDiffusion whose alpha_bar is the scheduler's ``alphas_cumprod`` (in float64)."""
    try:
        return diffusion_from_diffusers_config(scheduler.config, scheduler.alphas_cumprod, variance)
    except ScheduleError as err:
        raise ScheduleError(f"{type(scheduler).__name__}: {err}") from err


def _noise_source(generator: torch.Generator | None, noises: Sequence[torch.Tensor] | torch.Tensor | None,
                  steps: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """z for step k: ``noises[k]`` if given, else a draw from ``generator`` as diffusers draws it."""
    if noises is None:
        return lambda k, x: randn_like(x, generator)
    if generator is not None:
        raise ValueError("pass either generator or noises, not both")
    if len(noises) != steps:
        raise ValueError(f"noises must hold one tensor per step ({steps}), got {len(noises)}")

    def take(k: int, x: torch.Tensor) -> torch.Tensor:
        z = noises[k]
        if z.shape != x.shape:
            raise ValueError(f"noises[{k}] has shape {tuple(z.shape)}, expected {tuple(x.shape)}")
        return z.to(device=x.device, dtype=x.dtype)
    return take


@dataclass
class DiffusersEquivalent:
    """A diffusers scheduler's process (``diffusion``, T steps), its timestep options, and what it does
    to x0_hat (``threshold``: diffusers' default clips it to [-1, 1])."""

    diffusion: GaussianDiffusion
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    threshold: Threshold = field(default_factory=lambda: Threshold("static"))

    def timesteps(self, steps: int | None = None) -> torch.Tensor:
        """The training timesteps of a K-step run in sampling order (descending), as diffusers' list."""
        T = self.diffusion.T
        if steps is None:
            return torch.arange(T - 1, -1, -1)
        kind = SPACING_FROM_DIFFUSERS[self.timestep_spacing]
        return space_timesteps(T, steps, kind, offset=self.steps_offset if kind == "leading" else 0).flip(0)

    def _x0_clipped(self, x0_hat: torch.Tensor) -> torch.Tensor:
        # none, clip to [-r, r], or dynamic thresholding (Imagen Sec. 2.3, diffusers' convention)
        return self.threshold(x0_hat)


@dataclass
class DDPMEquivalent(DiffusersEquivalent):
    """diffusers' DDPMScheduler: ancestral sampling on ``diffusion.respace(tau)``, see the module notes."""

    variance_type: str = "fixed_small"

    def process(self, steps: int | None = None) -> GaussianDiffusion:
        """The K-step process diffusers samples: the T-step process respaced to its timesteps."""
        return self.diffusion if steps is None else self.diffusion.respace(self.timesteps(steps))

    @torch.no_grad()
    def sample(self, model: ModelFn, x_T: torch.Tensor, steps: int | None = None, *,
               generator: torch.Generator | None = None, noises: Sequence[torch.Tensor] | None = None,
               model_kwargs: dict[str, Any] | None = None, progress: bool = False,
               keep_every: int | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """x_0 from x_T as diffusers' DDPMScheduler loop with ``set_timesteps(steps)`` (all T if None).

        ``model(x_t, t, **model_kwargs)`` gets the training timestep t, (B,). The noise of step k is
        ``noises[k]`` if given (one per step, in sampling order), else drawn from ``generator`` exactly
        when and as diffusers draws it, so the same seed gives the same sample.
        """
        tau = self.timesteps(steps).flip(0)  # ascending
        proc = self.process(steps)
        K = proc.T
        ab = proc.alpha_bar.tolist()
        # mu = coef1 x0_hat + coef2 x_t  (DDPM eq. 7, on the respaced process)
        coef1, coef2 = proc.posterior_mean_coef1.tolist(), proc.posterior_mean_coef2.tolist()
        # diffusers floors beta_tilde at 1e-20 (it is 0 on the last step) and uses the respaced beta as is
        beta_tilde = proc.posterior_variance.clamp(min=1e-20)
        log_small, log_large = beta_tilde.log().tolist(), proc.betas.log().tolist()
        noisy = (tau > 0).tolist()
        noise = _noise_source(generator, noises, K)
        model_ts = tau.to(x_T.device)
        kw = model_kwargs or {}
        x = x_T
        kept = [x.cpu()] if keep_every else []
        for step, i in enumerate(tqdm(range(K - 1, -1, -1), desc="DDPM (diffusers) sampling",
                                      disable=not progress, leave=False)):
            out = model(x, model_ts[i].expand(x.shape[0]), **kw)
            pred, v = proc.split_output(out, x)
            x0_hat = self._x0_clipped(x0_eps_from_prediction(pred, x, proc.prediction, ab[i])[0])
            # x_{t-1} = mu_tilde_t(x_t, x0_hat) + sigma_t z
            x = coef1[i] * x0_hat + coef2[i] * x
            if noisy[i]:
                z = noise(step, x)
                if self.variance_type == "learned_range":
                    # log Sigma = v' log beta_t + (1 - v') log beta_tilde_t, v' = (v + 1) / 2  (Improved DDPM eq. 15)
                    x = x + torch.exp(0.5 * learned_log_variance(v, log_large[i], log_small[i])) * z
                else:
                    log_var = log_large[i] if self.variance_type == "fixed_large" else log_small[i]
                    x = x + math.exp(0.5 * log_var) * z
            if keep_every and i % keep_every == 0:
                kept.append(x.cpu())
        return (x, kept) if keep_every else x


@dataclass
class DDIMEquivalent(DiffusersEquivalent):
    """diffusers' DDIMScheduler: the DDIM update (eq. 12, 16) with diffusers' choice of previous step."""

    final_alpha_bar: float = 1.0

    @torch.no_grad()
    def sample(self, model: ModelFn, x_T: torch.Tensor, steps: int = 50, eta: float = 0.0, *,
               use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
               noises: Sequence[torch.Tensor] | None = None, model_kwargs: dict[str, Any] | None = None,
               progress: bool = False, keep_every: int | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """x_0 from x_T as diffusers' DDIMScheduler loop with ``set_timesteps(steps)`` and
        ``step(..., eta=eta, use_clipped_model_output=...)``; noise as in :meth:`DDPMEquivalent.sample`."""
        eta = check_eta(eta)
        ts = self.timesteps(steps)  # descending
        T = self.diffusion.T
        ab = self.diffusion.alpha_bar.tolist()
        stride = T // steps
        noise = _noise_source(generator, noises, len(ts))
        model_ts = ts.to(x_T.device)
        kw = model_kwargs or {}
        x = x_T
        kept = [x.cpu()] if keep_every else []
        for k, t in enumerate(tqdm(ts.tolist(), desc="DDIM (diffusers) sampling", disable=not progress, leave=False)):
            # diffusers' previous step is one stride T // K back, whatever the spacing
            prev = t - stride
            a_t = ab[t]
            a_prev = ab[prev] if prev >= 0 else self.final_alpha_bar
            out = model(x, model_ts[k].expand(x.shape[0]), **kw)
            pred, _ = self.diffusion.split_output(out, x)
            x0_hat, eps_hat = x0_eps_from_prediction(pred, x, self.diffusion.prediction, a_t)
            x0_hat = self._x0_clipped(x0_hat)
            if use_clipped_model_output:
                eps_hat = (x - math.sqrt(a_t) * x0_hat) / math.sqrt(1.0 - a_t)
            sigma = ddim_sigma(a_t, a_prev, eta)
            z = noise(k, x) if eta > 0 else None
            # x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z
            x = ddim_step(x0_hat, eps_hat, a_prev, sigma, z)
            i = len(ts) - 1 - k
            if keep_every and i % keep_every == 0:
                kept.append(x.cpu())
        return (x, kept) if keep_every else x


def _options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in SPACING_FROM_DIFFUSERS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {tuple(SPACING_FROM_DIFFUSERS)}")
    return {"timestep_spacing": spacing, "steps_offset": int(cfg.get("steps_offset", 0)),
            "threshold": Threshold.from_diffusers_config(cfg)}


def ddpm_from_diffusers_config(config: Mapping[str, Any], alpha_bar: torch.Tensor | None = None) -> DDPMEquivalent:
    """The DDPMEquivalent of a diffusers ``DDPMScheduler`` config (a dict, e.g. a ``scheduler_config.json``);
    ``alpha_bar``: the scheduler's ``alphas_cumprod`` if there is one, else computed from the config."""
    vt = config.get("variance_type", "fixed_small")
    if vt not in VARIANCE_FROM_DIFFUSERS:
        raise NotImplementedError(f"variance_type {vt!r} is not converted; supported: "
                                  f"{', '.join(VARIANCE_FROM_DIFFUSERS)}")
    return DDPMEquivalent(diffusion_from_diffusers_config(config, alpha_bar, VARIANCE_FROM_DIFFUSERS[vt]),
                          variance_type=vt, **_options(config))


def ddim_from_diffusers_config(config: Mapping[str, Any], alpha_bar: torch.Tensor | None = None) -> DDIMEquivalent:
    """The DDIMEquivalent of a diffusers ``DDIMScheduler`` config (as :func:`ddpm_from_diffusers_config`)."""
    diffusion = diffusion_from_diffusers_config(config, alpha_bar)
    final = 1.0 if config.get("set_alpha_to_one", True) else float(diffusion.alpha_bar[0])
    return DDIMEquivalent(diffusion, final_alpha_bar=final, **_options(config))


def from_diffusers_ddpm_scheduler(scheduler: Any) -> DDPMEquivalent:
    """The DDPMEquivalent of a diffusers ``DDPMScheduler`` (registered in ``interop.DIFFUSERS``)."""
    try:
        return ddpm_from_diffusers_config(scheduler.config, scheduler.alphas_cumprod)
    except ScheduleError as err:
        raise ScheduleError(f"{type(scheduler).__name__}: {err}") from err


def from_diffusers_ddim_scheduler(scheduler: Any) -> DDIMEquivalent:
    """The DDIMEquivalent of a diffusers ``DDIMScheduler`` (registered in ``interop.DIFFUSERS``)."""
    try:
        return ddim_from_diffusers_config(scheduler.config, scheduler.alphas_cumprod)
    except ScheduleError as err:
        raise ScheduleError(f"{type(scheduler).__name__}: {err}") from err
