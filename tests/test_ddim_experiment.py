"""Chapter 03's experiment code (diffusion_core.experiments.ddim) on a stub model: the table's
samplers, its one-sample-size rule, the claim's reference and the inversion measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffusion_core import store
from diffusion_core.experiments import ddim as claim
from diffusion_core.process import GaussianDiffusion
from diffusion_core.profiles import Profile
from diffusion_core.recipes.digits import diffusion_for
from diffusion_core.samplers import ddpm_sample

PROFILES = [Profile(name, torch.device("cpu")) for name in ("smoke", "cpu", "gpu")]
SMOKE = PROFILES[0]


def stub(T: int = 40, variance: str = "fixed_large") -> store.Stored:
    """A Stored around a smooth deterministic 'network' on 8x8 images, with a T-step linear process."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.3))

        def forward(self, x, t):
            return self.scale * torch.tanh(x + t.reshape(-1, 1, 1, 1).float() / 100)

    config = {"schedule": "linear", "T": T, "prediction": "eps", "variance": variance, "resolution": 8}
    return store.Stored(Toy().eval(), "digits-ddpm", "smoke", config, {}, Path("stub"), False)


def test_generate_eta_zero_ignores_seed_and_batch_and_ancestral_depends_on_seed():
    s = stub(T=50)
    x_T = claim.noise(s, 4, seed=0)
    a = claim.generate(s, x_T, 10, 0.0, seed=0, profile=SMOKE)
    assert a.dtype == torch.float32 and a.shape == (4, 1, 8, 8)
    assert torch.equal(a, claim.generate(s, x_T, 10, 0.0, seed=7, batch=3, profile=SMOKE))
    c = claim.generate(s, x_T, 10, claim.ANCESTRAL, seed=0, profile=SMOKE)
    assert not torch.allclose(c, claim.generate(s, x_T, 10, claim.ANCESTRAL, seed=1, profile=SMOKE))


@pytest.mark.parametrize("model_variance", ["fixed_small", "fixed_large"])
def test_ancestral_row_is_ddpm_with_beta_t_whatever_the_recipe_says(model_variance):
    s = stub(T=30, variance=model_variance)
    x_T = claim.noise(s, 3, seed=1)
    got = claim.generate(s, x_T, 30, claim.ANCESTRAL, seed=2, profile=SMOKE)
    large = GaussianDiffusion.from_schedule("linear", 30, variance="fixed_large")
    want = ddpm_sample(s.model, large, x_T, generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.allclose(got, want, atol=1e-6)


def test_eta_one_with_all_steps_is_ddpm_with_the_fixed_small_variance():
    """The table computes DDPM's fixed-small 1000-step reference as its eta = 1, S = T cell."""
    s = stub(T=40)
    x_T = claim.noise(s, 3, seed=1)
    got = claim.generate(s, x_T, 40, 1.0, seed=4, profile=SMOKE)
    small = diffusion_for({**s.config, "variance": "fixed_small"})
    want = ddpm_sample(s.model, small, x_T, generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.allclose(got, want, atol=1e-5)


def test_consistency_distances_are_zero_for_the_finest_and_reconstruction_improves_with_steps():
    s = stub(T=200)
    cons = claim.consistency(s, claim.noise(s, 3, seed=0), (5, 20, 50), profile=SMOKE)
    assert cons["distance"][50] == 0.0 and cons["distance"][5] > cons["distance"][20] > 0
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    rec = claim.reconstruction_error(s, x0, (5, 50, 200))
    assert rec[200]["mse"] < rec[50]["mse"] < rec[5]["mse"]
    assert rec[5]["x_T"].shape == x0.shape


def test_claim_ratio_uses_the_better_1000_step_reference_measured():
    fd = {0.0: {50: 6.0}, 1.0: {1000: 5.0}, claim.ANCESTRAL: {10: 9.0, 1000: 4.0}}
    c = claim.ddim50_over_ddpm1000(fd, 1000)
    assert c["reference"] == "fixed_large" and c["ratio"] == 1.5 and c["ratios"]["fixed_small"] == 1.2
    fd[1.0][1000] = 3.0
    assert claim.ddim50_over_ddpm1000(fd, 1000)["reference"] == "fixed_small"
    del fd[claim.ANCESTRAL][1000]   # the cpu table: no fixed-large cell at S = T
    c = claim.ddim50_over_ddpm1000(fd, 1000)
    assert c["reference"] == "fixed_small" and set(c["ratios"]) == {"fixed_small"} and c["ratio"] == 2.0


def test_one_sample_size_per_profile_and_the_paper_rows_cover_the_table():
    for profile in PROFILES:
        steps = claim.table_steps(profile)
        assert {10, 50, 1000} <= set(steps)
        assert set(claim.sizes(profile)) == {"n", "batch"}
        assert 1.0 in claim.rows_at_T(profile)   # the claim's reference: DDPM fixed-small, all T steps
    assert claim.sizes(PROFILES[1])["n"] >= 300
    assert set(claim.PAPER_TABLE1) == set(claim.ROWS)
    assert all(set(row) == {10, 20, 50, 100, 1000} for row in claim.PAPER_TABLE1.values())


def test_fd_table_measures_every_cell_on_the_same_n(monkeypatch):
    s = stub(T=1000)
    monkeypatch.setattr(claim, "load", lambda name, profile: s)
    monkeypatch.setattr(claim, "sizes", lambda profile: {"n": 6, "batch": 4})
    monkeypatch.setattr(claim, "table_steps", lambda profile: (10, 50, 1000))

    class CountingEvaluator:
        def __init__(self):
            self.sizes = []

        def fd(self, x):
            self.sizes.append(len(x))
            return float(x.abs().mean()) + 1.0

        def features(self, x):
            self.sizes.append(len(x))
            return x.flatten(1)[:, :3].double()

        def heldout_stats(self):
            return torch.zeros(3).numpy(), torch.eye(3).numpy()

        def references(self, n, seed=0):
            self.sizes.append(n)
            return {"fd_floor": 1.0 + seed / 100, "fd_blurred": 2.0, "fd_gaussian": 3.0}

    ev = CountingEvaluator()
    table = claim.fd_table(SMOKE, progress=False, evaluator=ev)
    assert set(ev.sizes) == {6}
    assert set(table["fd_table"]) == set(claim.ROWS)
    assert all(set(cells) >= {10, 50} for cells in table["fd_table"].values())
    assert [row for row, cells in table["fd_table"].items() if 1000 in cells] == list(claim.rows_at_T(SMOKE))
    monkeypatch.setattr(claim, "rows_at_T", lambda profile: claim.ROWS)
    table = claim.fd_table(SMOKE, progress=False, evaluator=ev)
    assert all(set(cells) == {10, 50, 1000} for cells in table["fd_table"].values())
    assert set(table["claim"]["ratios"]) == {"fixed_small", "fixed_large"}
    assert table["claim"]["fd_ddim50"] == table["fd_table"][0.0][50]
    assert table["floor_spread"]["min"] == 1.0 and table["floor_spread"]["max"] == 1.04
    low, high = table["claim"]["interval"]
    assert 0 < low <= high
    assert all(v > 0 for cells in table["seconds"].values() for v in cells.values())


def test_ratio_interval_is_paired_and_covers_the_ratio_of_identical_sets():
    class FeatureEvaluator:
        def features(self, x):
            return x.flatten(1).double()

        def heldout_stats(self):
            return torch.zeros(4).numpy(), torch.eye(4).numpy()

    x = torch.randn(50, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert claim.fd_ratio_interval(FeatureEvaluator(), x, x.clone(), reps=20) == (1.0, 1.0)   # paired: exactly 1
    low, high = claim.fd_ratio_interval(FeatureEvaluator(), 2 * x, x, reps=50)
    assert 1.0 < low < high
    with pytest.raises(ValueError, match="same size"):
        claim.fd_ratio_interval(FeatureEvaluator(), x, x[:10])
