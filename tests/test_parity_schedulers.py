"""Parity with diffusers' DDPMScheduler and DDIMScheduler: the same model, the same noise, the same
trajectory, step for step.

diffusers keeps alphas_cumprod in float32 and forms its per-step coefficients from it in float32,
including 1 - alpha_bar_t / alpha_bar_{t-1}, which loses about half its digits where beta ~ 1e-4
(the first steps of the linear schedule). Most tests therefore hand diffusers its own alphas_cumprod
promoted to float64 (the same numbers, computed further in float64): then every trajectory agrees to
~1e-12, which checks the algorithm. ``test_*_float32_defaults`` checks the untouched float32 schedulers,
where the agreement is limited by that rounding (1e-5 over 10-50 steps; ~3e-4 over 1000 DDPM steps).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from diffusion_core.interop import from_diffusers  # noqa: E402
from diffusion_core.process import cosine_betas, linear_betas, scaled_linear_betas  # noqa: E402
from diffusion_core.process.respacing import space_timesteps  # noqa: E402
from diffusion_core.process.thresholding import Threshold  # noqa: E402
from diffusion_core.samplers import ddim_sample, ddpm_sample  # noqa: E402
from diffusion_core.schedulers import DDIMEquivalent, DDPMEquivalent  # noqa: E402

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
C = 2
MIX = torch.randn(2 * C, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """A deterministic nonlinear function of (x, t) with 2C output channels (learned_range's split)."""
    t = torch.as_tensor(t).reshape(-1, 1, 1, 1).to(x.dtype)
    h = torch.einsum("oc,bchw->bohw", MIX.to(x.dtype), x)
    return torch.tanh(h * (1.0 + torch.cos(t / 150.0)) + 0.1)


def model_c(x, t):
    return model(x, t)[:, :C]


def float64(scheduler):
    """The scheduler with its own alphas_cumprod promoted to float64 (values unchanged)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    for name in ("one", "final_alpha_cumprod"):
        if hasattr(scheduler, name):
            setattr(scheduler, name, getattr(scheduler, name).double())
    return scheduler


def x_T(dtype=torch.float64):
    return torch.randn(1, C, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)


def diffusers_loop(scheduler, fn, x, steps, seed, **step_kwargs):
    if steps is not None:
        scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    traj = []
    for t in scheduler.timesteps:
        x = scheduler.step(fn(x, t), t, x, generator=g, **step_kwargs).prev_sample
        traj.append(x)
    return traj


def max_rel_diff(ours, ref):
    assert len(ours) == len(ref)
    return max(((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() for a, b in zip(ours, ref))


# ----------------------------------------------------------------------------- conversion
def test_from_diffusers_dispatches_to_the_equivalents():
    ddpm = from_diffusers(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                        variance_type="learned_range"))
    assert isinstance(ddpm, DDPMEquivalent)
    assert ddpm.diffusion.prediction == "v" and ddpm.diffusion.variance == "learned_range"
    ddim = from_diffusers(DDIMScheduler(prediction_type="sample", set_alpha_to_one=False))
    assert isinstance(ddim, DDIMEquivalent) and ddim.diffusion.prediction == "x0"
    assert ddim.final_alpha_bar == pytest.approx(float(ddim.diffusion.alpha_bar[0]))


@pytest.mark.parametrize("name,ours", [("linear", linear_betas(1000)), ("scaled_linear", None),
                                       ("squaredcos_cap_v2", cosine_betas(1000))])
def test_diffusers_schedules_are_ours_to_float32_precision(name, ours):
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    if ours is None:
        ours = scaled_linear_betas(1000, **kw)
    eq = from_diffusers(DDPMScheduler(beta_schedule=name, **kw))
    ab = torch.cumprod(1 - ours, 0)
    torch.testing.assert_close(eq.diffusion.alpha_bar, ab, rtol=2e-5, atol=0)


def test_unsupported_options_are_clear_errors():
    for vt in ("learned", "fixed_large_log"):
        with pytest.raises(NotImplementedError, match=vt):
            from_diffusers(DDPMScheduler(variance_type=vt))
    with pytest.raises(ValueError, match="zero terminal"):
        from_diffusers(DDIMScheduler(rescale_betas_zero_snr=True))
    with pytest.raises(TypeError, match="does not know"):
        from_diffusers(object())
    eq = from_diffusers(DDIMScheduler())
    with pytest.raises(ValueError, match="eta"):
        eq.sample(model_c, x_T(), 10, eta=-1.0)
    with pytest.raises(ValueError, match="either generator or noises"):
        eq.sample(model_c, x_T(), 2, eta=1.0, generator=torch.Generator(), noises=[x_T(), x_T()])


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
def test_timesteps_match_diffusers(cls, spacing, offset):
    for steps in (1, 2, 3, 7, 10, 20, 50, 333, 999):
        s = cls(timestep_spacing=spacing, steps_offset=offset)
        s.set_timesteps(steps)
        assert torch.equal(from_diffusers(s).timesteps(steps), s.timesteps), (spacing, offset, steps)


# ----------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_trajectory_matches_diffusers(schedule, prediction, variance):
    fn = model if variance == "learned_range" else model_c
    for steps, spacing in ((10, "leading"), (50, "trailing")):
        s = DDPMScheduler(beta_schedule=schedule, prediction_type=prediction, variance_type=variance,
                          timestep_spacing=spacing, clip_sample_range=1.5)
        eq = from_diffusers(s)
        ref = diffusers_loop(float64(s), fn, x_T(), steps, seed=2)
        _, ours = eq.sample(fn, x_T(), steps, generator=torch.Generator().manual_seed(2), keep_every=1)
        assert max_rel_diff(ours[1:], ref) < 1e-10, (steps, spacing)


@pytest.mark.parametrize("schedule,prediction,variance,spacing", [
    ("linear", "epsilon", "fixed_small", None),
    ("scaled_linear", "v_prediction", "learned_range", "linspace"),
    ("squaredcos_cap_v2", "sample", "fixed_large", "leading"),
])
def test_ddpm_1000_steps_matches_diffusers(schedule, prediction, variance, spacing):
    fn = model if variance == "learned_range" else model_c
    s = DDPMScheduler(beta_schedule=schedule, prediction_type=prediction, variance_type=variance,
                      timestep_spacing=spacing or "leading")
    eq = from_diffusers(s)
    steps = None if spacing is None else 1000  # None: diffusers' loop without set_timesteps
    ref = diffusers_loop(float64(s), fn, x_T(), steps, seed=3)
    _, ours = eq.sample(fn, x_T(), steps, generator=torch.Generator().manual_seed(3), keep_every=1)
    assert max_rel_diff(ours[1:], ref) < 1e-10


def test_ddpm_last_step_noise_quirk_with_trailing_and_fixed_large():
    """With 'trailing' spacing the last timestep is > 0, and diffusers adds noise of std
    sqrt(1 - alpha_bar_{tau_0}) there; the equivalent does too (ddpm_sample would not)."""
    s = DDPMScheduler(variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False)
    eq = from_diffusers(s)
    x = torch.zeros(4000, 1, 1, 1, dtype=torch.float64)
    ref = diffusers_loop(float64(s), lambda x, t: torch.zeros_like(x), x, 4, seed=4)
    _, ours = eq.sample(lambda x, t: torch.zeros_like(x), x, 4, generator=torch.Generator().manual_seed(4), keep_every=1)
    assert max_rel_diff(ours[1:], ref) < 1e-10
    tau_0 = int(eq.timesteps(4)[-1])
    assert tau_0 == 249
    # with eps_hat = 0 the last step's mean is x0_hat = x / sqrt(alpha_bar_{tau_0}); the rest is its noise
    a = eq.diffusion.alpha_bar[tau_0].item()
    noise = ours[-1] - ours[-2] / a**0.5
    assert noise.std().item() == pytest.approx((1 - a) ** 0.5, rel=0.05)


def test_ddpm_equivalent_is_ddpm_sample_on_the_respaced_process():
    """With 'leading' spacing (last timestep 0) the diffusers loop is the book's ddpm_sample on
    ``diffusion.respace(tau)``: same noise draws, same steps."""
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    eq = from_diffusers(s)
    ref = diffusers_loop(float64(s), model_c, x_T(), 25, seed=5)
    _, ours = ddpm_sample(model_c, eq.process(25), x_T(), generator=torch.Generator().manual_seed(5),
                          keep_every=1, progress=False)
    assert max_rel_diff(ours[1:], ref) < 1e-10


def test_ddpm_noises_argument_replaces_the_generator(monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    noises = [torch.randn(1, C, 4, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              for k in range(10)]
    drawn = iter(noises)
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: next(drawn))
    s = DDPMScheduler()
    eq = from_diffusers(s)
    ref = diffusers_loop(float64(s), model_c, x_T(), 10, seed=0)
    _, ours = eq.sample(model_c, x_T(), 10, noises=noises, keep_every=1)
    assert max_rel_diff(ours[1:], ref) < 1e-10


def test_ddpm_float32_defaults():
    for steps, tol in ((10, 1e-5), (50, 1e-5), (1000, 1e-3)):
        s = DDPMScheduler()
        x = x_T(torch.float32)
        ref = diffusers_loop(s, model_c, x, steps, seed=6)
        _, ours = from_diffusers(s).sample(model_c, x, steps, generator=torch.Generator().manual_seed(6), keep_every=1)
        assert max_rel_diff(ours[1:], ref) < tol, steps


# ----------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_diffusers(schedule, prediction, eta):
    for steps, spacing in ((10, "leading"), (20, "trailing"), (50, "linspace")):
        s = DDIMScheduler(beta_schedule=schedule, prediction_type=prediction, timestep_spacing=spacing)
        eq = from_diffusers(s)
        ref = diffusers_loop(float64(s), model_c, x_T(), steps, seed=7, eta=eta)
        _, ours = eq.sample(model_c, x_T(), steps, eta, generator=torch.Generator().manual_seed(7), keep_every=1)
        assert max_rel_diff(ours[1:], ref) < 1e-10, (steps, spacing)


@pytest.mark.parametrize("options", [
    {"set_alpha_to_one": False, "steps_offset": 1},
    {"clip_sample": False, "timestep_spacing": "trailing"},
    {"clip_sample_range": 0.5, "use_clipped_model_output": True},
])
def test_ddim_options_match_diffusers(options):
    options = dict(options)
    use_clipped = options.pop("use_clipped_model_output", False)
    s = DDIMScheduler(beta_schedule="scaled_linear", **options)
    eq = from_diffusers(s)
    ref = diffusers_loop(float64(s), model_c, x_T(), 20, seed=8, eta=0.5, use_clipped_model_output=use_clipped)
    _, ours = eq.sample(model_c, x_T(), 20, 0.5, use_clipped_model_output=use_clipped,
                        generator=torch.Generator().manual_seed(8), keep_every=1)
    assert max_rel_diff(ours[1:], ref) < 1e-10


def test_ddim_variance_noise_equals_our_noises_argument():
    noises = [torch.randn(1, C, 4, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              for k in range(10)]
    s = float64(DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    eq = from_diffusers(s)
    s.set_timesteps(10)
    x = x_T()
    for k, t in enumerate(s.timesteps):
        x = s.step(model_c(x, t), t, x, eta=1.0, variance_noise=noises[k]).prev_sample
    ours = eq.sample(model_c, x_T(), 10, 1.0, noises=noises)
    assert max_rel_diff([ours], [x]) < 1e-10


def test_ddim_sample_is_diffusers_ddim_with_leading_spacing():
    """The book's ddim_sample on diffusers' timesteps is diffusers' DDIM loop (no clipping, so the
    re-derived eps_hat after clipping plays no part)."""
    for eta in (0.0, 1.0):
        s = DDIMScheduler(beta_schedule="linear", clip_sample=False)
        eq = from_diffusers(s)
        ref = diffusers_loop(float64(s), model_c, x_T(), 25, seed=9, eta=eta)
        _, ours = ddim_sample(model_c, eq.diffusion, x_T(), eta=eta, timesteps=space_timesteps(1000, 25, "leading"),
                              clip_denoised=False, generator=torch.Generator().manual_seed(9), progress=False,
                              keep_every=1)
        assert max_rel_diff(ours[1:], ref) < 1e-10


def test_ddim_float32_defaults():
    for steps, eta, tol in ((10, 0.0, 1e-5), (50, 0.0, 1e-5), (50, 1.0, 1e-4)):
        s = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
        x = x_T(torch.float32)
        ref = diffusers_loop(s, model_c, x, steps, seed=10, eta=eta)
        _, ours = from_diffusers(s).sample(model_c, x, steps, eta, generator=torch.Generator().manual_seed(10),
                                           keep_every=1)
        assert max_rel_diff(ours[1:], ref) < tol, (steps, eta)


# ----------------------------------------------------------------------------- dynamic thresholding
MIX3 = torch.randn(6, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def model_6(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """A random map of (x, t) to 6 channels for 3-channel data, as IF stage I's UNet outputs: eps
    (first 3, up to +-2, so that x0_hat lies far outside [-1, 1]) and the variance interpolation v in
    [-1, 1] (last 3)."""
    t = torch.as_tensor(t).reshape(-1, 1, 1, 1).to(x.dtype)
    h = torch.einsum("oc,bchw->bohw", MIX3.to(x.dtype), x) * (1.0 + torch.cos(t / 150.0))
    return torch.cat([2.0 * torch.tanh(h[:, :3] - 0.3), torch.tanh(h[:, 3:] + 0.1)], dim=1)


def x_T3(dtype=torch.float64):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(12), dtype=dtype)


THRESHOLDS = [{"dynamic_thresholding_ratio": 0.995, "sample_max_value": 2.0},
              {"dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5},
              {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.0}]  # s = 1: plain clipping


def test_thresholding_config_becomes_one_threshold():
    eq = from_diffusers(DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5))
    assert eq.threshold == Threshold.deepfloyd_if()
    assert from_diffusers(DDIMScheduler(clip_sample_range=2.0)).threshold == Threshold("static", max_value=2.0)
    assert from_diffusers(DDIMScheduler(clip_sample=False)).threshold == Threshold("none")


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("options", THRESHOLDS)
def test_ddpm_with_thresholding_matches_diffusers(prediction, variance, options):
    fn = model_6 if variance == "learned_range" else (lambda x, t: model_6(x, t)[:, :3])
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction, variance_type=variance,
                      thresholding=True, **options)
    eq = from_diffusers(s)
    ref = diffusers_loop(float64(s), fn, x_T3(), 20, seed=13)
    _, ours = eq.sample(fn, x_T3(), 20, generator=torch.Generator().manual_seed(13), keep_every=1)
    assert max_rel_diff(ours[1:], ref) < 1e-10


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("options", THRESHOLDS)
def test_ddim_with_thresholding_matches_diffusers(eta, use_clipped, options):
    fn = lambda x, t: model_6(x, t)[:, :3]  # noqa: E731
    s = DDIMScheduler(beta_schedule="scaled_linear", thresholding=True, **options)
    eq = from_diffusers(s)
    ref = diffusers_loop(float64(s), fn, x_T3(), 20, seed=14, eta=eta, use_clipped_model_output=use_clipped)
    _, ours = eq.sample(fn, x_T3(), 20, eta, use_clipped_model_output=use_clipped,
                        generator=torch.Generator().manual_seed(14), keep_every=1)
    assert max_rel_diff(ours[1:], ref) < 1e-10


def if_stage1_scheduler():
    """DeepFloyd IF stage I's scheduler (its scheduler_config.json): cosine betas, learned-range
    variance, dynamic thresholding at the 95th percentile with s capped at 1.5."""
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", prediction_type="epsilon",
                         thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=False)


@pytest.mark.parametrize("steps", [25, 100, 1000])
def test_if_stage1_scheduler_matches_diffusers(steps):
    """IF stage I's scheduler, 6-channel output (eps and v), step for step: with diffusers' own
    alphas_cumprod in float64 the trajectories agree to 1e-10 (the algorithm); and the thresholding
    mattered (without it the samples differ)."""
    s = if_stage1_scheduler()
    eq = from_diffusers(s)
    assert eq.threshold == Threshold.deepfloyd_if() and eq.diffusion.variance == "learned_range"
    ref = diffusers_loop(float64(s), model_6, x_T3(), steps, seed=15)
    _, ours = eq.sample(model_6, x_T3(), steps, generator=torch.Generator().manual_seed(15), keep_every=1)
    assert max_rel_diff(ours[1:], ref) < 1e-10
    s_plain = float64(DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", clip_sample=False))
    plain = diffusers_loop(s_plain, model_6, x_T3(), steps, seed=15)
    assert (plain[-1] - ref[-1]).abs().max() > 1e-2


def test_if_stage1_scheduler_float32_defaults():
    """diffusers' untouched float32 scheduler: agreement limited by its float32 coefficients (module
    docstring), 1e-5 over 25-50 steps, 1e-4 over IF's default 100."""
    for steps, tol in ((25, 1e-5), (50, 1e-5), (100, 1e-4)):
        s = if_stage1_scheduler()
        x = x_T3(torch.float32)
        ref = diffusers_loop(s, model_6, x, steps, seed=15)
        _, ours = from_diffusers(s).sample(model_6, x, steps, generator=torch.Generator().manual_seed(15), keep_every=1)
        assert max_rel_diff(ours[1:], ref) < tol, steps


def test_ddim_with_if_thresholding_matches_diffusers_in_float32():
    s = DDIMScheduler(beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                      sample_max_value=1.5, clip_sample=False)
    fn = lambda x, t: model_6(x, t)[:, :3]  # noqa: E731
    x = x_T3(torch.float32)
    for eta in (0.0, 1.0):
        ref = diffusers_loop(s, fn, x, 50, seed=16, eta=eta)
        _, ours = from_diffusers(s).sample(fn, x, 50, eta, generator=torch.Generator().manual_seed(16), keep_every=1)
        assert max_rel_diff(ours[1:], ref) < 1e-5, eta


CONFIG_OPTIONS = [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                  {"beta_schedule": "squaredcos_cap_v2"}, {"num_train_timesteps": 37},
                  {"trained_betas": [0.01, 0.02, 0.05, 0.1, 0.2]}]


@pytest.mark.parametrize("cls,options", [(DDPMScheduler, o) for o in [*CONFIG_OPTIONS, {"beta_schedule": "sigmoid"}]]
                         + [(DDIMScheduler, o) for o in CONFIG_OPTIONS])
def test_alpha_bar_from_a_config_dict_is_the_schedulers_own(cls, options):
    """A scheduler_config.json alone (no diffusers) gives diffusers' float32 alphas_cumprod bit for bit,
    and so the same equivalent as the object."""
    from diffusion_core.schedulers import (
        ddim_from_diffusers_config,
        ddpm_from_diffusers_config,
        diffusers_alpha_bar,
    )

    s = cls(**options, thresholding=True, set_alpha_to_one=False) if cls is DDIMScheduler else cls(**options)
    assert torch.equal(diffusers_alpha_bar(dict(s.config)), s.alphas_cumprod)
    from_config = (ddpm_from_diffusers_config if cls is DDPMScheduler else ddim_from_diffusers_config)(dict(s.config))
    from_object = from_diffusers(s)
    assert torch.equal(from_config.diffusion.alpha_bar, from_object.diffusion.alpha_bar)
    fields = ("threshold", "timestep_spacing", "steps_offset", "variance_type", "final_alpha_bar")
    assert [getattr(from_config, f, None) for f in fields] == [getattr(from_object, f, None) for f in fields]


def test_config_dicts_refuse_what_objects_refuse():
    from diffusion_core.process import ScheduleError
    from diffusion_core.schedulers import ddpm_from_diffusers_config

    with pytest.raises(ScheduleError, match="zero terminal"):
        ddpm_from_diffusers_config({"rescale_betas_zero_snr": True})
    with pytest.raises(NotImplementedError, match="beta_schedule 'laplace'"):
        ddpm_from_diffusers_config({"beta_schedule": "laplace"})
    with pytest.raises(NotImplementedError, match="fixed_large_log"):
        ddpm_from_diffusers_config({"variance_type": "fixed_large_log"})
