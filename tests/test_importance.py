"""Importance-sampled timesteps (Improved DDPM Sec. 3.3): warm-up, unbiasedness, preference, errors."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.process.importance import ImportanceSampler, UniformSampler

T = 50
# a synthetic L_t that falls by four orders of magnitude over t, like the real terms of L_vlb
L = 1e2 * torch.exp(-torch.arange(T, dtype=torch.float64) / 5.0) + 1e-2


def warmed_sampler(history: int = 10) -> ImportanceSampler:
    s = ImportanceSampler(T, history=history)
    for _ in range(history):
        s.update(torch.arange(T), L)
    return s


def test_uniform_until_every_t_has_a_full_history():
    s = ImportanceSampler(T)
    s.update(torch.arange(T - 1).repeat(10), L[:-1].repeat(10))  # t = T-1 never seen
    assert not s.warmed_up
    assert torch.allclose(s.probs(), torch.full((T,), 1.0 / T, dtype=torch.float64))
    t, w = s.sample(64, torch.Generator().manual_seed(0))
    assert torch.all(w == 1.0)
    s.update(torch.full((10,), T - 1), torch.full((10,), float(L[-1])))
    assert s.warmed_up


def test_probs_follow_root_mean_square_loss_with_uniform_mix():
    s = warmed_sampler()
    p = s.probs()
    expected = 0.999 * L / L.sum() + 1e-3 / T  # sqrt(E[L_t^2]) = L_t for a constant history
    assert torch.allclose(p, expected, rtol=1e-12)
    assert abs(p.sum().item() - 1.0) < 1e-12
    assert p.min() >= 1e-3 / T  # nobody gets p = 0


def test_history_keeps_only_the_last_values():
    s = ImportanceSampler(3, history=2, uniform_mix=1e-3)
    for v in (100.0, 100.0, 3.0, 4.0):  # the two 100s are pushed out
        s.update(torch.tensor([0, 1, 2]), torch.full((3,), v))
    assert torch.allclose(s.losses[0].sort().values, torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert torch.allclose(s.probs(), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_weighted_estimate_is_unbiased_and_has_lower_variance():
    s, u = warmed_sampler(), UniformSampler(T)
    g = torch.Generator().manual_seed(0)
    truth = L.mean().item()  # the target: (1/T) sum_t L_t
    means, spreads = {}, {}
    for name, sampler in (("importance", s), ("uniform", u)):
        t, w = sampler.sample(200_000, g)
        est = w.double() * L[t]
        means[name] = est.mean().item()
        spreads[name] = est.std().item()
    assert means["importance"] == pytest.approx(truth, rel=1e-2)
    assert means["uniform"] == pytest.approx(truth, rel=5e-2)
    assert spreads["importance"] < 0.1 * spreads["uniform"]  # the point of the method


def test_high_loss_timesteps_are_drawn_more_often():
    s = warmed_sampler()
    t, w = s.sample(20_000, torch.Generator().manual_seed(1))
    counts = torch.bincount(t, minlength=T)
    assert counts[:5].sum() > 10 * counts[-25:].sum()
    assert torch.allclose(w.double(), 1.0 / (T * s.probs()[t]), rtol=1e-6)


def test_sample_shapes_device_and_generator_reproducibility():
    s = warmed_sampler()
    t1, w1 = s.sample(16, torch.Generator().manual_seed(3))
    t2, w2 = s.sample(16, torch.Generator().manual_seed(3))
    assert t1.shape == w1.shape == (16,) and t1.dtype == torch.long and w1.dtype == torch.float32
    assert torch.equal(t1, t2) and torch.equal(w1, w2)


def test_zero_losses_fall_back_to_uniform():
    s = ImportanceSampler(4, history=1)
    s.update(torch.arange(4), torch.zeros(4))
    assert torch.allclose(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="positive integer"):
        ImportanceSampler(0)
    with pytest.raises(ValueError, match="uniform_mix"):
        ImportanceSampler(10, uniform_mix=0.0)
    s = ImportanceSampler(10)
    with pytest.raises(ValueError, match="0..9"):
        s.update(torch.tensor([10]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one value per sample"):
        s.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        s.update(torch.tensor([1]), torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="integer"):
        s.update(torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="batch"):
        s.sample(0)


def test_weights_make_training_losses_vlb_unbiased():
    """End to end with GaussianDiffusion: E_t~p[w T L_t] = E_t~U[T L_t], checked on a tiny model."""
    from diffusion_core.process import GaussianDiffusion

    d = GaussianDiffusion.from_schedule("linear", T=20)
    x0 = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def model(x, t):
        return 0.5 * x

    s = ImportanceSampler(20, history=2)
    for _ in range(2):
        t = torch.arange(20)
        terms = d.training_losses(model, x0.expand(20, -1, -1, -1), t=t, loss="vlb",
                                  generator=torch.Generator().manual_seed(1))
        s.update(t, terms["loss"])
    assert s.warmed_up and s.probs()[0] > s.probs()[10]
