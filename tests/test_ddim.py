"""DDIM (chapter 03): eq. 12 / 16, the eta = 1 equivalence with DDPM, inversion, predictions, spacing,
interpolation and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.process import GaussianDiffusion
from diffusion_core.process.respacing import space_timesteps
from diffusion_core.samplers import ddim_invert, ddim_sample, ddim_sigma, ddim_step, ddpm_sample, lerp, slerp
from diffusion_core.samplers.ddim import sampling_timesteps


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic nonlinear function of (x, t), shaped like x."""
    f = (1.0 + torch.cos(t.to(x.dtype) / 37.0)).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(1.3 * x.flip(1) * f + 0.1)


def x_T(shape=(3, 2, 4, 4), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- eta = 1 is DDPM on the subsequence
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_eta_one_equals_ddpm_ancestral_on_the_respaced_process(prediction):
    d = GaussianDiffusion.from_schedule("cosine", T=200, prediction=prediction)
    tau = space_timesteps(200, 12, "quadratic")
    ours, traj = ddim_sample(toy_model, d, x_T(), eta=1.0, timesteps=tau, progress=False, keep_every=1,
                             generator=torch.Generator().manual_seed(5))
    ref, ref_traj = ddpm_sample(toy_model, d.respace(tau), x_T(), progress=False, keep_every=1,
                                generator=torch.Generator().manual_seed(5))
    assert len(traj) == len(ref_traj) == 13
    for a, b in zip(traj, ref_traj):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_eta_one_step_mean_and_std_are_those_of_p_mean_variance():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    tau = torch.tensor([3, 20, 41, 70, 99])
    r = d.respace(tau)
    x = x_T()
    for i in range(1, 5):  # every step but the last, which lands on alpha_bar = 1 with sigma = 0
        a_t, a_prev = float(d.alpha_bar[tau[i]]), float(d.alpha_bar[tau[i - 1]])
        sigma = ddim_sigma(a_t, a_prev, 1.0)
        p = r.p_mean_variance(toy_model(x, tau[i].expand(3)), x, torch.full((3,), i), clip_denoised=False)
        # sigma_t(1)^2 = beta_tilde_t of the respaced process
        assert sigma**2 == pytest.approx(float(r.posterior_variance[i]), rel=1e-12)
        torch.testing.assert_close(torch.full_like(x, sigma), (0.5 * p.log_variance).exp(), rtol=1e-12, atol=0)
        torch.testing.assert_close(ddim_step(p.x0, p.eps, a_prev, sigma), p.mean, rtol=1e-12, atol=1e-12)
    assert ddim_sigma(float(d.alpha_bar[tau[0]]), 1.0, 1.0) == 0.0


def test_eta_one_one_step_samples_have_the_ddpm_mean_and_std():
    """In distribution: many samples of the first DDIM step (eta = 1) against p(x_{t-1} | x_t)."""
    d = GaussianDiffusion.from_schedule("linear", T=100)
    tau = torch.tensor([10, 50, 99])
    x = torch.full((20_000, 1), 0.7, dtype=torch.float64)
    _, traj = ddim_sample(toy_model, d, x, eta=1.0, timesteps=tau, progress=False, keep_every=1,
                          generator=torch.Generator().manual_seed(0), clip_denoised=False)
    p = d.respace(tau).p_mean_variance(toy_model(x[:1], torch.tensor([99])), x[:1], torch.tensor([2]), clip_denoised=False)
    step = traj[1]
    assert step.mean().item() == pytest.approx(p.mean.item(), abs=4 * math.exp(0.5 * p.log_variance.item()) / 141)
    assert step.std().item() == pytest.approx(math.exp(0.5 * p.log_variance.item()), rel=0.03)


def test_sigma_formula_matches_eq16():
    a_t, a_prev, eta = 0.3, 0.6, 0.7
    expected = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    assert ddim_sigma(a_t, a_prev, eta) == pytest.approx(expected, rel=1e-14)
    assert ddim_sigma(a_t, a_prev, 0.0) == 0.0


# ----------------------------------------------------------------------------- eta = 0
def test_eta_zero_is_deterministic_and_ignores_the_generator():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    a = ddim_sample(toy_model, d, x_T(), 10, progress=False, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(toy_model, d, x_T(), 10, progress=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0  # the last step returns the clipped x0_hat


def test_eta_zero_step_is_the_ode_update_eq13():
    """x_{t-1} / sqrt(a_{t-1}) = x_t / sqrt(a_t) + (sqrt((1-a_{t-1})/a_{t-1}) - sqrt((1-a_t)/a_t)) eps."""
    x, eps = x_T(seed=1), x_T(seed=2)
    a_t, a_prev = 0.2, 0.5
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    lhs = ddim_step(x0, eps, a_prev) / math.sqrt(a_prev)
    rhs = x / math.sqrt(a_t) + (math.sqrt((1 - a_prev) / a_prev) - math.sqrt((1 - a_t) / a_t)) * eps
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_x0_and_v_networks_give_the_eps_networks_samples(prediction):
    """The same function, reparameterised as an x0- or v-prediction, samples identically."""
    d_eps = GaussianDiffusion.from_schedule("linear", T=100)
    d = GaussianDiffusion.from_schedule("linear", T=100, prediction=prediction)

    def converted(x, t):
        eps = toy_model(x, t)
        a = d.alpha_bar[t].reshape(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return x0 if prediction == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0

    for eta in (0.0, 0.5):
        kw = dict(eta=eta, progress=False, clip_denoised=True)
        a = ddim_sample(toy_model, d_eps, x_T(), 8, generator=torch.Generator().manual_seed(0), **kw)
        b = ddim_sample(converted, d, x_T(), 8, generator=torch.Generator().manual_seed(0), **kw)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_learned_variance_model_uses_only_the_eps_half():
    d = GaussianDiffusion.from_schedule("cosine", T=100)
    d_learned = GaussianDiffusion.from_schedule("cosine", T=100, variance="learned_range")

    def learned(x, t):
        return torch.cat([toy_model(x, t), torch.rand_like(x) * 2 - 1], dim=1)

    a = ddim_sample(toy_model, d, x_T(), 10, eta=0.3, generator=torch.Generator().manual_seed(0), progress=False)
    b = ddim_sample(learned, d_learned, x_T(), 10, eta=0.3, generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_respaced_diffusion_passes_training_timesteps_to_the_network():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    r = d.respace(torch.arange(0, 100, 10))  # a 10-step process whose network saw t = 0, 10, ..., 90
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return toy_model(x, t)

    out_r = ddim_sample(model, r, x_T(), 5, timesteps=[1, 3, 5, 7, 9], progress=False)
    assert seen == [90, 70, 50, 30, 10]
    out_d = ddim_sample(toy_model, d, x_T(), timesteps=[10, 30, 50, 70, 90], progress=False)
    torch.testing.assert_close(out_r, out_d, rtol=1e-12, atol=1e-12)


def test_keep_every_returns_the_trajectory_from_x_T_to_x_0():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    x, traj = ddim_sample(toy_model, d, x_T(), 10, progress=False, keep_every=5)
    assert len(traj) == 3 and torch.equal(traj[0], x_T()) and torch.equal(traj[-1], x)


# ----------------------------------------------------------------------------- inversion
MUS = torch.tensor([[0.5, 0.5], [-0.5, 0.4], [0.0, -0.6]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
S2 = 0.1**2


def mixture_eps(d: GaussianDiffusion):
    """The exact E[eps | x_t] for data from a 2-D mixture of three Gaussians N(mu_k, 0.1^2 I):
    x_t | k ~ N(sqrt(a) mu_k, (a s^2 + 1 - a) I), eps_hat = sqrt(1 - a) sum_k r_k(x) (x - sqrt(a) mu_k) / v."""
    def model(x, t):
        a = d.alpha_bar[t].to(x.dtype).reshape(-1, 1, 1)
        diff = x[:, None, :] - a.sqrt() * MUS
        v = a * S2 + 1 - a
        logp = WEIGHTS.log() - 0.5 * (diff**2).sum(-1) / v[..., 0] - v[..., 0].log()
        r = logp.softmax(-1)[..., None]
        return (1 - a[:, 0]).sqrt() * (r * diff / v).sum(1)
    return model


def test_invert_then_sample_reconstructs_x0_better_with_more_steps():
    d = GaussianDiffusion.from_schedule("linear", T=1000)
    model = mixture_eps(d)
    g = torch.Generator().manual_seed(0)
    x0 = MUS[torch.multinomial(WEIGHTS, 64, replacement=True, generator=g)]
    x0 = x0 + 0.1 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    errors = []
    for steps in (10, 40, 160):
        xT = ddim_invert(model, d, x0, steps, progress=False)
        rec = ddim_sample(model, d, xT, steps, clip_denoised=False, progress=False)
        # the median distance: a few points between two modes, where the flow splits, converge slowest
        errors.append((rec - x0).norm(dim=1).median().item())
    assert errors[0] > 2 * errors[1] > 4 * errors[2]  # roughly first order in the step size
    assert errors[2] < 0.02
    assert 0.9 < xT.std().item() < 1.1  # the encoding looks like N(0, I)


def test_invert_trajectory_and_errors():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    x0 = x_T(seed=3).clamp(-1, 1)
    xT, traj = ddim_invert(toy_model, d, x0, 10, progress=False, keep_every=5)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], xT) and len(traj) == 3
    with pytest.raises(ValueError, match="exceeds"):
        ddim_invert(toy_model, d, x0, 101, progress=False)


# ----------------------------------------------------------------------------- errors
def test_bad_input_is_rejected_clearly():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    with pytest.raises(ValueError, match="exceeds the process's T = 100"):
        ddim_sample(toy_model, d, x_T(), 101, progress=False)
    with pytest.raises(ValueError, match="positive integer"):
        ddim_sample(toy_model, d, x_T(), 0, progress=False)
    with pytest.raises(ValueError, match="eta must be"):
        ddim_sample(toy_model, d, x_T(), 10, eta=-0.1, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        ddim_sample(toy_model, d, x_T(), timesteps=[5, 5, 9], progress=False)
    with pytest.raises(ValueError, match="0..99"):
        ddim_sample(toy_model, d, x_T(), timesteps=[5, 100], progress=False)
    with pytest.raises(ValueError, match="batched"):
        ddim_sample(toy_model, d, torch.zeros(5), 10, progress=False)
    with pytest.raises(ValueError, match="keep_every"):
        ddim_sample(toy_model, d, x_T(), 10, progress=False, keep_every=0)
    with pytest.raises(ValueError, match="model output has shape"):
        ddim_sample(lambda x, t: x[:, :1], d, x_T(), 10, progress=False)
    with pytest.raises(ValueError, match="too large"):
        ddim_sample(toy_model, d, x_T(), 10, eta=5.0, progress=False)


def test_samplers_refuse_nan_noise_boolean_steps_and_bad_keep_every():
    d = GaussianDiffusion.from_schedule("linear", T=20)
    nan = x_T().clone()
    nan[0, 0, 0, 0] = float("nan")
    for sample in (lambda x, **kw: ddim_sample(toy_model, d, x, 5, progress=False, **kw),
                   lambda x, **kw: ddpm_sample(toy_model, d, x, progress=False, **kw)):
        with pytest.raises(ValueError, match="NaN or infinity"):
            sample(nan)  # before: NaN samples
        with pytest.raises(ValueError, match="keep_every"):
            sample(x_T(), keep_every=-1)  # before (DDPM): every step kept
        with pytest.raises(ValueError, match="float tensor"):
            sample(torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="positive integer"):
        ddim_sample(toy_model, d, x_T(), True, progress=False)  # before: one step
    with pytest.raises(ValueError, match="integers"):
        ddim_sample(toy_model, d, x_T(), None, timesteps=torch.tensor([True, False, True]), progress=False)
    with pytest.raises(ValueError, match="alpha must be finite"):
        slerp(x_T(seed=1), x_T(seed=2), float("nan"))  # before: NaN


# ----------------------------------------------------------------------------- spacing
@pytest.mark.parametrize("kind", ["uniform", "leading", "trailing", "quadratic"])
@pytest.mark.parametrize("T,K", [(1000, 1), (1000, 10), (1000, 999), (1000, 1000), (7, 3), (100, 29)])
def test_space_timesteps_gives_K_distinct_ascending_steps(kind, T, K):
    ts = space_timesteps(T, K, kind)
    assert ts.shape == (K,) and ts.dtype == torch.long
    assert int(ts.min()) >= 0 and int(ts.max()) <= T - 1
    assert bool((ts[1:] > ts[:-1]).all())
    if kind == "trailing" or (kind in ("uniform", "quadratic") and K > 1):
        assert int(ts[-1]) == T - 1


def test_space_timesteps_known_values():
    assert space_timesteps(1000, 4, "uniform").tolist() == [0, 333, 666, 999]
    assert space_timesteps(1000, 4, "leading").tolist() == [0, 250, 500, 750]
    assert space_timesteps(1000, 4, "leading", offset=1).tolist() == [1, 251, 501, 751]
    assert space_timesteps(1000, 4, "trailing").tolist() == [249, 499, 749, 999]
    assert space_timesteps(1000, 4, "quadratic").tolist() == [0, 111, 444, 999]
    with pytest.raises(ValueError, match="K = 11"):
        space_timesteps(10, 11)
    with pytest.raises(ValueError, match="unknown spacing"):
        space_timesteps(10, 5, "cubic")
    with pytest.raises(ValueError, match="only applies"):
        space_timesteps(10, 5, "trailing", offset=1)
    with pytest.raises(ValueError, match="past T - 1"):
        space_timesteps(10, 10, "leading", offset=1)


def test_a_negative_or_fractional_offset_is_refused_not_a_timestep_of_minus_one():
    with pytest.raises(ValueError, match=r"offset \(steps_offset\) must be an integer >= 0, got -1"):
        space_timesteps(1000, 4, "leading", offset=-1)  # before: [-1, 249, 499, 749]
    with pytest.raises(ValueError, match="integer >= 0"):
        space_timesteps(1000, 4, "leading", offset=0.5)  # before: truncated to [0, 250, 500, 750]


def test_sampling_timesteps_sorts_a_given_subsequence():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    assert sampling_timesteps(d, None, [90, 10, 50]).tolist() == [10, 50, 90]
    assert sampling_timesteps(d, 5, spacing="leading").tolist() == [0, 20, 40, 60, 80]


# ----------------------------------------------------------------------------- interpolation
def test_slerp_endpoints_and_lerp_midpoint():
    z0, z1 = x_T((2, 3, 4, 4), 1), x_T((2, 3, 4, 4), 2)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    torch.testing.assert_close(lerp(z0, z1, 0.5), (z0 + z1) / 2)


def test_slerp_preserves_the_norm_of_orthogonal_equal_norm_vectors():
    z0 = torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    z1 = torch.tensor([0.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    alphas = torch.linspace(0, 1, 11, dtype=torch.float64)
    path = slerp(z0, z1, alphas)
    assert path.shape == (11, 4)
    torch.testing.assert_close(path.norm(dim=1), torch.full((11,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(path[5], torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64) * 3 / math.sqrt(2))
    assert lerp(z0, z1, alphas).norm(dim=1)[5].item() == pytest.approx(3 / math.sqrt(2))  # lerp shrinks


def test_slerp_alpha_vector_broadcasts_against_rows():
    z0, z1 = x_T((1, 3, 4, 4), 1), x_T((1, 3, 4, 4), 2)
    alphas = torch.tensor([0.0, 0.25, 1.0])
    path = slerp(z0, z1, alphas)
    assert path.shape == (3, 3, 4, 4)
    torch.testing.assert_close(path[0], z0[0])
    torch.testing.assert_close(path[2], z1[0])
    torch.testing.assert_close(path[1:2], slerp(z0, z1, 0.25))
    pairs = slerp(x_T((3, 5), 3), x_T((3, 5), 4), alphas)  # one alpha per row
    torch.testing.assert_close(pairs[1], slerp(x_T((3, 5), 3)[1:2], x_T((3, 5), 4)[1:2], 0.25)[0])
    with pytest.raises(ValueError, match="broadcast"):
        slerp(x_T((2, 5), 3), x_T((2, 5), 4), alphas)
    with pytest.raises(ValueError, match="same shape"):
        slerp(z0, x_T((2, 3, 4, 4)), 0.5)


def test_slerp_of_parallel_vectors_falls_back_to_lerp():
    z = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(slerp(z, 2 * z, 0.5), 1.5 * z)
    assert torch.isfinite(slerp(z, -z, 0.5)).all()
