"""The Gaussian diffusion process: one class owns the schedule and everything derived from it.

Chapter 01 (DDPM, Ho et al. 2020) defines the process; chapter 02 (Improved DDPM) adds learned
variances and L_hybrid; chapter 03 (DDIM) reuses the same quantities. Every derived quantity is
computed once, in float64, and looked up per timestep with :meth:`GaussianDiffusion.at`.

Notation: t in 0..T-1; x0 is data in [-1, 1]; xt ~ q(x_t | x_0); eps ~ N(0, I). The array index t
holds the paper's step t + 1 (chapter 01's notation box); the formulas below are the paper's, 1-based.

    q(x_t | x_0)          = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I )                  (DDPM eq. 4)
    q(x_{t-1} | x_t, x_0) = N( mu_tilde_t(x_t, x_0), beta_tilde_t I )                         (DDPM eq. 6-7)
        mu_tilde_t  = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                      + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
        beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    p(x_{t-1} | x_t)      = N( mu_theta(x_t, t), Sigma_theta(x_t, t) )
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import batch_randint, batch_randn
from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl, to_bits_per_dim
from .parameterization import learned_log_variance
from .schedules import check_betas, make_betas
from .thresholding import ThresholdLike, resolve_threshold

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("simple", "vlb", "hybrid")

ModelFn = Callable[..., torch.Tensor]


@dataclass
class ModelPrediction:
    """What p(x_{t-1} | x_t) is built from: the mean, the (log) variance and the implied x0 and eps."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor


class GaussianDiffusion:
    """The forward process q and the model's reverse process p for a schedule ``betas``.

    Args:
        betas: (T,) the variances beta_t, each in (0, 1).
        prediction: what the network outputs: ``eps`` (DDPM), ``x0`` or ``v`` (Salimans & Ho 2022,
            v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0).
        variance: ``fixed_small`` (sigma_t^2 = beta_tilde_t), ``fixed_large`` (sigma_t^2 = beta_t), or
            ``learned_range`` (Improved DDPM eq. 15: the network's second half v in [-1, 1] gives
            Sigma = exp(v' log beta_t + (1 - v') log beta_tilde_t) with v' = (v + 1) / 2).
        timestep_map: the training timestep the network sees at each step; set by :meth:`respace`.
    """

    def __init__(self, betas: torch.Tensor | Sequence[float], prediction: str = "eps",
                 variance: str = "fixed_small", timestep_map: torch.Tensor | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
        self.prediction = prediction
        self.variance = variance
        b = check_betas(torch.as_tensor(betas, dtype=torch.float64))
        self.T = T = b.numel()
        self.timestep_map = torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map).long()
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {tuple(self.timestep_map.shape)}")

        # alpha_t = 1 - beta_t;  alpha_bar_t = prod_{s<=t} alpha_s
        self.betas = b
        self.alphas = 1.0 - b
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.sqrt_recip_alpha_bar = (1.0 / self.alpha_bar).sqrt()
        self.sqrt_recipm1_alpha_bar = (1.0 / self.alpha_bar - 1.0).sqrt()
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t   (zero at t = 0)
        self.posterior_variance = b * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        # beta_tilde with its t = 0 value (zero) replaced by t = 1's, so that its log stays finite
        beta_tilde_for_log = self.posterior_variance.clone()
        if T > 1:
            beta_tilde_for_log[0] = self.posterior_variance[1]
        else:
            beta_tilde_for_log[0] = b[0]
        self.posterior_log_variance_clipped = beta_tilde_for_log.log()
        # mu_tilde_t = coef1 * x_0 + coef2 * x_t
        self.posterior_mean_coef1 = b * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef2 = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)
        # fixed_large uses beta_t, with beta_tilde_1 at t = 0 for a better decoder (Ho et al.'s code)
        self.large_variance = torch.cat([beta_tilde_for_log[:1], b[1:]])
        self.log_betas = b.log()
        self.log_large_variance = self.large_variance.log()
        self.one_minus_alpha_bar = 1.0 - self.alpha_bar
        self.log_one_minus_alpha_bar = torch.log1p(-self.alpha_bar)
        # the tables above: only these are copied to a device once and cached (see `at`)
        self._table_names = tuple(k for k, v in vars(self).items() if torch.is_tensor(v))
        self._device_cache: dict = {}

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_schedule(cls, name: str = "linear", T: int = 1000, prediction: str = "eps",
                      variance: str = "fixed_small", **schedule_kwargs: float) -> GaussianDiffusion:
        """``GaussianDiffusion.from_schedule("cosine", T=1000)``; see :func:`schedules.make_betas`."""
        return cls(make_betas(name, T, **schedule_kwargs), prediction=prediction, variance=variance)

    def respace(self, timesteps: Sequence[int] | torch.Tensor) -> GaussianDiffusion:
        """The process restricted to a subsequence of the training timesteps (Improved DDPM Sec. 4).

        With S = {s_0 < ... < s_{K-1}} kept, alpha_bar is unchanged on S and the new betas are
        beta'_k = 1 - alpha_bar_{s_k} / alpha_bar_{s_{k-1}}; the network still sees s_k.
        """
        ts = torch.as_tensor(list(timesteps) if not torch.is_tensor(timesteps) else timesteps)
        if ts.is_floating_point() or ts.dtype == torch.bool:
            raise TypeError(f"respaced timesteps must be integers in 0..{self.T - 1}, got dtype {ts.dtype} "
                            "(fractional timesteps would be truncated)")
        ts = torch.unique(ts.long())  # sorted, unique
        if ts.numel() == 0 or ts.min() < 0 or ts.max() >= self.T:
            raise ValueError(f"respaced timesteps must be a non-empty subset of 0..{self.T - 1}")
        ab = self.alpha_bar[ts]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return GaussianDiffusion(1.0 - ab / ab_prev, self.prediction, self.variance, self.timestep_map[ts])

    def model_channels(self, data_channels: int) -> int:
        """How many channels the network must output: twice the data's for learned variance."""
        return 2 * data_channels if self.variance == "learned_range" else data_channels

    # ----------------------------------------------------------------------------- helpers
    def at(self, arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as a float tensor of x's dtype and device, shaped (B, 1, ..., 1) to broadcast.

        The process's own tables are copied to each (device, dtype) once and cached; any other
        ``arr`` (computed by the caller) is converted on every call and never cached, so the cache
        holds at most one copy per table, device and dtype."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        key = (id(arr), x.device, dtype)
        table = self._device_cache.get(key)
        if table is None or table[0] is not arr:
            converted = arr.to(device=x.device, dtype=dtype)
            if any(getattr(self, name, None) is arr for name in self._table_names):  # one copy per table, made once
                self._device_cache[key] = (arr, converted)
            table = (arr, converted)
        return table[1][t.to(x.device)].reshape(-1, *([1] * (x.ndim - 1)))

    def check_t(self, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """Validate timesteps: integers in 0..T-1, shape (B,) with B = x.shape[0] (a scalar broadcasts).

        The range check reads t back from the device; samplers that build t themselves skip it
        inside :meth:`p_mean_variance` with ``check=False``.
        """
        t = torch.as_tensor(t, device=x.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"timesteps t must be integers in 0..T-1, got a {t.dtype} tensor")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}")
        if t.numel() and (t.min() < 0 or t.max() >= self.T):
            raise ValueError(f"timestep out of range: t must lie in 0..{self.T - 1}, got "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t.long()

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network was trained with for step t (differs after :meth:`respace`)."""
        return self.timestep_map.to(t.device)[t]

    def sample_t(self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1}, one per example (under several processes, this process's rows of
        the global batch's draw: :func:`diffusion_core.distributed.batch_randint`)."""
        gen_device = generator.device if generator is not None else "cpu"
        return batch_randint(0, self.T, (batch,), generator=generator, device=gen_device).to(device)

    # ----------------------------------------------------------------------------- forward process q
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I ): (mean, variance, log_variance)."""
        t = self.check_t(t, x0)
        mean = self.at(self.sqrt_alpha_bar, t, x0) * x0
        var = self.at(self.one_minus_alpha_bar, t, x0)
        return mean, var, self.at(self.log_one_minus_alpha_bar, t, x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample q(x_t | x_0) in one shot:  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        t = self.check_t(t, x0)
        if eps is None:
            eps = randn_like(x0, generator)
        elif eps.shape != x0.shape:
            raise ValueError(f"eps must have x0's shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
        return self.at(self.sqrt_alpha_bar, t, x0) * x0 + self.at(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N( mu_tilde_t, beta_tilde_t I ): (mean, variance, clipped log variance)."""
        if x0.shape != xt.shape:
            raise ValueError(f"x0 and xt must have the same shape, got {tuple(x0.shape)} and {tuple(xt.shape)}")
        t = self.check_t(t, xt)
        mean = self.at(self.posterior_mean_coef1, t, xt) * x0 + self.at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self.at(self.posterior_variance, t, xt), self.at(self.posterior_log_variance_clipped, t, xt)

    # ----------------------------------------------------------------------------- parameterisations
    def x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = ( x_t - sqrt(1 - alpha_bar_t) eps ) / sqrt(alpha_bar_t)."""
        return self.at(self.sqrt_recip_alpha_bar, t, xt) * xt - self.at(self.sqrt_recipm1_alpha_bar, t, xt) * eps

    def eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = ( x_t - sqrt(alpha_bar_t) x_0 ) / sqrt(1 - alpha_bar_t)."""
        return (self.at(self.sqrt_recip_alpha_bar, t, xt) * xt - x0) / self.at(self.sqrt_recipm1_alpha_bar, t, xt)

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0."""
        return self.at(self.sqrt_alpha_bar, t, x0) * eps - self.at(self.sqrt_one_minus_alpha_bar, t, x0) * x0

    def x0_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        return self.at(self.sqrt_alpha_bar, t, xt) * xt - self.at(self.sqrt_one_minus_alpha_bar, t, xt) * v

    def split_output(self, model_output: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split the network output into its prediction and (learned variance only) the v channels."""
        C = xt.shape[1]
        expected = self.model_channels(C)
        if model_output.shape[0] != xt.shape[0] or model_output.shape[1] != expected or model_output.shape[2:] != xt.shape[2:]:
            raise ValueError(
                f"the model output has shape {tuple(model_output.shape)}, expected "
                f"{(xt.shape[0], expected, *xt.shape[2:])} for {self.variance} variance with {C}-channel data")
        if self.variance == "learned_range":
            return model_output[:, :C], model_output[:, C:]
        return model_output, None

    def predict_x0_eps(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) implied by the network's prediction of ``self.prediction``."""
        if self.prediction == "eps":
            return self.x0_from_eps(xt, t, pred), pred
        if self.prediction == "x0":
            return pred, self.eps_from_x0(xt, t, pred)
        x0 = self.x0_from_v(xt, t, pred)
        # eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v
        return x0, self.at(self.sqrt_one_minus_alpha_bar, t, xt) * xt + self.at(self.sqrt_alpha_bar, t, xt) * pred

    # ----------------------------------------------------------------------------- reverse process p
    def p_mean_variance(self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True, threshold: ThresholdLike = None,
                        check: bool = True) -> ModelPrediction:
        """p(x_{t-1} | x_t) = N( mu_theta, Sigma_theta ) from the network's output at (x_t, t).

        mu_theta = mu_tilde_t(x_t, x0_hat): the posterior mean with x_0 replaced by its prediction,
        which for eps-prediction equals 1/sqrt(alpha_t) ( x_t - beta_t / sqrt(1 - alpha_bar_t) eps )
        (DDPM eq. 11) when x0_hat is not clipped. ``clip_denoised`` clips x0_hat to [-1, 1];
        ``threshold`` (``"none"``, ``"static"``, ``"dynamic"``: Imagen's dynamic thresholding,
        chapter 13, a :class:`~diffusion_core.process.thresholding.Threshold` or any callable) replaces
        it when given (:func:`~diffusion_core.process.thresholding.resolve_threshold`); eps is then
        re-derived from the transformed x0_hat.
        """
        x0_fn = resolve_threshold(threshold, clip_denoised)
        if check:
            t = self.check_t(t, xt)
        pred, v = self.split_output(model_output, xt)
        if self.variance == "fixed_small":
            log_var = self.at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        elif self.variance == "fixed_large":
            log_var = self.at(self.log_large_variance, t, xt).expand_as(xt)
        else:
            # log Sigma = v' log beta_t + (1 - v') log beta_tilde_t,  v' = (v + 1) / 2   (Improved DDPM eq. 15)
            log_var = learned_log_variance(v, self.at(self.log_betas, t, xt), self.at(self.posterior_log_variance_clipped, t, xt))
        x0, eps = self.predict_x0_eps(pred, xt, t)
        if x0_fn is not None:
            x0 = x0_fn(x0)
            eps = self.eps_from_x0(xt, t, x0)
        # mu_theta = mu_tilde_t(x_t, x0_hat) = coef1 * x0_hat + coef2 * x_t
        mean = self.at(self.posterior_mean_coef1, t, xt) * x0 + self.at(self.posterior_mean_coef2, t, xt) * xt
        return ModelPrediction(mean=mean, variance=log_var.exp(), log_variance=log_var, x0=x0, eps=eps)

    # ----------------------------------------------------------------------------- the bound and the losses
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL( q(x_T | x_0) || N(0, I) ) in bits per dimension, (B,)."""
        t = torch.full((x0.shape[0],), self.T - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return to_bits_per_dim(mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))))

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     clip_denoised: bool = False) -> torch.Tensor:
        """L_{t-1} in bits per dimension, (B,), for each sample's own t (DDPM eq. 5):

            t > 0:  KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) )
            t = 0:  -log p(x_0 | x_1)  with the discretised Gaussian decoder (DDPM eq. 13)
        """
        t = self.check_t(t, xt)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        p = self.p_mean_variance(model_output, xt, t, clip_denoised=clip_denoised)
        kl = to_bits_per_dim(mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)))
        nll = -to_bits_per_dim(mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)))
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: ModelFn, x0: torch.Tensor, t: torch.Tensor | None = None,
                        eps: torch.Tensor | None = None, loss: str = "simple", hybrid_lambda: float = 1e-3,
                        generator: torch.Generator | None = None, model_kwargs: dict[str, Any] | None = None
                        ) -> dict[str, torch.Tensor]:
        """Per-sample training losses, each (B,). ``t`` defaults to Uniform{0..T-1}.

        ``simple``: L_simple = || target - net(x_t, t) ||^2 averaged over dims (DDPM eq. 14), where the
                    target is eps, x0 or v according to ``prediction``.
        ``vlb``:    T * L_{t}, an unbiased one-sample estimate of the whole bound L_vlb in bits/dim
                    (gradients reach the mean and, when learned, the variance).
        ``hybrid``: L_simple + lambda * T * L_t with the mean stopped inside L_t, so the bound only
                    trains the variance (Improved DDPM Sec. 3.1, lambda = 0.001).
        """
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        if loss == "hybrid" and self.variance != "learned_range":
            raise ValueError("L_hybrid trains the variance: use variance='learned_range' with it")
        if x0.ndim < 2 or x0.shape[0] == 0:
            raise ValueError(f"x0 must be a non-empty batch, (B, ...), got shape {tuple(x0.shape)}")
        if not (math.isfinite(hybrid_lambda) and hybrid_lambda >= 0):
            raise ValueError(f"hybrid_lambda must be a finite number >= 0, got {hybrid_lambda!r}")
        t = self.sample_t(x0.shape[0], x0.device, generator) if t is None else self.check_t(t, x0)
        if eps is None:
            eps = randn_like(x0, generator)
        xt = self.q_sample(x0, t, eps)
        out = model(xt, self.model_t(t), **(model_kwargs or {}))
        pred, v = self.split_output(out, xt)
        target = {"eps": eps, "x0": x0, "v": self.v_target(x0, t, eps)}[self.prediction]
        terms = {"mse": mean_flat((target - pred) ** 2)}
        if loss == "simple":
            terms["loss"] = terms["mse"]
            return terms
        if loss == "hybrid":
            # stop-gradient on the mean: the bound sees the prediction as a constant
            out_for_vb = torch.cat([pred.detach(), v], dim=1)
        else:
            out_for_vb = out
        terms["vb"] = self.vb_terms_bpd(out_for_vb, x0, xt, t) * self.T
        terms["loss"] = terms["vb"] if loss == "vlb" else terms["mse"] + hybrid_lambda * terms["vb"]
        return terms


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x (a batch), drawn from ``generator`` (on its own device) if
    given; under several processes, this process's rows of the global batch's noise
    (:func:`diffusion_core.distributed.batch_randn`)."""
    if generator is None:
        return torch.randn_like(x)
    return batch_randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
