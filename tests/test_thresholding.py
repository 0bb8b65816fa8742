"""Dynamic thresholding (Imagen Sec. 2.3, chapter 13) and the samplers' one ``threshold`` option:
the per-sample percentile, the identity where s <= 1, the output range, a direct numpy computation,
and every sampler taking the same choice as ``clip_denoised`` did."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.process import GaussianDiffusion
from diffusion_core.process.gaussian import randn_like
from diffusion_core.process.thresholding import (
    Threshold,
    dynamic_threshold,
    resolve_threshold,
    static_threshold,
)
from diffusion_core.samplers import ddim_sample, ddpm_sample


def wide(shape=(4, 3, 8, 8), seed=0, scale=2.0, dtype=torch.float64) -> torch.Tensor:
    """Samples spread well past [-1, 1], each with its own spread so that each gets its own s."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x * torch.linspace(0.5, scale, shape[0], dtype=dtype).reshape(-1, *([1] * (len(shape) - 1)))


def numpy_dynamic(x: np.ndarray, p: float, max_value: float | None) -> np.ndarray:
    """The paper's rule, written directly: per sample, s = the p-th percentile of |x|, s = max(s, 1)
    (and min(s, max_value) in diffusers' convention), then clip to [-s, s] and divide by s."""
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        s = max(np.percentile(np.abs(x[b]), p), 1.0)
        if max_value is not None:
            s = min(s, max_value)
        out[b] = np.clip(x[b], -s, s) / s
    return out


@pytest.mark.parametrize("q,max_value", [(0.995, None), (0.95, 1.5), (0.9, 3.0), (0.5, None)])
def test_dynamic_threshold_agrees_with_numpy(q, max_value):
    x = wide()
    ours = dynamic_threshold(x, q, max_value)
    ref = numpy_dynamic(x.numpy(), 100 * q, max_value)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_the_percentile_is_taken_per_sample():
    """Sample b holds the values 0..99 scaled by (b + 2) / 10: its 99.5th percentile |x| is known,
    and the largest value lands on 1 after the division."""
    base = torch.arange(100, dtype=torch.float64).reshape(1, 1, 10, 10)
    x = torch.cat([base * (b + 2) / 10 for b in range(3)])
    out = dynamic_threshold(x, 0.995)
    for b in range(3):
        # linear interpolation between order statistics 98 and 99 at position 0.995 * 99 = 98.505
        s = (98 + 0.505) * (b + 2) / 10
        torch.testing.assert_close(out[b], x[b].clamp(-s, s) / s, rtol=1e-12, atol=1e-12)
        assert out[b].max().item() == pytest.approx(1.0)
        assert (out[b] == 1.0).sum().item() == 1  # only the top value was above s
    # one sample's values do not change another's s: thresholding a sample alone gives the same
    torch.testing.assert_close(dynamic_threshold(x[1:2], 0.995), out[1:2], rtol=0, atol=0)


def test_identity_where_s_is_at_most_one():
    """A sample already within [-1, 1] has s <= 1 and is left exactly as it is, next to one that is
    rescaled; with s <= 1 but a few outliers, only the outliers are clipped (the paper's max(s, 1))."""
    inside = torch.rand(1, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.8 - 0.9
    outside = 3.0 * inside
    out = dynamic_threshold(torch.cat([inside, outside]), 0.995)
    assert torch.equal(out[0], inside[0])
    assert not torch.allclose(out[1], outside[0].clamp(-1, 1))
    spiky = inside.clone()
    spiky.view(-1)[:3] = torch.tensor([5.0, -3.0, 2.0])  # 3 values of 1024: above the 99.5th percentile
    got = dynamic_threshold(spiky, 0.995)
    torch.testing.assert_close(got, spiky.clamp(-1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q,max_value", [(0.995, None), (0.95, 1.5), (0.6, None)])
def test_output_lies_in_minus_one_one(dtype, q, max_value):
    x = wide(scale=20.0, dtype=dtype)
    out = dynamic_threshold(x, q, max_value)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.abs().max().item() <= 1.0
    if max_value is None:  # the widest sample has s > 1: its values beyond s (a fraction 1 - q) saturate
        assert (out[-1].abs() == 1.0).float().mean().item() == pytest.approx(1 - q, abs=0.02)


def test_max_value_one_is_static_clipping_and_the_cap_bounds_the_rescaling():
    x = wide(scale=4.0)
    torch.testing.assert_close(dynamic_threshold(x, 0.995, max_value=1.0), static_threshold(x), rtol=0, atol=0)
    capped = dynamic_threshold(x, 0.995, max_value=1.5)
    # with s capped at 1.5, everything of |x| >= 1.5 saturates at +-1 and the rest is x / 1.5
    small = x.abs() < 1.5
    torch.testing.assert_close(capped[small], x[small] / 1.5, rtol=1e-12, atol=1e-12)
    assert bool((capped[~small].abs() == 1.0).all())


def test_threshold_choices_and_resolution():
    x = wide()
    assert resolve_threshold(None, False) is None and resolve_threshold("none") is None
    torch.testing.assert_close(resolve_threshold(None, True)(x), x.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(resolve_threshold("static", False)(x), x.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(resolve_threshold("dynamic")(x), dynamic_threshold(x, 0.995), rtol=0, atol=0)
    assert resolve_threshold("dynamic") == Threshold.imagen()
    assert Threshold.deepfloyd_if() == Threshold("dynamic", 0.95, 1.5)
    torch.testing.assert_close(Threshold("static", max_value=1.5)(x), x.clamp(-1.5, 1.5), rtol=0, atol=0)

    def half(x0):
        return 0.5 * x0

    assert resolve_threshold(half, True) is half
    assert Threshold.from_diffusers_config({"thresholding": True, "dynamic_thresholding_ratio": 0.95,
                                            "sample_max_value": 1.5, "clip_sample": True}) == Threshold.deepfloyd_if()
    assert Threshold.from_diffusers_config({"clip_sample": True, "clip_sample_range": 2.0}) == Threshold("static", max_value=2.0)
    assert Threshold.from_diffusers_config({"clip_sample": False}).method == "none"


def test_bad_threshold_choices_are_clear_errors():
    with pytest.raises(ValueError, match="choose"):
        resolve_threshold(None, None)
    with pytest.raises(ValueError, match="unknown threshold"):
        resolve_threshold("imagen")
    with pytest.raises(TypeError, match="threshold must be"):
        resolve_threshold(0.995)
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
        Threshold("dynamic", quantile=99.5)
    with pytest.raises(ValueError, match="unknown thresholding method"):
        Threshold("clip")
    with pytest.raises(ValueError, match="max_value"):
        dynamic_threshold(wide(), 0.995, max_value=float("inf"))


# ----------------------------------------------------------------------------- the samplers
def big_eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic eps whose x0_hat runs well outside [-1, 1]: thresholding changes every run."""
    f = (1.0 + torch.cos(t.to(x.dtype) / 37.0)).reshape(-1, *([1] * (x.ndim - 1)))
    return -torch.tanh(1.3 * x.flip(1) * f + 0.1)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_sample_thresholds_as_p_mean_variance_does(variance):
    d = GaussianDiffusion.from_schedule("cosine", T=60, variance=variance).respace(range(0, 60, 3))

    def model(x, t):
        out = big_eps_model(x, t)
        return out if variance != "learned_range" else torch.cat([out, torch.tanh(x - 0.2)], dim=1)

    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    th = Threshold("dynamic", 0.9, None)
    ours = ddpm_sample(model, d, x_T, threshold=th, progress=False, generator=torch.Generator().manual_seed(1))
    g, x = torch.Generator().manual_seed(1), x_T
    for i in range(d.T - 1, -1, -1):
        t = torch.full((3,), i, dtype=torch.long)
        p = d.p_mean_variance(model(x, d.model_t(t)), x, t, threshold=th)
        assert p.x0.abs().max() <= 1.0
        x = p.mean + ((0.5 * p.log_variance).exp() * randn_like(x, g) if i > 0 else 0.0)
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)
    plain = ddpm_sample(model, d, x_T, clip_denoised=True, progress=False, generator=torch.Generator().manual_seed(1))
    assert (ours - plain).abs().max() > 1e-3  # the choice mattered


def test_threshold_replaces_clip_denoised_in_every_sampler():
    d = GaussianDiffusion.from_schedule("linear", T=100)
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for sampler in (lambda **kw: ddim_sample(big_eps_model, d, x_T, 10, progress=False, **kw),
                    lambda **kw: ddpm_sample(big_eps_model, d.respace(range(0, 100, 10)), x_T, progress=False,
                                             generator=torch.Generator().manual_seed(0), **kw)):
        torch.testing.assert_close(sampler(clip_denoised=True), sampler(clip_denoised=False, threshold="static"))
        torch.testing.assert_close(sampler(clip_denoised=False), sampler(clip_denoised=True, threshold="none"))
        dyn = sampler(threshold="dynamic")
        torch.testing.assert_close(dyn, sampler(threshold=Threshold("dynamic", 0.995)))
        torch.testing.assert_close(dyn, sampler(threshold=lambda x0: dynamic_threshold(x0, 0.995)))
        assert (dyn - sampler(clip_denoised=True)).abs().max() > 1e-3


def test_ddim_sample_thresholds_x0_and_rederives_eps():
    """One step from the largest timestep down to x_0 (alpha_bar_prev = 1): the sample is x0_hat
    itself, so it is exactly the thresholded prediction."""
    d = GaussianDiffusion.from_schedule("linear", T=100)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    t = torch.full((3,), 99)
    a = d.alpha_bar[99].item()
    x0_hat = (x_T - (1 - a) ** 0.5 * big_eps_model(x_T, t)) / a**0.5
    got = ddim_sample(big_eps_model, d, x_T, timesteps=[99], threshold=Threshold.deepfloyd_if(), progress=False)
    torch.testing.assert_close(got, dynamic_threshold(x0_hat, 0.95, 1.5), rtol=1e-12, atol=1e-12)


def test_guided_sample_takes_a_threshold_and_still_requires_a_choice():
    from diffusion_core.experiments import guidance as claim

    d = GaussianDiffusion.from_schedule("linear", T=100)

    def model(x, t, c):
        return big_eps_model(x, t) + c.to(x).reshape(-1, 1, 1, 1) / 10

    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    c, null = torch.tensor([1, 2]), torch.tensor(0)
    got = claim.guided_sample(model, d, x_T, c, null, 1.0, steps=5, threshold="dynamic")
    want = ddim_sample(lambda x, t: model(x, t, c), d, x_T, 5, progress=False, threshold="dynamic")
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="choose"):
        claim.guided_sample(model, d, x_T, c, null, 1.0, steps=5)
