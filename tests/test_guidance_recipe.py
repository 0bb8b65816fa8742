"""Chapter 06's recipe pieces: labels and captions are dropped to the null condition at the requested
rate (and only to it), the null class goes through the model, the recipes are in
the store, and guided DDIM at s = 1 is plain conditional DDIM."""

from __future__ import annotations

import pytest
import torch

from diffusion_core import store
from diffusion_core.experiments import guidance as claim
from diffusion_core.process import GaussianDiffusion, linear_betas
from diffusion_core.profiles import Profile
from diffusion_core.recipes import guidance as recipes
from diffusion_core.recipes import latent as latent_recipes
from diffusion_core.samplers import ddim_sample

SMOKE = Profile("smoke", torch.device("cpu"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is as fast, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(torch.nn.Module):
    """A stand-in network that records the conditions it is given and predicts zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, class_labels=None, input_ids=None):
        self.seen.append(class_labels if class_labels is not None else input_ids)
        return x * self.w


@pytest.mark.parametrize("p_uncond", [0.0, 0.1, 0.5, 1.0])
def test_digits_loss_uses_the_null_class_at_the_dropout_rate(p_uncond):
    model, diffusion = Recorder(), GaussianDiffusion(linear_betas(1000))
    y = torch.arange(20_000) % 10
    x0 = torch.zeros(len(y), 1, 2, 2)
    recipes.digits_loss(model, diffusion, x0, y, p_uncond, generator=torch.Generator().manual_seed(0))
    (seen,) = model.seen
    dropped = seen == recipes.NULL_CLASS
    assert abs(dropped.float().mean().item() - p_uncond) < 0.015
    assert torch.equal(seen[~dropped], y[~dropped])  # the others keep their label


def test_caption_loss_swaps_in_exactly_the_null_caption_tokens():
    """The caption models (chapter 04's text-to-image recipe, one per p_uncond) drop captions to the
    empty caption's tokens at the requested rate, and leave the others alone."""
    c = latent_recipes.T2I_RECIPES[0.2].config(SMOKE)
    tok = latent_recipes.tokenizer_for(c)
    captions = latent_recipes.world_for(SMOKE, text=True, max_objects=1).sample(2000, seed=0).captions
    ids = tok.encode(captions)
    null = tok.encode([latent_recipes.NULL_CAPTION])[0]
    model, diffusion = Recorder(), GaussianDiffusion(linear_betas(1000))
    latent_recipes.t2i_loss(model, diffusion, torch.zeros(len(ids), 4, 2, 2), ids, null, c["p_uncond"],
                            generator=torch.Generator().manual_seed(0))
    (seen,) = model.seen
    is_null = (seen == null).all(1)
    assert abs(is_null.float().mean().item() - 0.2) < 0.03
    assert torch.equal(seen[~is_null], ids[~is_null])
    assert not (ids == null).all(1).any()  # no real caption is the empty one
    # the null caption: <start> <end> <pad> ...
    assert null[:2].tolist() == [tok.start_id, tok.end_id] and (null[2:] == tok.pad_id).all()


def test_digit_model_takes_the_null_class():
    c = recipes.DIGITS_CFG_P01.config(SMOKE)
    model = recipes.DIGITS_CFG_P01.build(c).eval()
    assert model.config.num_class_embeds == 11 and c["null_class"] == 10
    with torch.no_grad():
        out = model(torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3]), torch.tensor([0, 9, 10]))
    assert out.shape == (3, 1, 16, 16)


def test_recipes_are_registered_and_differ_only_in_p_uncond_and_budget():
    names = [recipes.digits_recipe_name(p) for p in recipes.DIGIT_P_UNCONDS]
    assert names == ["digits-cfg-p0.1", "digits-cfg-p0.2", "digits-cfg-p0.5"]
    configs = [store.recipe(n).config(Profile("cpu", torch.device("cpu"))) for n in names]
    assert [c["p_uncond"] for c in configs] == [0.1, 0.2, 0.5]
    strip = [{k: v for k, v in c.items() if k != "p_uncond"} for c in configs]
    assert strip[0] == strip[1] == strip[2]  # an equal budget at the cpu profile
    t2i = [store.recipe(latent_recipes.t2i_recipe_name(p)).config(SMOKE) for p in latent_recipes.T2I_P_UNCONDS]
    assert [c["p_uncond"] for c in t2i] == [0.1, 0.2, 0.5]
    assert latent_recipes.t2i_recipe_name(0.1) == "shapes-ldm-t2i"  # chapter 04's model is chapter 06's p = 0.1
    strip = [{k: v for k, v in c.items() if k != "p_uncond"} for c in t2i]
    assert strip[0] == strip[1] == strip[2]


def test_guided_ddim_at_scale_one_is_conditional_ddim_and_at_zero_unconditional():
    diffusion = GaussianDiffusion(linear_betas(1000))

    def model(x, t, c):
        return 0.1 * x + c.to(x).reshape(-1, 1) / 10

    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    c, null = torch.tensor([1, 2, 3, 4]), torch.tensor(0)
    for s, want_c in ((1.0, c), (0.0, torch.zeros_like(c))):
        for clip in (True, False):
            got = claim.guided_sample(model, diffusion, x_T, c, null, s, steps=10, clip_denoised=clip)
            want = ddim_sample(lambda x, t, cc=want_c: model(x, t, cc), diffusion, x_T, 10, progress=False,
                               clip_denoised=clip)
            torch.testing.assert_close(got, want)


def test_guided_sampling_leaves_unclipped_data_alone():
    """The toy of chapter 06 spreads to about +-2: with clip_denoised=False no sample sits on the box
    [-1, 1]^2's edge (review of chapters 01-06: the default clipped half of them there)."""
    diffusion = GaussianDiffusion(linear_betas(1000))

    def model(x, t, c):  # the exact eps of data N(0, 4 I): eps = sqrt(1 - ab) x / (ab * 4 + 1 - ab)
        ab = diffusion.alpha_bar[t].to(x)[:, None]
        return (1 - ab).sqrt() * x / (4 * ab + 1 - ab)

    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    c, null = torch.zeros(2000), torch.tensor(0.0)
    free = claim.guided_sample(model, diffusion, x_T, c, null, 1.0, steps=20, clip_denoised=False)
    clipped = claim.guided_sample(model, diffusion, x_T, c, null, 1.0, steps=20, clip_denoised=True)
    assert 1.8 < free.std() < 2.2
    assert (free.abs() > 1.01).float().mean() > 0.3
    assert (clipped.abs() > 1.01).float().mean() == 0


class DtypeProbe(torch.nn.Module):
    """A one-convolution stand-in for the digit UNet that records the dtype its convolution runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x, t, class_labels):
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize("amp", ["0", "1"])
def test_sample_digits_runs_the_network_under_the_profile_precision_and_returns_float32(monkeypatch, tmp_path, amp):
    monkeypatch.setenv("DIFFUSION_AMP", amp)
    probe = DtypeProbe()
    c = recipes.DIGITS_CFG_P01.config(SMOKE)
    stored = store.Stored(probe, "digits-cfg-p0.1", "smoke", c, {}, tmp_path, False)
    x = claim.sample_digits(stored, torch.arange(6) % 10, 3.0, steps=2, profile=SMOKE)
    assert x.dtype == torch.float32 and x.shape == (6, 1, 16, 16) and torch.isfinite(x).all()
    assert set(probe.dtypes) == {torch.bfloat16 if amp == "1" else torch.float32}


def test_sample_digits_refuses_the_null_class_out_of_range_labels_and_bad_scales(tmp_path):
    probe = DtypeProbe()
    stored = store.Stored(probe, "digits-cfg-p0.1", "smoke", recipes.DIGITS_CFG_P01.config(SMOKE), {}, tmp_path, False)
    # label 10 is the null class: before, silently unconditional samples
    for labels in (torch.tensor([0, 10]), torch.tensor([-1, 3]), torch.tensor([11])):
        with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9 \(class 10 is the null class\)"):
            claim.sample_digits(stored, labels, 3.0, steps=2, profile=SMOKE)
    with pytest.raises(ValueError, match="class indices"):
        claim.sample_digits(stored, torch.tensor([0.0, 1.0]), 3.0, steps=2, profile=SMOKE)
    with pytest.raises(ValueError, match="guidance scale"):
        claim.sample_digits(stored, torch.tensor([0, 1]), float("nan"), steps=2, profile=SMOKE)
    assert probe.dtypes == []  # nothing ran


def test_sweeps_check_their_scales_before_loading_or_training_a_model(monkeypatch):
    from diffusion_core.evaluate import attributes

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the scales were checked")

    monkeypatch.setattr(claim, "load", no_model)
    monkeypatch.setattr(claim, "digit_evaluator", no_model)
    monkeypatch.setattr(attributes, "shapes_evaluator", no_model)
    with pytest.raises(ValueError, match="guidance scale"):
        claim.digits_sweep(SMOKE, scales=(1.0, float("inf")))
    with pytest.raises(ValueError, match="guidance scale"):
        claim.shapes_sweep(SMOKE, scales=(-2.0,))
    for bad in ((), (0.3,), (0.1, 0.7)):
        with pytest.raises(ValueError, match="p_unconds"):
            claim.shapes_sweep(SMOKE, p_unconds=bad)


def test_the_caption_models_chapter_06_trains_at_each_profile():
    cpu, gpu = Profile("cpu", torch.device("cpu")), Profile("gpu", torch.device("cpu"))
    assert latent_recipes.t2i_p_unconds(gpu) == latent_recipes.T2I_P_UNCONDS == (0.1, 0.2, 0.5)
    assert latent_recipes.t2i_p_unconds(cpu) == (0.1, 0.2)   # five minutes each on a laptop: 0.5 is an exercise
    assert latent_recipes.t2i_p_unconds(SMOKE) == latent_recipes.T2I_P_UNCONDS   # smoke covers every path
    for p in latent_recipes.T2I_P_UNCONDS:  # each rate still has its recipe
        assert store.recipe(latent_recipes.t2i_recipe_name(p)).config(cpu)["p_uncond"] == p


def test_the_papers_table_1_matches_the_scales_by_w_equals_s_minus_one():
    assert set(claim.PAPER_TABLE1) == set(recipes.DIGIT_P_UNCONDS)
    assert claim.paper_table1_at(0.0) is None and claim.paper_table1_at(8.0) is None
    assert claim.paper_table1_at(1.0) == {p: row[0.0] for p, row in claim.PAPER_TABLE1.items()}
    assert claim.paper_table1_at(5.0) == {p: row[4.0] for p, row in claim.PAPER_TABLE1.items()}
    for row in claim.PAPER_TABLE1.values():     # the chapter's reading: best FID at w = 0.1, IS rising with w
        assert min(row, key=lambda w: row[w][0]) == 0.1
        inception = [row[w][1] for w in sorted(row)]
        assert inception == sorted(inception)
