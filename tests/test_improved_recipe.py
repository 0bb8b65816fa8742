"""Chapter 02's package pieces: the Improved DDPM recipes (equal budgets, learned-variance UNets, the
hybrid loss reaching both output halves), respacing per variance, the schedule helpers, the FD sweep's
equal sample counts and the stratified bound (chapter 03's experiment is tested in test_ddim_experiment.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffusion_core import store
from diffusion_core.data.digits import digits
from diffusion_core.evaluate.frechet import feature_stats
from diffusion_core.experiments import ddpm
from diffusion_core.experiments import improved as claim
from diffusion_core.process import GaussianDiffusion
from diffusion_core.process.likelihood import BOUND_PARTS, bound_bpd
from diffusion_core.profiles import Profile
from diffusion_core.recipes import improved as R
from diffusion_core.recipes.digits import DIGITS_DDPM, diffusion_for

PROFILES = [Profile(name, torch.device("cpu")) for name in ("smoke", "cpu", "gpu")]
SMOKE = PROFILES[0]


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_recipes_change_only_schedule_variance_and_loss_of_digits_ddpm(profile):
    base = DIGITS_DDPM.config(profile)
    for name in ("digits-iddpm-hybrid", "digits-iddpm-hybrid-linear"):
        config = store.recipe(name).config(profile)
        changed = {k for k in config if config[k] != base.get(k)}
        assert changed <= {"schedule", "variance", "loss"}, changed
        assert config["variance"] == "learned_range" and config["loss"] == "hybrid"
        assert R.budget(config) == R.budget(base)
        assert store.recipe(name).train is DIGITS_DDPM.train      # the same loop (bf16 where the CPU has it)
    assert store.recipe("digits-iddpm-hybrid").config(profile)["schedule"] == "cosine"
    assert store.recipe("digits-iddpm-hybrid-linear").config(profile)["schedule"] == "linear"


def test_learned_variance_unet_outputs_eps_and_v_and_the_hybrid_loss_trains_both():
    config = store.recipe("digits-iddpm-hybrid").config(SMOKE)
    model = store.recipe("digits-iddpm-hybrid").build(config)
    diffusion = diffusion_for(config)
    x0 = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = model(x0, torch.tensor([0, 10, 500, 999]))
    assert out.shape == (4, 2, 16, 16)
    loss = diffusion.training_losses(model, x0, loss="hybrid", generator=torch.Generator().manual_seed(1))["loss"].mean()
    loss.backward()
    head = model.conv_out.weight.grad
    assert head is not None and torch.isfinite(head).all()
    assert head[0].abs().sum() > 0 and head[1].abs().sum() > 0       # the eps and v output channels


# ----------------------------------------------------------------------------- schedules and respacing
def test_linear_schedule_spends_far_more_steps_near_pure_noise_than_cosine():
    sched = claim.schedules(1000)
    assert claim.noise_fraction(sched["linear"].alpha_bar) == pytest.approx(0.175, abs=0.005)
    assert claim.noise_fraction(sched["cosine"].alpha_bar) == pytest.approx(0.021, abs=0.005)


def test_noised_uses_the_same_noise_at_every_t():
    d = claim.schedules(100)["linear"]
    x0 = torch.zeros(2, 1, 4, 4)
    rows = claim.noised(x0, d, [0.0, 0.5, 1.0], seed=3)
    assert rows.shape == (3, 2, 1, 4, 4)
    # with x0 = 0, x_t = sqrt(1 - alpha_bar_t) eps: the rows are multiples of one eps
    ratio = rows[2] / rows[1]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)


def stub(variance: str = "fixed_large", schedule: str = "linear", T: int = 40, channels: int | None = None) -> store.Stored:
    """A Stored around a smooth deterministic 'network' on 8x8 images, with a T-step process."""
    out_channels = channels or (2 if variance == "learned_range" else 1)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.3))

        def forward(self, x, t):
            eps = self.scale * torch.tanh(x + t.reshape(-1, 1, 1, 1).float() / 100)
            return eps if out_channels == 1 else torch.cat([eps, torch.zeros_like(eps)], dim=1)

    config = {"schedule": schedule, "T": T, "prediction": "eps", "variance": variance, "resolution": 8}
    return store.Stored(Toy().eval(), "digits-ddpm", "smoke", config, {}, Path("stub"), False)


def test_respaced_process_swaps_the_variance_and_keeps_alpha_bar_on_k_steps():
    s = stub("fixed_large", T=40)
    for variance in ("fixed_small", "fixed_large"):
        p = claim.respaced(s, variance, 8)
        assert p.T == 8 and p.variance == variance
        assert torch.allclose(p.alpha_bar, diffusion_for(s.config).alpha_bar[p.timestep_map])
    assert claim.respaced(s, "fixed_small", 40).T == 40
    with pytest.raises(ValueError, match="learned_range"):
        claim.respaced(s, "learned_range", 8)
    learned = stub("learned_range", T=40)
    assert claim.respaced(learned, "learned_range", 5).T == 5


def test_sample_starts_every_sampler_from_the_same_noise():
    s = stub("fixed_large", T=30)
    a = claim.sample(s, "fixed_small", 5, 6, seed=1)
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, claim.sample(s, "fixed_small", 5, 6, seed=1))
    # one step adds no noise (z = 0 at the last step): the result depends on x_T alone
    one = [claim.sample(s, v, 1, 6, seed=1, batch=b) for v, b in (("fixed_small", 6), ("fixed_large", 4))]
    assert torch.allclose(one[0], one[1])


class FakeEvaluator:
    """Records the sample counts it is asked about; its features are the first three pixels."""

    def __init__(self):
        self.counts, self.reference_n = [], None

    def features(self, x):
        self.counts.append(len(x))
        return x.flatten(1)[:, :3].double()

    def heldout_stats(self):
        return feature_stats(torch.randn(100, 3, generator=torch.Generator().manual_seed(0)))

    def references(self, n, seed=0):
        self.reference_n = n
        return {"fd_floor": 1.0, "fd_blurred": 2.0, "fd_gaussian": 3.0}


def test_fd_vs_steps_measures_every_k_on_the_same_number_of_samples(monkeypatch):
    stubs = {"digits-ddpm": stub("fixed_large", T=40), "digits-iddpm-hybrid-linear": stub("learned_range", T=40)}
    monkeypatch.setattr(claim, "load", lambda name, profile: stubs[name])
    ev = FakeEvaluator()
    res = claim.fd_vs_steps(SMOKE, progress=False, evaluator=ev)
    n = claim.sizes(SMOKE)["n"]
    assert set(ev.counts) == {n} and ev.reference_n == n == res["n"]
    assert set(res["fd_by_steps"]) == set(claim.SAMPLERS)
    assert all(list(row) == list(claim.steps_grid(SMOKE)) for row in res["fd_by_steps"].values())
    # the paired comparison: learned against each fixed variance at every K, its point difference the
    # difference of the two FDs above, an interval of bootstrap replicates and a fraction in [0, 1]
    assert set(res["paired"]) == {"learned_vs_fixed_small", "learned_vs_fixed_large"}
    for fixed in ("fixed_small", "fixed_large"):
        for K, d in res["paired"][f"learned_vs_{fixed}"].items():
            assert d["difference"] == pytest.approx(res["fd_by_steps"]["learned"][K] - res["fd_by_steps"][fixed][K])
            assert d["interval"][0] <= d["interval"][1] and 0.0 <= d["p_lower"] <= 1.0


def test_sizes_use_one_sample_count_for_every_k_and_enough_of_them_on_cpu():
    for profile in PROFILES:
        assert set(claim.sizes(profile)) == {"n", "batch"}
    assert claim.sizes(PROFILES[1])["n"] >= 200 and claim.sizes(PROFILES[2])["n"] >= 1000


def test_bound_bpd_sums_every_term_when_exact_and_is_unbiased_when_stratified():
    # process.likelihood.bound_bpd: the one estimator of the bound, used by chapters 01 and 02
    # an oracle network that predicts eps exactly: every term of the bound is then a KL between two
    # Gaussians with the same mean, which depends on t only, so the exact sum is known in closed form
    T = 40
    d = claim.schedules(T)["linear"]
    d = GaussianDiffusion(d.betas, "eps", "fixed_large")
    x0 = (torch.randint(0, 256, (3000, 1, 2, 2), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1)

    def oracle(xt, t):
        return (xt - d.at(d.sqrt_alpha_bar, t, xt) * x0) / d.at(d.sqrt_one_minus_alpha_bar, t, xt)

    full = bound_bpd(oracle, d, x0, exact=T, strata=0, seed=0)
    manual = d.prior_bpd(x0).double()
    for t in range(T):
        tt = torch.full((len(x0),), t)
        xt = d.q_sample(x0, tt, generator=torch.Generator().manual_seed(t))
        manual = manual + d.vb_terms_bpd(oracle(xt, tt), x0, xt, tt).double()
    assert torch.allclose(full["total"], manual, rtol=1e-5)
    assert torch.allclose(sum(full[k] for k in BOUND_PARTS), full["total"])
    assert torch.allclose(full["final_step"], d.vb_terms_bpd(oracle(x0, torch.full((len(x0),), T - 1)), x0, x0,
                                                             torch.full((len(x0),), T - 1)).double(), rtol=1e-5)
    est = bound_bpd(oracle, d, x0, exact=3, strata=5, seed=1)
    assert torch.allclose(est["decoder"], full["decoder"], rtol=1e-5)                # L_0 is always exact
    assert not torch.allclose(est["total"], full["total"])                 # every image drew its own t
    se = est["total"].std() / len(x0) ** 0.5
    assert abs(est["total"].mean() - full["total"].mean()) < 4 * se         # ... and the mean is unbiased
    with pytest.raises(ValueError, match="strata"):
        bound_bpd(oracle, d, x0, exact=3, strata=0)
    with pytest.raises(ValueError, match="exact"):
        bound_bpd(oracle, d, x0, exact=0, strata=5)


def test_chapters_01_and_02_give_the_same_model_the_same_nll(monkeypatch):
    # chapter 01 (experiments.ddpm.heldout_nll, behind loss_comparison) and chapter 02
    # (experiments.improved.nll_comparison) once disagreed for one model (2.16 vs 2.70 bits/dim): two
    # estimators. Now both call process.likelihood.bound_bpd on the same images with the same settings.
    stubs = {"digits-ddpm": ("fixed_large", "linear"), "digits-iddpm-hybrid-linear": ("learned_range", "linear"),
             "digits-iddpm-hybrid": ("learned_range", "cosine")}
    monkeypatch.setattr(claim, "load", lambda name, profile: stub(*stubs[name]))
    for seed in (0, 3):
        ch01 = ddpm.heldout_nll(stub("fixed_large"), SMOKE, seed=seed)
        row = claim.nll_comparison(SMOKE, seed=seed)["rows"]["L_simple, linear, fixed large"]
        assert (row["nll_bpd"], row["nll_stderr"]) == (ch01["nll_bpd"], ch01["nll_stderr"])
        s = ddpm.nll_settings(SMOKE)
        x = digits("heldout", 8)[0][: s["images"]]
        direct = bound_bpd(stub("fixed_large").model, diffusion_for(stub().config), x, s["exact"], s["strata"], seed)
        assert ch01["nll_bpd"] == pytest.approx(direct["total"].mean().item(), rel=1e-12)
    assert ddpm.heldout_nll(stub("fixed_large"), SMOKE, seed=0) != ddpm.heldout_nll(stub("fixed_large"), SMOKE, seed=3)
    assert claim.nll_settings is ddpm.nll_settings


def test_steps_grid_reaches_from_10_to_all_1000_steps_at_every_profile():
    for profile in PROFILES:
        grid = claim.steps_grid(profile)
        assert 1000 in grid and min(grid) == 10 and list(grid) == sorted(grid)


def test_fixed_large_decoder_variance_is_beta_tilde_1_as_for_fixed_small():
    # Ho et al.'s code: sigma_0^2 = beta_tilde_1 for both fixed variances, so their decoders L_0 agree
    # (a regression test: large_variance[0] once held exp(beta_tilde_1), about 1, costing ~4.6 bits/dim)
    betas = claim.schedules(1000)["linear"].betas
    large, small = GaussianDiffusion(betas, variance="fixed_large"), GaussianDiffusion(betas, variance="fixed_small")
    assert large.large_variance[0] == small.posterior_variance[1] and torch.equal(large.large_variance[1:], betas[1:])
    x0 = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    eps_hat, t0 = torch.randn_like(x0), torch.zeros(4, dtype=torch.long)
    assert torch.allclose(large.p_mean_variance(eps_hat, x0, t0).variance, small.p_mean_variance(eps_hat, x0, t0).variance)
    assert torch.allclose(large.vb_terms_bpd(eps_hat, x0, x0, t0), small.vb_terms_bpd(eps_hat, x0, x0, t0))


# ----------------------------------------------------------------------------- the paper's tables
def test_every_nll_model_has_a_paper_row_in_both_tables():
    assert set(claim.PAPER_NLL_ROWS) == set(claim.NLL_MODELS)
    for schedule, objective in claim.PAPER_NLL_ROWS.values():
        for dataset in claim.PAPER_DATASETS:
            nll, fid = claim.paper_ablation(dataset, schedule, objective)
            assert 2.5 < nll < 4.5 and fid > 0


def test_paper_differences_have_the_signs_the_chapter_quotes():
    """The chapter's claim: L_hybrid beats L_simple and cosine beats linear, in both of the paper's tables."""
    diffs = claim.paper_nll_differences()
    assert set(diffs) == set(claim.NLL_DIFFERENCES)
    assert all(d < 0 for row in diffs.values() for d in row.values())
    best = claim.PAPER["best_nll"]
    assert {ds: min(v[0] for k, v in claim.PAPER_ABLATIONS.items() if k[0] == ds) for ds in best} == best
