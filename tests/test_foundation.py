"""Profiles, the model store, the training loop, the Frechet distance and the digit data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import diffusion_core as dc
from diffusion_core import store
from diffusion_core.data import box_blur, digits, gaussian_baseline, toy2d
from diffusion_core.data.digits import batches as digit_batches
from diffusion_core.evaluate.frechet import feature_stats, frechet_distance, frechet_distance_from_stats
from diffusion_core.profiles import Profile, UnknownProfileError, check_profile, detect_profile
from diffusion_core.train import EMA, TrainConfig, train


# ------------------------------------------------------------------ profiles
def test_unknown_profile_names_the_choices(monkeypatch):
    with pytest.raises(UnknownProfileError, match="smoke, cpu, gpu"):
        check_profile("laptop")
    monkeypatch.setenv("DIFFUSION_PROFILE", "fast")
    with pytest.raises(UnknownProfileError, match="DIFFUSION_PROFILE"):
        detect_profile()


def test_environment_variable_overrides_detection(monkeypatch):
    monkeypatch.setenv("DIFFUSION_PROFILE", "CPU")
    assert detect_profile() == "cpu"
    monkeypatch.delenv("DIFFUSION_PROFILE")
    assert detect_profile() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_setup_seeds_and_pick_chooses_per_profile():
    p = dc.setup("smoke", seed=3, verbose=False, threads=1)
    a = torch.rand(3)
    dc.setup("smoke", seed=3, verbose=False, threads=1)
    assert torch.equal(a, torch.rand(3))
    assert p.pick(smoke=1, cpu=2, gpu=3) == 1
    assert replace(p, name="gpu").pick(smoke=1, cpu=2, gpu=3) == 3


def test_amp_follows_the_device_and_the_environment_variable(monkeypatch):
    from diffusion_core.profiles import amp_enabled, cpu_has_native_bf16
    cpu = Profile("cpu", torch.device("cpu"))
    monkeypatch.delenv("DIFFUSION_AMP", raising=False)
    assert cpu.amp == cpu_has_native_bf16()
    assert amp_enabled(torch.device("cuda"))
    assert not amp_enabled(torch.device("mps"))
    monkeypatch.setenv("DIFFUSION_AMP", "0")
    assert not cpu.amp and not amp_enabled(torch.device("cuda"))
    with cpu.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    monkeypatch.setenv("DIFFUSION_AMP", "1")
    assert cpu.amp
    with cpu.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    monkeypatch.setenv("DIFFUSION_AMP", "yes")
    with pytest.raises(ValueError, match="DIFFUSION_AMP"):
        amp_enabled(torch.device("cpu"))


def test_training_uses_bf16_on_cpu_only_when_the_recipe_asks(monkeypatch):
    monkeypatch.setenv("DIFFUSION_AMP", "1")
    seen = []

    def loss_fn(m, x):
        y = m(x)
        seen.append(y.dtype)
        return y.float().pow(2).mean()

    p = Profile("smoke", torch.device("cpu"))
    for cpu_amp in (False, True):
        model = nn.Linear(3, 3)
        train(model, loss_fn, iter(lambda: torch.randn(4, 3), None), TrainConfig(steps=2, cpu_amp=cpu_amp,
              ema_decay=0.0), p, progress=False)
        assert model.weight.dtype == torch.float32  # autocast never changes the stored weights
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2


@pytest.mark.parametrize("device_type, capability, cpu_bf16, expected", [
    ("cuda", (7, 5), False, torch.float16),    # T4 (Colab's free GPU): no bf16 tensor cores
    ("cuda", (7, 0), True, torch.float16),     # V100
    ("cuda", (6, 0), False, torch.float16),    # P100
    ("cuda", (8, 0), False, torch.bfloat16),   # A100: Ampere on
    ("cuda", (8, 6), False, torch.bfloat16),
    ("cuda", (9, 0), False, torch.bfloat16),   # H100
    ("cuda", None, False, torch.bfloat16),     # capability unknown: as before
    ("cpu", None, True, torch.bfloat16),       # native bf16 (AVX512-BF16, AMX)
    ("cpu", None, False, None),
    ("mps", None, True, None),
])
def test_amp_dtype_for_picks_float16_before_ampere_and_bfloat16_from_ampere_on(device_type, capability,
                                                                                 cpu_bf16, expected):
    from diffusion_core.profiles import amp_dtype_for
    assert amp_dtype_for(device_type, capability, cpu_bf16) is expected


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_gpu_profile_autocasts_by_the_cuda_capability(monkeypatch, capability, expected):
    monkeypatch.delenv("DIFFUSION_AMP", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = Profile("gpu", torch.device("cuda"))
    assert gpu.amp and gpu.amp_dtype is expected
    assert f"amp={str(expected).removeprefix('torch.')}" in str(gpu)
    calls = []  # what autocast is asked for (this torch may have no CUDA to enter it with)
    with monkeypatch.context() as m:
        m.setattr(torch, "autocast", lambda device_type, dtype=None, enabled=True: calls.append(
            (device_type, dtype, enabled)))
        gpu.autocast()
        monkeypatch.setenv("DIFFUSION_AMP", "0")
        gpu.autocast()
    assert calls == [("cuda", expected, True), ("cuda", torch.bfloat16, False)]
    assert not gpu.amp and gpu.amp_dtype is None and "amp=False" in str(gpu)
    monkeypatch.setenv("DIFFUSION_AMP", "1")
    assert gpu.amp_dtype is expected


def _reference_training(x: torch.Tensor, steps: int, config: TrainConfig, dtype: torch.dtype | None) -> nn.Linear:
    """The loop as it was before float16 existed: autocast, backward, clip, AdamW; no scaler."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.0}, {"params": [model.bias], "weight_decay": 0.0}],
                            lr=config.lr, betas=config.betas, foreach=True, fused=False)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
        opt.step()
    return model


@pytest.mark.parametrize("amp, cpu_amp, dtype", [("0", True, None), ("1", False, None), ("1", True, torch.bfloat16)])
def test_float32_and_bf16_training_on_cpu_is_unchanged_and_never_scales_the_loss(monkeypatch, amp, cpu_amp, dtype):
    from diffusion_core import train as train_module

    def no_scaler(device):
        raise AssertionError("a loss scaler outside float16")

    monkeypatch.setenv("DIFFUSION_AMP", amp)
    monkeypatch.setattr(train_module, "_grad_scaler", no_scaler)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    config = TrainConfig(steps=5, warmup_steps=2, grad_clip=0.05, cpu_amp=cpu_amp, ema_decay=0.0)
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    train(model, lambda m, b: m(b).float().pow(2).mean(), iter(lambda: x, None), config,
          Profile("smoke", torch.device("cpu")), progress=False)
    ref = _reference_training(x, 5, config, dtype)
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)


def test_float16_training_scales_the_loss_and_clips_the_unscaled_gradients(monkeypatch):
    """The T4 path, on the CPU: float16 autocast (as profile.amp_dtype gives on CUDA before Ampere)
    through torch.amp.GradScaler; clipping sees the true gradient norm, not one scaled by 2^16."""
    from diffusion_core import profiles
    from diffusion_core import train as train_module

    monkeypatch.setattr(profiles, "amp_dtype", lambda device: torch.float16)
    scalers, clipped, seen = [], [], []
    make_scaler = train_module._grad_scaler
    monkeypatch.setattr(train_module, "_grad_scaler", lambda device: scalers.append(make_scaler(device)) or scalers[-1])
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, **kw):
        params = list(params)
        clipped.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
        return clip(params, max_norm, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    def loss_fn(m, b):
        y = m(b)
        seen.append(y.dtype)
        return y.float().pow(2).mean()

    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    expected = torch.autograd.grad(loss_fn(model, x), list(model.parameters()))  # float32, step 0
    expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected])).item()
    before = model.weight.detach().clone()
    seen.clear()
    result = train(model, loss_fn, iter(lambda: x, None), TrainConfig(steps=6, cpu_amp=True, ema_decay=0.0),
                   Profile("smoke", torch.device("cpu")), progress=False)
    assert len(scalers) == 1 and scalers[0].is_enabled() and scalers[0].get_scale() > 1
    assert seen == [torch.float16] * 6 and model.weight.dtype == torch.float32
    assert clipped[0] == pytest.approx(expected_norm, rel=1e-2)  # unscaled before clipping
    assert all(np.isfinite(result.losses)) and not torch.equal(model.weight, before)


def test_setup_honours_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        dc.setup("smoke", verbose=False)
        assert torch.get_num_threads() == 1
        dc.setup("smoke", verbose=False, threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ store
class _Tiny(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(2, width)


def _recipe(name: str, calls: list) -> store.Recipe:
    def cfg(p: Profile) -> dict:
        return {"width": p.pick(smoke=3, cpu=5, gpu=7)}

    def build(c: dict) -> nn.Module:
        return _Tiny(c["width"])

    def train_fn(m: nn.Module, c: dict, p: Profile) -> dict:
        calls.append(1)
        with torch.no_grad():
            m.lin.weight.fill_(0.25)
        return {"score": 0.5}

    return store.Recipe(name, 1, cfg, build, train_fn)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CACHE", str(tmp_path))
    return tmp_path


def test_store_trains_once_then_loads_from_cache(cache):
    calls: list = []
    store.register(_recipe("test-tiny", calls))
    prof = Profile("smoke", torch.device("cpu"))
    first = store.load("test-tiny", prof, verbose=False)
    second = store.load("test-tiny", prof, verbose=False)
    assert len(calls) == 1 and first.trained_now and not second.trained_now
    assert torch.equal(first.model.lin.weight, second.model.lin.weight)
    assert second.metrics["score"] == 0.5
    files = sorted(p.suffix for p in cache.iterdir())
    assert ".safetensors" in files and ".sha256" in files
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_store_trains_with_gradients_even_when_first_asked_for_under_no_grad(cache):
    seen: list = []

    def cfg(p: Profile) -> dict:
        return {"width": 3}

    def train_fn(m: nn.Module, c: dict, p: Profile) -> dict:
        seen.append(torch.is_grad_enabled())
        loss = m.lin(torch.ones(4, 2)).pow(2).mean()
        loss.backward()  # fails without gradients
        return {"grad_norm": float(m.lin.weight.grad.norm())}

    store.register(store.Recipe("test-nograd", 1, cfg, lambda c: _Tiny(c["width"]), train_fn))
    prof = Profile("smoke", torch.device("cpu"))
    with torch.no_grad():
        s = store.load("test-nograd", prof, verbose=False)
    with torch.inference_mode():
        store.register(store.Recipe("test-inference", 1, cfg, lambda c: _Tiny(c["width"]), train_fn))
        store.load("test-inference", prof, verbose=False)
    assert seen == [True, True] and s.metrics["grad_norm"] > 0
    with torch.no_grad():
        store.load("test-nograd", prof, verbose=False)
        assert not torch.is_grad_enabled()


def test_store_rebuilds_a_corrupt_file(cache):
    calls: list = []
    store.register(_recipe("test-corrupt", calls))
    prof = Profile("smoke", torch.device("cpu"))
    path = store.load("test-corrupt", prof, verbose=False).path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        again = store.load("test-corrupt", prof, verbose=False)
    assert again.trained_now and len(calls) == 2


def test_store_key_depends_on_profile_and_config(cache):
    calls: list = []
    store.register(_recipe("test-keys", calls))
    a = store.load("test-keys", Profile("smoke", torch.device("cpu")), verbose=False)
    b = store.load("test-keys", Profile("cpu", torch.device("cpu")), verbose=False)
    assert a.path != b.path and b.model.lin.out_features == 5 and len(calls) == 2


def test_store_file_is_plain_safetensors_with_metadata(cache):
    store.register(_recipe("test-meta", []))
    s = store.load("test-meta", Profile("smoke", torch.device("cpu")), verbose=False)
    header_len = int.from_bytes(s.path.read_bytes()[:8], "little")
    header = json.loads(s.path.read_bytes()[8:8 + header_len])
    meta = header["__metadata__"]
    assert json.loads(meta["recipe"]) == "test-meta" and json.loads(meta["profile"]) == "smoke"


def test_store_rejects_a_file_whose_keys_do_not_match(cache):
    calls: list = []
    store.register(_recipe("test-mismatch", calls))
    prof = Profile("smoke", torch.device("cpu"))
    s = store.load("test-mismatch", prof, verbose=False)
    store.save(nn.Linear(2, 2), s.path, {"key": store.cache_key(store.recipe("test-mismatch"), "smoke", s.config)})
    with pytest.warns(UserWarning, match="missing keys"):
        store.load("test-mismatch", prof, verbose=False)
    assert len(calls) == 2


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(store.UnknownRecipeError, match="digits-ddpm"):
        store.recipe("no-such-model")


# ------------------------------------------------------------------ training
def test_ema_warmup_moves_quickly_at_first():
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9999)
    with torch.no_grad():
        m.weight.fill_(1.0)
    for _ in range(20):
        ema.update(m)
    # without warm-up, 20 updates at 0.9999 would leave the EMA at 0.002
    assert ema.model.weight.item() > 0.9


def test_training_reduces_the_loss_and_is_deterministic():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))
        x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
        y = x[:, :1] * 2 - x[:, 1:]

        def batches():
            while True:
                yield x, y

        res = train(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batches(),
                    TrainConfig(steps=150, lr=1e-2, warmup_steps=10), Profile("smoke", torch.device("cpu")),
                    progress=False)
        return res

    a, b = run(), run()
    assert a.losses[-1] < 0.1 * a.losses[0]
    assert a.losses == b.losses


def test_nan_loss_is_a_clear_error():
    model = nn.Linear(1, 1)

    def batches():
        while True:
            yield torch.ones(2, 1)

    with pytest.raises(FloatingPointError, match="learning rate"):
        train(model, lambda m, b: m(b).sum() * float("nan"), batches(), TrainConfig(steps=3),
              Profile("smoke", torch.device("cpu")), progress=False)


# ------------------------------------------------------------------ Frechet distance
def test_fd_of_identical_sets_is_zero_and_of_shifted_sets_is_the_shift():
    f = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(f, f + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)


def test_fd_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.zeros(3), np.ones(3)
    c1, c2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    expected = 3 + sum((np.sqrt(a) - np.sqrt(b)) ** 2 for a, b in [(1, 4), (4, 1), (9, 1)])
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_fd_is_finite_and_real_with_singular_covariances():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 64))
    a[:, 10:20] = 0.0  # dead units, and fewer samples than features
    b = rng.normal(size=(40, 64))
    b[:, 30:] = 0.0
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and isinstance(fd, float) and fd > 0


def test_fd_rejects_nan_features():
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 2), np.nan), np.zeros((4, 2)))


# ------------------------------------------------------------------ data
def test_digits_split_is_disjoint_stratified_and_quantised():
    tr, ytr = digits("train", 16)
    he, yhe = digits("heldout", 16)
    assert tr.shape == (1297, 1, 16, 16) and he.shape == (500, 1, 16, 16)
    assert torch.bincount(yhe).tolist() == [50] * 10
    levels = (he + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4) and he.min() >= -1 and he.max() <= 1
    flat_tr = {tuple(r) for r in tr.flatten(1).tolist()}
    assert sum(tuple(r) in flat_tr for r in he.flatten(1).tolist()) < 5  # (a few duplicates exist in the raw data)


def test_digits_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        digits("test")
    with pytest.raises(ValueError, match="resolution"):
        digits("train", 4)


def test_references_are_ordered_and_baseline_is_clipped():
    tr, _ = digits("train", 16)
    g = gaussian_baseline(tr, 100)
    assert g.shape == (100, 1, 16, 16) and g.min() >= -1 and g.max() <= 1
    assert box_blur(tr[:4]).shape == (4, 1, 16, 16)


def test_toy_distributions_are_deterministic_and_named():
    assert torch.equal(toy2d("moons", 10, seed=1), toy2d("moons", 10, seed=1))
    with pytest.raises(ValueError, match="moons"):
        toy2d("swissroll", 10)


def test_batches_larger_than_the_data_are_refused_instead_of_looping_forever():
    x, y = torch.zeros(4, 1, 2, 2), torch.arange(4)
    with pytest.raises(ValueError, match="batch_size 10 is larger than the data"):
        digit_batches(x, 10)  # before: a generator that never yields (an endless loop)
    with pytest.raises(ValueError, match="batch_size"):
        digit_batches(x, 0)
    with pytest.raises(ValueError, match=r"tensors\[0\] has 3 rows"):
        digit_batches(x, 2, 0, y[:3])
    xb, yb = next(digit_batches(x, 4, 0, y))
    assert xb.shape == (4, 1, 2, 2) and sorted(yb.tolist()) == [0, 1, 2, 3]


def test_box_blur_keeps_the_image_size_for_even_sizes_and_averages():
    x = torch.arange(2 * 3 * 7 * 9, dtype=torch.float32).reshape(2, 3, 7, 9)
    for size in (1, 2, 3, 4, 5):
        assert box_blur(x, size).shape == x.shape, size
    assert torch.equal(box_blur(x, 1), x)
    # an even box: the mean of the pixel, the one after it and the two below them (interior pixels)
    assert box_blur(x, 2)[0, 0, 2, 3] == x[0, 0, 2:4, 3:5].mean()
    assert torch.allclose(box_blur(torch.ones(1, 1, 5, 5), 4), torch.ones(1, 1, 5, 5))
    with pytest.raises(ValueError, match="size"):
        box_blur(x, 0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        box_blur(x[0], 3)


def test_quantize_refuses_zero_bits_instead_of_returning_nan():
    from diffusion_core.data import quantize

    x = torch.linspace(-1, 1, 11)
    assert quantize(x, 1).unique().tolist() == [-1.0, 1.0]
    for bits in (0, -1, 2.5):
        with pytest.raises(ValueError, match="bits"):
            quantize(x, bits)


def test_toy_distributions_refuse_nan_noise_and_bad_sizes():
    for noise in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="noise"):
            toy2d("mixture", 10, noise=noise)  # before: NaN (or inf) points
    with pytest.raises(ValueError, match="n must be a positive integer"):
        toy2d("moons", 10.5)
    assert toy2d("moons", np.int64(5), noise=0).shape == (5, 2)


def test_gaussian_baseline_needs_two_examples():
    with pytest.raises(ValueError, match="at least 2 examples"):
        gaussian_baseline(torch.zeros(1, 1, 4, 4), 3)
    with pytest.raises(ValueError, match="n must be"):
        gaussian_baseline(torch.zeros(5, 1, 4, 4), 0)


def test_training_with_too_few_batches_says_how_many_steps_were_done():
    model = nn.Linear(1, 1)
    three = [torch.ones(2, 1)] * 3
    with pytest.raises(ValueError, match=r"batch iterator ran out after 3 of 5 steps"):  # before: bare StopIteration
        train(model, lambda m, b: m(b).pow(2).mean(), iter(three), TrainConfig(steps=5, ema_decay=0.0),
              Profile("smoke", torch.device("cpu")), progress=False)
    # a list is iterated once: enough batches train
    res = train(model, lambda m, b: m(b).pow(2).mean(), three, TrainConfig(steps=3, ema_decay=0.0),
                Profile("smoke", torch.device("cpu")), progress=False)
    assert len(res.losses) == 3


def test_training_refuses_a_loss_that_is_not_a_scalar():
    with pytest.raises(ValueError, match="scalar tensor"):
        train(nn.Linear(1, 1), lambda m, b: m(b), [torch.ones(2, 1)], TrainConfig(steps=1, ema_decay=0.0),
              Profile("smoke", torch.device("cpu")), progress=False)


@pytest.mark.parametrize("kwargs, word", [({"log_every": 0}, "log_every"), ({"warmup_steps": -1}, "warmup_steps"),
                                          ({"ema_decay": -0.5}, "ema_decay"), ({"ema_decay": 1.0}, "ema_decay"),
                                          ({"lr": float("nan")}, "lr"), ({"grad_clip": float("nan")}, "grad_clip"),
                                          ({"final_lr_fraction": 2.0}, "final_lr_fraction"), ({"steps": 2.5}, "steps")])
def test_train_config_names_a_bad_setting(kwargs, word):
    # before: log_every=0 was a ZeroDivisionError at the first step, a negative ema_decay silently no EMA
    with pytest.raises(ValueError, match=f"TrainConfig: {word}"):
        TrainConfig(**{"steps": 3, **kwargs})


def test_store_refuses_a_directory_where_its_file_should_be(cache):
    calls: list = []
    store.register(_recipe("test-dir", calls))
    prof = Profile("smoke", torch.device("cpu"))
    path = store.load("test-dir", prof, verbose=False).path
    path.unlink()
    path.mkdir()
    (path / "keep.txt").write_text("someone's file")
    with pytest.raises(IsADirectoryError, match=r"is a directory where the store keeps a file; remove it"):
        store.load("test-dir", prof, verbose=False)  # before: an uncaught error from hashing a directory
    assert (path / "keep.txt").exists() and len(calls) == 1


def test_store_removes_the_temporaries_of_a_killed_writer(cache):
    store.register(_recipe("test-tmp", []))
    prof = Profile("smoke", torch.device("cpu"))
    path = store.load("test-tmp", prof, verbose=False).path
    stale = [cache / f".{path.name}.abc123.tmp", cache / f".{path.with_suffix('.sha256').name}.xyz.tmp"]
    other = cache / ".another-entry.safetensors.abc.tmp"
    for f in (*stale, other):
        f.write_bytes(b"half a file")
    store.load("test-tmp", prof, verbose=False)
    assert not any(f.exists() for f in stale) and other.exists()  # only this entry's temporaries


def test_store_rebuilds_a_file_stored_in_another_dtype(cache):
    calls: list = []
    store.register(_recipe("test-dtype", calls))
    prof = Profile("smoke", torch.device("cpu"))
    s = store.load("test-dtype", prof, verbose=False)
    store.save(s.model.half(), s.path, {"key": store.cache_key(store.recipe("test-dtype"), "smoke", s.config)})
    with pytest.warns(UserWarning, match="stored as torch.float16 but the recipe builds torch.float32"):
        again = store.load("test-dtype", prof, verbose=False)  # before: cast to float32 silently
    assert again.trained_now and len(calls) == 2 and again.model.lin.weight.dtype == torch.float32


def test_store_names_a_profile_of_the_wrong_type(cache):
    store.register(_recipe("test-profile-type", []))
    with pytest.raises(TypeError, match="profile must be a Profile, a profile name or None, got int"):
        store.load("test-profile-type", 3, verbose=False)  # before: AttributeError inside the recipe's config


def test_paired_bootstrap_resamples_the_same_indices_from_both_sets():
    from diffusion_core.evaluate.frechet import central_interval, paired_bootstrap
    g = torch.Generator().manual_seed(0)
    ref = feature_stats(torch.randn(400, 3, generator=g))
    a = torch.randn(80, 3, generator=g)
    fa, fb = paired_bootstrap(a, a.clone(), ref, reps=30, seed=1)
    assert np.array_equal(fa, fb)                      # the same set: equal in every replicate
    # a set shifted away from the reference scores worse in every replicate (paired), where two
    # independently resampled sets would cross sometimes
    fa, fb = paired_bootstrap(a, a + 0.3, ref, reps=50, seed=1)
    assert (fa < fb).all() and fa.std() > 0
    # the replicates are reproducible from the seed, and move with it
    assert np.array_equal(paired_bootstrap(a, a + 0.3, ref, reps=5, seed=2)[0],
                          paired_bootstrap(a, a + 0.3, ref, reps=5, seed=2)[0])
    assert not np.array_equal(paired_bootstrap(a, a, ref, reps=5, seed=2)[0],
                              paired_bootstrap(a, a, ref, reps=5, seed=3)[0])
    lo, hi = central_interval(np.arange(101.0), 0.9)
    assert (lo, hi) == (pytest.approx(5.0), pytest.approx(95.0))
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(a, a[:10], ref)
    with pytest.raises(ValueError, match="reps"):
        paired_bootstrap(a, a, ref, reps=0)
    with pytest.raises(ValueError, match="level"):
        central_interval(np.arange(3.0), 1.5)
    with pytest.raises(ValueError, match="reps"):
        paired_bootstrap(a, a, ref, reps=True)
    for bad in (np.array([]), np.array([1.0, np.nan])):
        with pytest.raises(ValueError, match="values"):
            central_interval(bad)


def test_every_registered_recipe_name_resolves_to_the_recipe_of_that_name():
    for name in list(store.RECIPES):
        r = store.recipe(name)
        assert isinstance(r, store.Recipe) and r.name == name, name


def test_a_stored_model_carries_its_process_and_tokenizer():
    from diffusion_core.recipes import digits as D
    from diffusion_core.recipes import latent as L
    c = D.DIGITS_DDPM.config(dc.profiles.Profile("smoke", torch.device("cpu")))
    s = store.Stored(nn.Linear(1, 1), "digits-ddpm", "smoke", c, {}, None, False)
    d = s.diffusion
    assert d.T == D.diffusion_for(c).T and torch.equal(d.betas, D.diffusion_for(c).betas)
    with pytest.raises(AttributeError, match="tokenizer"):
        _ = s.tokenizer
    c = L.T2I_RECIPES[0.1].config(dc.profiles.Profile("smoke", torch.device("cpu")))
    t2i = store.Stored(nn.Linear(1, 1), "shapes-ldm-t2i", "smoke", c, {}, None, False)
    assert t2i.tokenizer.encode(["a red circle"]).tolist() == L.tokenizer_for(c).encode(["a red circle"]).tolist()
    assert torch.equal(t2i.diffusion.alpha_bar, L.diffusion_for(c).alpha_bar)
    clip = store.Stored(nn.Linear(1, 1), "shapes-clip", "smoke", {}, {}, None, False)
    with pytest.raises(AttributeError, match="diffusion process"):
        _ = clip.diffusion
