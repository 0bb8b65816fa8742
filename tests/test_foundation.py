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
from diffusion_core.evaluate.frechet import frechet_distance, frechet_distance_from_stats
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
