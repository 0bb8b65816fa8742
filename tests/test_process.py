"""The diffusion process: closed forms against Monte Carlo and Bayes, the bound's terms, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.process import (
    GaussianDiffusion,
    ScheduleError,
    bound_bpd,
    check_betas,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    linear_betas,
    log_snr,
    make_betas,
    normal_kl,
    snr,
)


def test_linear_schedule_matches_ddpm_endpoints():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert b.dtype == torch.float64


def test_cosine_schedule_alpha_bar_follows_the_cosine():
    T, s = 1000, 0.008
    ab = torch.cumprod(1 - cosine_betas(T, s), 0)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    expected = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    # identical until the clipping at beta = 0.999 changes the last steps
    assert torch.allclose(ab[:-5], expected[:-5], rtol=1e-9)


def test_snr_and_log_snr_agree():
    ab = torch.cumprod(1 - linear_betas(100), 0)
    assert torch.allclose(log_snr(ab), snr(ab).log())


@pytest.mark.parametrize("bad", [[0.0, 0.1], [0.1, 1.0], [-0.1], [float("nan")], []])
def test_schedule_outside_zero_one_is_rejected(bad):
    with pytest.raises(ScheduleError):
        check_betas(torch.tensor(bad, dtype=torch.float64))


def test_unknown_schedule_name_lists_the_known_ones():
    with pytest.raises(ScheduleError, match="cosine"):
        make_betas("quadratic-ish", 10)


def test_q_sample_matches_the_markov_chain():
    d = GaussianDiffusion(linear_betas(200))
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0.5, -0.9]], dtype=torch.float64)
    x = x0.expand(100_000, 2).clone()
    for t in range(120):
        x = (1 - d.betas[t]).sqrt() * x + d.betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean, var, _ = d.q_mean_variance(x0, torch.tensor([119]))
    assert torch.allclose(x.mean(0), mean[0], atol=6e-3)
    assert torch.allclose(x.var(0), var[0].expand(2), rtol=2e-2)


def test_posterior_matches_bayes_rule_on_a_grid():
    d = GaussianDiffusion(linear_betas(100))
    grid = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    for t, x0, xt in [(1, 0.3, -0.2), (40, -0.7, 0.5), (99, 0.9, 1.1)]:
        ab_prev = d.alpha_bar_prev[t]
        logw = -((grid - ab_prev.sqrt() * x0) ** 2) / (2 * (1 - ab_prev)) - (xt - d.alphas[t].sqrt() * grid) ** 2 / (2 * d.betas[t])
        w = torch.softmax(logw, 0)
        m = (w * grid).sum()
        v = (w * (grid - m) ** 2).sum()
        mean, var, _ = d.q_posterior_mean_variance(torch.tensor([[x0]], dtype=torch.float64),
                                                   torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t]))
        assert mean.item() == pytest.approx(m.item(), abs=1e-6)
        assert var.item() == pytest.approx(v.item(), rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_recover_x0_and_eps(prediction):
    d = GaussianDiffusion(linear_betas(50), prediction=prediction)
    x0 = torch.rand(4, 1, 3, 3, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 30, 49])
    xt = d.q_sample(x0, t, eps)
    target = {"eps": eps, "x0": x0, "v": d.v_target(x0, t, eps)}[prediction]
    x0_hat, eps_hat = d.predict_x0_eps(target, xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-8) and torch.allclose(eps_hat, eps, atol=1e-8)


def test_exact_eps_gives_the_true_posterior_mean():
    d = GaussianDiffusion(linear_betas(50))
    x0 = torch.rand(3, 1, 2, 2, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 20, 49])
    xt = d.q_sample(x0, t, eps)
    p = d.p_mean_variance(eps, xt, t, clip_denoised=False)
    true_mean, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    assert torch.allclose(p.mean, true_mean, atol=1e-10)


def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    m1, lv1, m2, lv2 = 0.2, -0.5, -0.4, 0.3
    z = m1 + math.exp(lv1 / 2) * torch.randn(1_000_000, generator=g, dtype=torch.float64)
    mc = (-0.5 * ((z - m1) ** 2 / math.exp(lv1) + lv1) + 0.5 * ((z - m2) ** 2 / math.exp(lv2) + lv2)).mean()
    closed = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2)))
    assert mc.item() == pytest.approx(closed.item(), abs=3e-3)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.99, -5.0), (-1.0, 0.0), (0.4, 2.0), (0.0, -8.0)])
def test_discretized_decoder_sums_to_one(mean, log_scale):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale)).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(p.log()).all() or (p > 0).any()


def test_fixed_variance_bound_term_is_weighted_eps_error():
    d = GaussianDiffusion(linear_betas(100), variance="fixed_large")
    x0 = torch.rand(5, 1, 2, 2, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 5, 30, 60, 99])
    xt = d.q_sample(x0, t, eps)
    eps_hat = eps + 0.2 * torch.randn_like(x0)
    vb = d.vb_terms_bpd(eps_hat, x0, xt, t) * math.log(2)
    beta, alpha, ab, s2, tilde = (d.at(q, t, x0).flatten() for q in
                                  (d.betas, d.alphas, d.alpha_bar, d.large_variance, d.posterior_variance))
    weighted = beta**2 / (2 * s2 * alpha * (1 - ab)) * ((eps - eps_hat) ** 2).flatten(1).mean(1)
    weighted += 0.5 * (torch.log(s2 / tilde) + tilde / s2 - 1)
    assert torch.allclose(vb, weighted, rtol=1e-8)


def test_full_bound_and_stratified_estimate_agree():
    # process.likelihood.bound_bpd, the one estimator of the bound (chapters 01 and 02)
    d = GaussianDiffusion(linear_betas(60), variance="fixed_large")
    x0 = (torch.rand(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 255).round() / 255 * 2 - 1

    def model(xt, t):  # a crude but fixed denoiser: eps estimate shrinks x_t
        return 0.5 * xt

    # every term summed (averaged over the noise of x_t too: each term is itself a one-draw estimate)
    full = torch.stack([bound_bpd(model, d, x0, exact=d.T, strata=0, seed=s)["total"] for s in range(30)])
    ests = torch.stack([bound_bpd(model, d, x0, exact=1, strata=10, seed=s)["total"] for s in range(200)])
    # the stratified estimator is unbiased: its average over seeds is close to the full sum
    # (standard errors of the two averages here: about 0.07 and 0.06 on 8.5 bits/dim)
    assert ests.mean().item() == pytest.approx(full.mean().item(), rel=0.05)


def test_respacing_keeps_alpha_bar_at_the_kept_steps():
    d = GaussianDiffusion(linear_betas(1000))
    kept = list(range(0, 1000, 10))
    r = d.respace(kept)
    assert r.T == 100
    assert torch.allclose(r.alpha_bar, d.alpha_bar[kept])
    assert r.model_t(torch.tensor([0, 99])).tolist() == [0, 990]


def test_hybrid_loss_stops_the_gradient_of_the_mean_inside_the_bound():
    d = GaussianDiffusion(linear_betas(20), variance="learned_range")
    x0 = torch.rand(4, 1, 2, 2) * 2 - 1
    w = torch.zeros(2, requires_grad=True)

    def model(xt, t):
        return torch.cat([w[0] * xt, torch.zeros_like(xt) + w[1]], 1)

    terms = d.training_losses(model, x0, loss="hybrid", generator=torch.Generator().manual_seed(0))
    (g_vb,) = torch.autograd.grad(terms["vb"].mean(), w, retain_graph=True)
    assert g_vb[0].item() == 0.0 and g_vb[1].item() != 0.0


@pytest.mark.parametrize("t", [torch.tensor([-1, 0]), torch.tensor([0, 20])])
def test_timestep_out_of_range_is_named(t):
    d = GaussianDiffusion(linear_betas(20))
    with pytest.raises(ValueError, match="timestep out of range"):
        d.q_sample(torch.zeros(2, 1, 2, 2), t)


def test_wrong_t_shape_and_float_t_are_rejected():
    d = GaussianDiffusion(linear_betas(20))
    with pytest.raises(ValueError, match="shape"):
        d.q_sample(torch.zeros(2, 1, 2, 2), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integers"):
        d.q_sample(torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]))


def test_model_output_with_wrong_channels_is_named():
    d = GaussianDiffusion(linear_betas(20), variance="learned_range")
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="learned_range"):
        d.p_mean_variance(torch.zeros(2, 3, 4, 4), x, torch.tensor([1, 2]))


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(linear_betas(10), prediction="score")
    with pytest.raises(ValueError, match="variance"):
        GaussianDiffusion(linear_betas(10), variance="learned")
    with pytest.raises(ValueError, match="hybrid"):
        GaussianDiffusion(linear_betas(10)).training_losses(lambda x, t: x, torch.zeros(2, 1, 2, 2), loss="hybrid")


def test_the_device_cache_holds_one_copy_per_table_however_many_calls():
    d = GaussianDiffusion.from_schedule("linear", T=50)
    x0, t = torch.randn(3, 2), torch.tensor([0, 10, 49])
    d.q_mean_variance(x0, t)
    d.q_sample(x0, t)
    size = len(d._device_cache)
    for _ in range(20):
        d.q_mean_variance(x0, t)  # before: one new entry per call (keyed by a fresh 1 - alpha_bar)
        d.q_sample(x0, t)
        d.at(d.alpha_bar * 2, t, x0)  # a caller's own array is converted, never cached
    assert len(d._device_cache) == size
    torch.testing.assert_close(d.at(d.alpha_bar * 2, t, x0).flatten(), (2 * d.alpha_bar[t]).float())
    d.at(d.betas, t, x0.double())  # another dtype: one more copy, once
    d.at(d.betas, t, x0.double())
    assert len(d._device_cache) == size + 1


def test_boolean_or_fractional_timesteps_are_refused_not_truncated():
    d = GaussianDiffusion(linear_betas(20))
    with pytest.raises(TypeError, match="integers"):
        d.q_sample(torch.zeros(2, 1, 2, 2), torch.tensor([True, False]))  # before: t = [1, 0]
    with pytest.raises(TypeError, match="respaced timesteps must be integers"):
        d.respace([0.5, 3.7, 19.0])  # before: silently the steps [0, 3, 19]
    with pytest.raises(TypeError, match="respaced timesteps must be integers"):
        d.respace(torch.tensor([True, False, True]))


def test_the_bound_refuses_data_outside_minus_one_one_and_bad_strata():
    d = GaussianDiffusion(linear_betas(20))

    def model(x, t):
        return torch.zeros_like(x)

    x01 = torch.rand(2, 1, 4, 4)  # images in [0, 1]: before, a number of bits/dim that meant nothing
    with pytest.raises(ValueError, match=r"x0 must be data in \[-1, 1\].*2 x - 1"):
        bound_bpd(model, d, x01 * 255, exact=1, strata=4)
    with pytest.raises(ValueError, match=r"x0 must be data in \[-1, 1\]"):
        bound_bpd(model, d, torch.full((2, 1, 4, 4), float("nan")), exact=1, strata=4)
    with pytest.raises(ValueError, match="strata"):
        bound_bpd(model, d, x01, exact=1, strata=2.5)  # before: an obscure TypeError from linspace
    with pytest.raises(ValueError, match="non-empty"):
        bound_bpd(model, d, torch.zeros(0, 1, 4, 4), exact=1, strata=4)  # before: a reshape error
    with pytest.raises(ValueError, match="non-empty"):
        d.training_losses(model, torch.zeros(0, 1, 4, 4))
    learned = GaussianDiffusion(linear_betas(20), variance="learned_range")
    with pytest.raises(ValueError, match="hybrid_lambda"):  # before: a NaN loss
        learned.training_losses(lambda x, t: torch.zeros(2, 2, 4, 4), x01, loss="hybrid", hybrid_lambda=float("nan"))
    assert torch.isfinite(bound_bpd(model, d, x01 * 2 - 1, exact=1, strata=4)["total"]).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_the_process_and_the_samplers_read_a_prediction_the_same_way(prediction):
    # GaussianDiffusion.predict_x0_eps (per-sample t, from the process's tables) and
    # process.parameterization.x0_eps_from_prediction (one step, alpha_bar a number) are one conversion
    from diffusion_core.process.parameterization import learned_log_variance, x0_eps_from_prediction
    d = GaussianDiffusion(linear_betas(50), prediction=prediction)
    g = torch.Generator().manual_seed(0)
    xt, pred = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    for step in (0, 17, 49):
        a, b = d.predict_x0_eps(pred, xt, torch.full((3,), step))
        c, e = x0_eps_from_prediction(pred, xt, prediction, float(d.alpha_bar[step]))
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6) and torch.allclose(b, e, rtol=1e-5, atol=1e-6)
    # eq. 15 at its ends: v = 1 gives beta_t, v = -1 gives beta_tilde_t
    v = torch.tensor([1.0, -1.0, 0.0])
    out = learned_log_variance(v, math.log(0.02), math.log(0.01))
    assert out.tolist() == pytest.approx([math.log(0.02), math.log(0.01), 0.5 * (math.log(0.02) + math.log(0.01))])


def test_chapter_01_respaces_as_the_other_chapters_do():
    from diffusion_core.experiments import ddpm as ch01
    from diffusion_core.process.respacing import space_timesteps
    d = GaussianDiffusion(linear_betas(1000))
    p = ch01.sampling_process(d, 100)
    assert p.T == 100 and torch.equal(p.timestep_map, space_timesteps(1000, 100, "uniform"))
    assert p.timestep_map[0] == 0 and p.timestep_map[-1] == 999          # both ends, unlike "leading" (0..990)
    assert ch01.sampling_process(d, 1000) is d
