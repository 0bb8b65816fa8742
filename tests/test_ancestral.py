"""ddpm_sample (chapter 01, DDPM Algorithm 2): its loop, which reads the per-step coefficients once,
gives the samples of the straightforward loop through ``GaussianDiffusion.p_mean_variance``."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.process import GaussianDiffusion
from diffusion_core.process.gaussian import randn_like
from diffusion_core.samplers import ddpm_sample


def algorithm_2(model, diffusion, x_T, clip_denoised, generator, keep_every=1):
    """The reference: x_{t-1} = mu_theta(x_t, t) + sigma_t z, every quantity from p_mean_variance."""
    x, kept = x_T, [x_T]
    for i in range(diffusion.T - 1, -1, -1):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        p = diffusion.p_mean_variance(model(x, diffusion.model_t(t)), x, t, clip_denoised=clip_denoised)
        z = randn_like(x, generator) if i > 0 else torch.zeros_like(x)
        x = p.mean + (0.5 * p.log_variance).exp() * z
        if i % keep_every == 0:
            kept.append(x)
    return x, kept


def toy_model(channels: int):
    """A deterministic nonlinear function of (x, t) with ``channels`` output channels (2 C: learned
    variance, its second half in [-1, 1]); large enough that clipping x0_hat matters."""
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = (1.0 + torch.cos(t.to(x.dtype) / 37.0)).reshape(-1, *([1] * (x.ndim - 1)))
        out = torch.tanh(1.3 * x.flip(1) * f + 0.1) * 2.0
        return out if channels == x.shape[1] else torch.cat([out, torch.tanh(x * f - 0.2)], dim=1)
    return model


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip_denoised", [True, False])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddpm_sample_equals_the_straightforward_algorithm_2(variance, clip_denoised, prediction, dtype):
    d = GaussianDiffusion.from_schedule("cosine", T=300, prediction=prediction, variance=variance)
    d = d.respace(range(0, 300, 7))  # a timestep_map the network sees
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    model = toy_model(d.model_channels(2))
    ours, traj = ddpm_sample(model, d, x_T, clip_denoised=clip_denoised, progress=False, keep_every=5,
                             generator=torch.Generator().manual_seed(1))
    ref, ref_traj = algorithm_2(model, d, x_T, clip_denoised, torch.Generator().manual_seed(1), keep_every=5)
    assert ours.dtype == dtype and len(traj) == len(ref_traj) == 1 + len(range(0, d.T, 5))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for a, b in zip(traj, ref_traj):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if clip_denoised:
        assert ours.abs().max() <= 1.0 + 1e-6  # last step: x_0 = mu_1 with x0_hat clipped


def test_ddpm_sample_single_step_process_and_model_kwargs():
    d = GaussianDiffusion.from_schedule("linear", T=1, variance="fixed_large")
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []

    def model(x, t, *, scale):
        seen.append(t.tolist())
        return scale * x

    ours = ddpm_sample(model, d, x_T, progress=False, model_kwargs={"scale": 0.3})
    ref, _ = algorithm_2(lambda x, t: 0.3 * x, d, x_T, True, None)
    assert seen == [[0, 0]]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
