"""Chapter 11 (GLIDE): the recipes train at smoke; every attention layer of the UNet takes the
caption's tokens and the time embedding its final token; CLIP guidance is GLIDE eq. 6 (checked by
hand with autograd), equals ancestral sampling bit for bit at s = 0, and raises the guiding CLIP's
score; the inpainting model starts as the base (zero-initialised channels) and both inpainting
samplers keep the known region; bad input is an error."""

from __future__ import annotations

import math

import pytest
import torch

import diffusion_core as dc
from diffusion_core.models.attention import Attention
from diffusion_core.models.glide import GLIDETextUNet, NoisyCLIP
from diffusion_core.process.gaussian import GaussianDiffusion
from diffusion_core.recipes import glide as G
from diffusion_core.samplers.ancestral import ddpm_sample
from diffusion_core.samplers.clip_guidance import (
    check_clip_scale,
    clip_guided_mean,
    clip_guided_p_mean_variance,
    clip_guided_sample,
    score_and_grad,
)
from diffusion_core.samplers.inpaint import known_region_x0, replacement_inpaint_sample
from diffusion_core.store import Stored, load, recipe

SMOKE = dc.Profile("smoke", torch.device("cpu"))
CAPTIONS = ["a large red circle at the top left", "a small blue square at the bottom right",
            "a large green triangle in the center", "a small yellow circle at the top right"]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The three recipes trained at smoke into a fresh cache (shapes-glide found there the second time)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFUSION_CACHE", str(tmp_path_factory.mktemp("glide-cache")))
    glide = load("shapes-glide", SMOKE, verbose=False)
    clip = load("shapes-clip-noisy", SMOKE, verbose=False)
    again = load("shapes-glide", SMOKE, verbose=False)
    inpaint = load("shapes-glide-inpaint", SMOKE, verbose=False)
    yield glide, clip, again, inpaint
    mp.undo()


def test_the_recipes_train_at_smoke_and_are_cached(stored):
    glide, clip, again, inpaint = stored
    assert glide.trained_now and clip.trained_now and not again.trained_now and inpaint.trained_now
    assert inpaint.config["base"]["recipe"] == "shapes-glide"
    assert isinstance(glide.model, GLIDETextUNet) and isinstance(clip.model, NoisyCLIP)
    for s in (glide, clip):
        assert math.isfinite(s.metrics["final_loss"]) and s.metrics["final_loss"] < s.metrics["first_loss"]
    for k, v in glide.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    # the same process, resolution and scenes for the two models
    assert glide.config["diffusion"] == clip.config["diffusion"] == {"schedule": "cosine", "T": 1000,
                                                                     "variance": "learned_range"}
    assert glide.config["resolution"] == clip.config["resolution"] == 16
    assert glide.config["p_uncond"] == 0.1
    recall = [clip.metrics[f"recall_at_1_t{t}"] for t in G.NOISE_LEVELS]
    assert all(0 <= r <= 1 for r in recall)


@torch.no_grad()
def test_the_noisy_clip_image_tower_reads_t(stored):
    clip = stored[1].model.eval()
    x = torch.randn(3, 3, 16, 16)
    f = clip.encode_image(x, torch.tensor([10, 10, 10]))
    assert not torch.allclose(f, clip.encode_image(x, torch.tensor([900, 900, 900])))
    torch.testing.assert_close(f, clip.encode_image(x, torch.tensor(10)))
    s = clip.score(x, torch.tensor([10, 10, 10]), clip.encode_text(G.tokenizer_for(stored[1].config).encode(CAPTIONS[:3])))
    assert s.shape == (3,) and bool((s.abs() <= clip.scale + 1e-4).all())


def test_the_profiles_set_resolution_and_budget():
    gpu = dc.Profile("gpu", torch.device("cpu"))
    cpu = dc.Profile("cpu", torch.device("cpu"))
    assert recipe("shapes-glide").config(gpu)["resolution"] == 32
    assert recipe("shapes-glide").config(cpu)["resolution"] == 16
    assert recipe("shapes-clip-noisy").config(gpu)["resolution"] == 32


def _inputs(model: GLIDETextUNet, c, captions=CAPTIONS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(captions), 3, c["resolution"], c["resolution"], generator=g)
    t = torch.tensor([999, 500, 100, 10][: len(captions)])
    return x, t, G.tokenizer_for(c).encode(captions)


@torch.no_grad()
def test_every_attention_layer_receives_the_text_tokens(stored):
    glide = stored[0]
    model, c = glide.model.eval(), glide.config
    x, t, ids = _inputs(model, c)
    seen: dict[str, torch.Tensor | None] = {}
    layers = [(n, m) for n, m in model.unet.named_modules() if isinstance(m, Attention)]
    # one in each of the two attention levels' blocks, down and up, and the middle
    assert len(layers) == 2 * c["layers_per_block"] + 2 * (c["layers_per_block"] + 1) + 1
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, name=n: seen.__setitem__(name, args[1] if len(args) > 1
                                         else kw.get("encoder_hidden_states")), with_kwargs=True)
             for n, m in layers]
    try:
        model(x, t, ids)
    finally:
        for h in hooks:
            h.remove()
    tokens = model.encode_text(ids).tokens
    assert set(seen) == {n for n, _ in layers}
    for name, ctx in seen.items():
        assert ctx is not None and torch.equal(ctx, tokens), name
        assert dict(layers)[name].add_k_proj is not None  # added keys/values, not a separate cross-attention


@torch.no_grad()
def test_changing_the_caption_changes_eps(stored):
    model, c = stored[0].model.eval(), stored[0].config
    x, t, ids = _inputs(model, c)
    other = G.tokenizer_for(c).encode(CAPTIONS[1:] + CAPTIONS[:1])
    a, b = model(x, t, ids), model(x, t, other)
    assert a.shape == (4, 6, 16, 16)
    assert (a[:, :3] - b[:, :3]).abs().amax(dim=(1, 2, 3)).min() > 1e-4


@torch.no_grad()
def test_the_final_token_reaches_the_time_embedding_and_the_tokens_the_attention(stored):
    model, c = stored[0].model.eval(), stored[0].config
    x, t, ids = _inputs(model, c)
    text = model.encode_text(ids)
    other = model.encode_text(G.tokenizer_for(c).encode(CAPTIONS[1:] + CAPTIONS[:1]))
    # the final token is the end-of-text token's state, and it (only) changes the time embedding
    end = (ids == G.tokenizer_for(c).end_id).int().argmax(1)
    assert torch.equal(text.final, text.tokens[torch.arange(4), end])
    emb = model.unet.time_embed(x, t, text.final)
    assert not torch.allclose(emb, model.unet.time_embed(x, t, other.final))
    assert torch.allclose(emb - model.unet.time_embed(x, t, torch.zeros_like(text.final)),
                          model.unet.class_embedding(text.final) - model.unet.class_embedding.bias)
    base = model(x, t, tokens=text.tokens, final=text.final, mask=text.mask)
    assert torch.equal(base, model(x, t, ids))
    only_final = model(x, t, tokens=text.tokens, final=other.final, mask=text.mask)
    only_tokens = model(x, t, tokens=other.tokens, final=text.final, mask=other.mask)
    assert not torch.allclose(base, only_final) and not torch.allclose(base, only_tokens)


def _tiny_setup(variance="learned_range", steps=6):
    d = GaussianDiffusion.from_schedule("cosine", 1000, variance=variance)
    d = d.respace(G.space_timesteps(1000, steps))
    torch.manual_seed(0)
    w = torch.randn(3, 3 * (2 if variance == "learned_range" else 1), 1, 1) * 0.5
    direction = torch.randn(3, 4, 4)

    def model(x, t):  # a per-sample "network": a 1x1 convolution plus something of t
        return torch.nn.functional.conv2d(x, w.transpose(0, 1)).tanh() + (t.float() / 1000)[:, None, None, None]

    def score(x, t):  # a smooth per-sample score: <tanh(x), direction> + |x|^2 / 10, scaled by t
        return (x.tanh() * direction).sum((1, 2, 3)) + x.pow(2).sum((1, 2, 3)) / 10 * (1 + t.float() / 1000)
    return d, model, score


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
def test_clip_guidance_at_scale_zero_is_ancestral_sampling_bit_for_bit(variance):
    d, model, score = _tiny_setup(variance)
    x_T = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    a = ddpm_sample(model, d, x_T, generator=torch.Generator().manual_seed(2), progress=False)
    b = clip_guided_sample(model, d, x_T, score, 0.0, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b)
    c = clip_guided_sample(model, d, x_T, score, 2.0, generator=torch.Generator().manual_seed(2), progress=False)
    assert not torch.allclose(a, c)


def test_the_guided_mean_is_mu_plus_s_sigma_grad_computed_by_hand():
    d, model, score = _tiny_setup()
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([5, 3, 1])
    out = model(xt, d.model_t(t))
    s = torch.tensor([0.5, 2.0, 7.0])
    p = d.p_mean_variance(out, xt, t)
    want = []
    for i in range(3):  # one sample at a time: the batched gradient must be each sample's own
        xi = xt[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(score(xi, d.model_t(t[i:i + 1])).sum(), xi)
        # mu_hat = mu + s Sigma grad_{x_t} (f . g)
        want.append(p.mean[i] + s[i] * p.variance[i] * gi[0])
    got = clip_guided_p_mean_variance(out, d, xt, t, score, s).mean
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-6, atol=1e-6)
    # a float scale, and the plain formula
    _, grad = score_and_grad(score, xt, d.model_t(t))
    torch.testing.assert_close(clip_guided_p_mean_variance(out, d, xt, t, score, 2.0).mean,
                               p.mean + 2.0 * p.variance * grad)
    torch.testing.assert_close(clip_guided_mean(p, grad, 0.0), p.mean)


@torch.no_grad()
def test_clip_guidance_raises_the_guiding_clips_score(stored):
    """A few guided steps from the same x_T with the same noise: the noise-aware CLIP's score of
    the caption at the x_t reached is higher, on average, with guidance than without."""
    glide, clip = stored[0], stored[1]
    c, model, nclip = glide.config, glide.model.eval(), clip.model.eval()
    tok = G.tokenizer_for(c)
    caps = CAPTIONS * 4
    d = G.respaced(c, 25)
    score = G.text_score_fn(nclip, tok, caps)
    cond = model.encode_text(tok.encode(caps)).as_dict()
    x_T = torch.randn(len(caps), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    final = {}
    for s in (0.0, 0.3, 1.0, 3.0):
        g = torch.Generator().manual_seed(1)
        x = x_T
        for step in range(d.T - 1, d.T - 6, -1):  # five steps
            t = torch.full((len(caps),), step)
            p = clip_guided_p_mean_variance(model(x, d.model_t(t), **cond), d, x, t, score, s)
            x = p.mean + (0.5 * p.log_variance).exp() * torch.randn(x.shape, generator=g)
        final[s] = score(x, d.model_t(torch.full((len(caps),), d.T - 6)))
    gain = final[1.0] - final[0.0]
    assert gain.mean() > 0 and (gain > 0).float().mean() >= 0.75
    # and the larger the scale, the higher the score (in this near-linear regime)
    means = [final[s].mean().item() for s in (0.0, 0.3, 1.0, 3.0)]
    assert means == sorted(means) and means[-1] > means[0]


def test_sample_gives_images_with_either_guidance(stored):
    glide, clip = stored[0], stored[1]
    for guidance, scale in (("cfg", 3.0), ("cfg", 1.0), ("clip", 2.0)):
        x = G.sample(glide, CAPTIONS[:2], guidance=guidance, scale=scale, clip=clip, steps=4, profile=SMOKE)
        assert x.shape == (2, 3, 16, 16) and bool(torch.isfinite(x).all()) and x.abs().max() <= 1
    a = G.sample(glide, CAPTIONS[:2], guidance="clip", scale=0.0, clip=clip, steps=4, profile=SMOKE)
    b = G.sample(glide, CAPTIONS[:2], guidance="cfg", scale=1.0, steps=4, profile=SMOKE)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # both: the conditional model unguided


def test_bad_input_is_an_error(stored):
    glide, clip = stored[0], stored[1]
    d, model, score = _tiny_setup()
    x_T = torch.randn(2, 3, 4, 4)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="CLIP guidance scale"):
            clip_guided_sample(model, d, x_T, score, bad, progress=False)
    for bad in (True, "2", None):
        with pytest.raises(TypeError, match="CLIP guidance scale"):
            check_clip_scale(bad)
    with pytest.raises(ValueError, match="shape"):
        check_clip_scale(torch.ones(3), batch=2)
    with pytest.raises(ValueError, match="one score per sample"):
        clip_guided_sample(model, d, x_T, lambda x, t: x.sum(), 1.0, progress=False)
    with pytest.raises(FloatingPointError):
        clip_guided_sample(model, d, x_T, lambda x, t: (x.sum((1, 2, 3)) * float("nan")), 1.0, progress=False)
    with pytest.raises(ValueError, match="x_T"):
        clip_guided_sample(model, d, torch.full((2, 3, 4, 4), float("nan")), score, 1.0, progress=False)
    with pytest.raises(ValueError, match="guidance must be one of"):
        G.sample(glide, CAPTIONS[:1], guidance="classifier", scale=1.0)
    with pytest.raises(ValueError, match="guidance scale"):
        G.sample(glide, CAPTIONS[:1], guidance="cfg", scale=-2.0)
    with pytest.raises(ValueError, match="CLIP guidance scale"):
        G.sample(glide, CAPTIONS[:1], guidance="clip", scale=-2.0, clip=clip)
    with pytest.raises(ValueError, match="steps"):
        G.sample(glide, CAPTIONS[:1], steps=0)
    with pytest.raises(ValueError, match="captions"):
        G.sample(glide, "a red circle")
    other = dict(clip.config, diffusion={"schedule": "linear", "T": 1000, "variance": "learned_range"})
    with pytest.raises(ValueError, match="another process"):
        G.sample(glide, CAPTIONS[:1], guidance="clip", scale=1.0, clip=Stored(
            clip.model, clip.name, clip.profile, other, {}, clip.path, False), steps=2)
    plain = Stored(torch.nn.Linear(2, 2), "shapes-clip", "smoke", {}, {}, clip.path, False)
    with pytest.raises(ValueError, match="noise-aware CLIP"):
        G.sample(glide, CAPTIONS[:1], guidance="clip", scale=1.0, clip=plain, steps=2)
    with pytest.raises(ValueError, match="timestep"):
        clip.model.encode_image(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="input_ids"):
        glide.model(torch.zeros(1, 3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="inpainting"):
        glide.model(torch.zeros(1, 3, 16, 16), torch.tensor([1]), G.tokenizer_for(glide.config).encode(CAPTIONS[:1]),
                    masked_image=torch.zeros(1, 3, 16, 16), inpaint_mask=torch.ones(1, 1, 16, 16))


# ------------------------------------------------------------------------------------------------
# Inpainting
# ------------------------------------------------------------------------------------------------

def _scenes_and_masks(c, n=4, seed=0):
    images = G.training_set(c).images(slice(0, n))
    masks = G.random_masks(n, c["resolution"], c["hole_min"], c["hole_max"], torch.Generator().manual_seed(seed))
    return images, masks


@torch.no_grad()
def test_the_zero_initialised_inpainting_model_equals_the_base(stored):
    glide, inpaint = stored[0], stored[3]
    c = inpaint.config
    fresh = G.build_inpaint(c)
    assert fresh.unet.conv_in.weight.shape[1] == glide.model.unet.conv_in.weight.shape[1] + 4
    G.init_from_base(fresh, glide.model)
    x, t, ids = _inputs(glide.model, glide.config)
    images, masks = _scenes_and_masks(c)
    base = glide.model(x, t, ids)
    torch.testing.assert_close(fresh.eval()(x, t, ids, masked_image=images, inpaint_mask=masks), base,
                               rtol=1e-5, atol=1e-5)
    # ... whatever the known pixels and the mask; and fine-tuning moved the new channels' weights
    torch.testing.assert_close(fresh(x, t, ids, masked_image=-images, inpaint_mask=1 - masks), base, rtol=1e-5, atol=1e-5)
    n = glide.model.unet.conv_in.weight.shape[1]
    assert inpaint.model.unet.conv_in.weight[:, n:].abs().max() > 0
    with pytest.raises(ValueError, match="masked_image"):
        fresh(x, t, ids)


def test_random_masks_erase_one_rectangle_of_the_configured_size():
    m = G.random_masks(200, 16, 0.25, 0.75, torch.Generator().manual_seed(0))
    assert m.shape == (200, 1, 16, 16) and set(m.unique().tolist()) == {0.0, 1.0}
    hole = m[:, 0] == 0
    rows, cols = hole.any(2).sum(1), hole.any(1).sum(1)
    assert torch.equal(hole.sum((1, 2)), rows * cols)  # a rectangle
    assert rows.min() >= 4 and rows.max() <= 12 and cols.min() >= 4 and cols.max() <= 12
    assert rows.float().std() > 1  # sizes vary
    with pytest.raises(ValueError):
        G.random_masks(2, 16, 0.8, 0.5)


def test_replacement_sampling_keeps_the_known_region_and_fills_the_rest():
    d, model, _ = _tiny_setup()
    g = torch.Generator().manual_seed(0)
    known = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    mask = torch.ones(3, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 0
    x_T = torch.randn(3, 3, 4, 4, generator=g)
    out = replacement_inpaint_sample(model, d, x_T, known, mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out * mask, known * mask)
    assert not torch.allclose(out[:, :, 1:3, 1:3], known[:, :, 1:3, 1:3])
    # with everything known the result is the known image; GLIDE's x0 transform keeps it too
    assert torch.equal(replacement_inpaint_sample(model, d, x_T, known, torch.ones(3, 1, 4, 4)), known)
    x0 = known_region_x0(known, mask)(torch.full_like(known, 5.0))
    assert torch.equal(x0 * mask, known * mask) and torch.equal(x0 * (1 - mask), (1 - mask).expand_as(known))
    with pytest.raises(ValueError, match="mask must hold"):
        replacement_inpaint_sample(model, d, x_T, known, mask * 0.5)
    with pytest.raises(ValueError, match="mask must be"):
        replacement_inpaint_sample(model, d, x_T, known, mask[:2])


def test_inpaint_with_the_model_and_with_replacement(stored):
    glide, inpaint = stored[0], stored[3]
    images, masks = _scenes_and_masks(inpaint.config, 2)
    caps = CAPTIONS[:2]
    for s, method in ((inpaint, "model"), (glide, "replace")):
        out = G.inpaint(s, images, masks, caps, method=method, scale=2.0, steps=4, profile=SMOKE)
        assert out.shape == images.shape and bool(torch.isfinite(out).all())
        torch.testing.assert_close(out * masks, images * masks, rtol=0, atol=1e-6)
        assert (out - images).abs().mul(1 - masks).amax() > 0.05  # the hole is filled anew
    with pytest.raises(ValueError, match="needs shapes-glide-inpaint"):
        G.inpaint(glide, images, masks, caps, method="model")
    with pytest.raises(ValueError, match="needs shapes-glide"):
        G.inpaint(inpaint, images, masks, caps, method="replace")
    with pytest.raises(ValueError, match="method must be"):
        G.inpaint(inpaint, images, masks, caps, method="repaint")
    with pytest.raises(ValueError, match="images must be"):
        G.inpaint(inpaint, images[:1], masks, caps)


def test_the_store_names_the_recipes_lazily():
    import diffusion_core.store as store

    for name, attr in (("shapes-glide", "SHAPES_GLIDE"), ("shapes-clip-noisy", "SHAPES_CLIP_NOISY"),
                       ("shapes-glide-inpaint", "SHAPES_GLIDE_INPAINT")):
        assert store.recipe(name) is getattr(G, attr) and store.recipe(name).name == name


def test_judge_resolution_upsamples_to_the_judges_world():
    ramp = torch.linspace(-0.9, 0.9, 16)
    x = torch.stack([ramp[None, :].expand(16, 16), ramp[:, None].expand(16, 16), torch.zeros(16, 16)])[None]
    x = torch.cat([x, -x])
    up = G.judge_resolution(x, 32)
    assert up.shape == (2, 3, 32, 32) and up.abs().max() <= 1
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(up, 2)[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1],
                               atol=5e-3, rtol=0)  # smooth images are kept, inside the border
    assert G.judge_resolution(torch.rand(2, 3, 16, 16) * 4 - 2, 32).abs().max() <= 1
    assert torch.equal(G.judge_resolution(x, 16), x)
    with pytest.raises(ValueError, match="multiple"):
        G.judge_resolution(x, 40)


def test_mask_seam_measures_the_jump_across_the_border():
    masks = torch.ones(2, 1, 8, 8)
    masks[:, :, 2:5, 3:6] = 0  # a 3x3 hole: 12 border pairs
    flat = torch.zeros(2, 3, 8, 8)
    assert torch.equal(G.mask_seam(flat, masks), torch.zeros(2))
    filled = flat + (1 - masks) * torch.tensor([0.5, -1.0])[:, None, None, None]  # the hole 0.5 or -1 higher
    torch.testing.assert_close(G.mask_seam(filled, masks), torch.tensor([0.5, 1.0]))
    inside = filled.clone()
    inside[:, :, 3, 4] = 7.0  # the hole's centre does not touch the border
    torch.testing.assert_close(G.mask_seam(inside, masks), torch.tensor([0.5, 1.0]))
    assert torch.isnan(G.mask_seam(flat, torch.ones(2, 1, 8, 8))).all()
    with pytest.raises(ValueError):
        G.mask_seam(flat, masks[:, :, :4])


# ------------------------------------------------------------------------------------------------
# experiments.glide (chapter 11's claim)
# ------------------------------------------------------------------------------------------------
ISSUE_KEYS = ("caption_accuracy_cfg_by_scale", "caption_accuracy_clip_by_scale", "judge_similarity_cfg_by_scale",
              "judge_similarity_clip_by_scale", "guide_similarity_clip_by_scale", "fd_cfg_by_scale", "fd_clip_by_scale",
              "inpaint_caption_accuracy", "inpaint_caption_accuracy_replace", "inpaint_seam", "inpaint_seam_replace",
              "inpaint_seam_real", "inpaint_outside_mse")


def _measured(**change):
    m = {"caption_accuracy_cfg_by_scale": {1.0: 0.3, 3.0: 0.6}, "caption_accuracy_clip_by_scale": {0.0: 0.3, 10.0: 0.4},
         "judge_similarity_clip_by_scale": {0.0: 0.5, 10.0: 0.55}, "guide_similarity_clip_by_scale": {0.0: 0.4, 10.0: 0.6},
         "inpaint_caption_accuracy": 0.5, "inpaint_caption_accuracy_replace": 0.4, "inpaint_seam": 0.1,
         "inpaint_seam_replace": 0.2}
    m.update(change)
    return m


def test_the_verdicts_read_the_fixed_bars():
    from diffusion_core.experiments import glide as E

    assert all(E.verdicts(_measured()).values())
    # the best accuracy over the scales counts, wherever it is; a tie is not cleared
    v = E.verdicts(_measured(caption_accuracy_clip_by_scale={0.0: 0.6, 10.0: 0.1}))
    assert not v["cfg_over_clip_accuracy"] and v["guide_rises_more_than_judge"]
    # rises from the smallest to the largest CLIP scale (keys may be strings, as in the saved JSON)
    v = E.verdicts(_measured(guide_similarity_clip_by_scale={"0.0": 0.4, "10.0": 0.44}))
    assert not v["guide_rises_more_than_judge"]
    v = E.verdicts(_measured(judge_similarity_clip_by_scale={0.0: 0.5, 10.0: 0.3},
                             guide_similarity_clip_by_scale={0.0: 0.4, 10.0: 0.3}))
    assert v["guide_rises_more_than_judge"]   # the guide fell less than the judge: still a gap
    assert E.verdicts(_measured(inpaint_caption_accuracy=0.4))["inpaint_at_least_as_accurate"]
    assert not E.verdicts(_measured(inpaint_caption_accuracy=0.39))["inpaint_at_least_as_accurate"]
    assert not E.verdicts(_measured(inpaint_seam=0.2))["inpaint_smaller_seam"]
    with pytest.raises(ValueError, match="same CLIP scales"):
        E.verdicts(_measured(judge_similarity_clip_by_scale={0.0: 0.5, 3.0: 0.55}))
    assert set(E.BARS) == {"cfg_over_clip_accuracy", "guide_rise_over_judge_rise", "inpaint_accuracy_margin",
                           "inpaint_seam_margin"}


def test_the_benchmark_metrics_hold_every_key_of_the_issue():
    from diffusion_core.experiments import glide as E

    row = {"caption_accuracy": 0.5, "judge_similarity": 0.4, "guide_similarity": 0.3, "fd": 2.0}
    sweep = {"cfg": {1.0: row, 3.0: row}, "clip": {0.0: row, 10.0: {**row, "guide_similarity": 0.9}}, "real": row}
    part = {"caption_accuracy": 0.5, "seam": 0.1, "outside_mse": 0.0}
    m = E.benchmark_metrics(sweep, {"model": part, "replace": {**part, "seam": 0.3}, "real": part})
    assert set(ISSUE_KEYS) <= set(m)
    assert m["caption_accuracy_clip_by_scale"] == {0.0: 0.5, 10.0: 0.5}
    assert m["verdicts"] == {"cfg_over_clip_accuracy": False, "guide_rises_more_than_judge": True,
                             "inpaint_at_least_as_accurate": True, "inpaint_smaller_seam": True}
    assert list(E.CFG_SCALES) == sorted(E.CFG_SCALES) and list(E.CLIP_SCALES) == sorted(E.CLIP_SCALES)
    assert 1.0 in E.CFG_SCALES and 0.0 in E.CLIP_SCALES   # both sweeps contain the conditional model
    for guidance, bad in (("cfg", (3.0, 1.0)), ("clip", (0.0, -1.0)), ("clip", (1.0, 1.0))):
        with pytest.raises(ValueError):
            E._check_scales(guidance, bad)


def test_the_holes_cover_each_object_with_a_margin():
    from diffusion_core.experiments import glide as E

    scenes = E.world(16).fixed(32, seed=7)
    masks = E.hole_masks(scenes)
    assert masks.shape == (32, 1, 16, 16) and set(masks.unique().tolist()) == {0.0, 1.0}
    obj = scenes.object_masks[:, :1] > 0.02
    assert not bool((obj & (masks > 0)).any())          # no object pixel is known
    hole = masks[:, 0] == 0
    rows, cols = hole.any(2).sum(1), hole.any(1).sum(1)
    assert bool((rows >= 4).all() and (cols >= 4).all())  # at least R / 4, the smallest hole trained on
    assert bool((hole.sum((1, 2)) == rows * cols).all())  # one rectangle each
    # the margin: the hole reaches two pixels beyond the object (unless the image ends first)
    grown = torch.nn.functional.max_pool2d(obj.float(), 5, 1, 2) > 0
    assert not bool((grown & (masks > 0)).any())
    edit = E.edit_scenes(scenes)
    assert bool((edit.color[:, 0] != scenes.color[:, 0]).all()) and torch.equal(edit.position, scenes.position)


def test_the_sweep_and_the_inpainting_edit_run_at_smoke(stored):
    from diffusion_core.experiments import glide as E

    s = E.Setting(SMOKE, n=4)
    s.steps = 3
    sweep = E.guidance_sweep(SMOKE, s, cfg_scales=(1.0, 3.0), clip_scales=(0.0, 10.0))
    assert sweep["conditional_max_abs_diff"] == 0.0       # CFG s = 1 and CLIP s = 0: the conditional model
    for guidance in ("cfg", "clip"):
        for row in sweep[guidance].values():
            assert 0 <= row["caption_accuracy"] <= 1 and -1 <= row["judge_similarity"] <= 1
            assert -1 <= row["guide_similarity"] <= 1 and row["fd"] >= 0
    ip = E.inpainting(SMOKE, s)
    assert ip["model"]["outside_mse"] == 0.0 and ip["replace"]["outside_mse"] == 0.0
    assert ip["real"]["seam"] == ip["original"]["seam"]   # the hole's border runs through the background only
    adv = E.adversarial_ascent(s, n=4, steps=3)
    assert adv["after"]["guide_similarity"] > adv["before"]["guide_similarity"]
    assert adv["max_abs_change"] <= 3 * 0.02 + 1e-6
