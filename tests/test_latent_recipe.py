"""Chapter 04's recipe pieces: the autoencoder's loss, latent shapes per f, encode/decode round trips,
the UNets of the sweep and of text-to-image, and the store names."""

import pytest
import torch

from diffusion_core import store
from diffusion_core.data.shapes import ShapesWorld
from diffusion_core.experiments import latent as claim
from diffusion_core.models.vae import AutoencoderKL
from diffusion_core.profiles import Profile
from diffusion_core.recipes import latent as R

SMOKE = Profile("smoke", torch.device("cpu"))


@pytest.fixture(scope="module")
def images():
    return ShapesWorld(resolution=16, seed=0, n_paraphrases=0, n_heldout_paraphrases=0).sample(8, seed=0).images


def test_vae_loss_decreases_in_a_few_steps(images):
    torch.manual_seed(0)
    vae = AutoencoderKL(R.vae_config(4, 16, widths=(8, 8, 8)))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        terms = R.vae_loss(vae, images, beta_kl=1e-3, generator=g)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert set(terms) == {"loss", "rec", "edge", "kl"}
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3, losses


def test_vae_loss_terms_follow_their_definitions(images):
    torch.manual_seed(0)
    vae = AutoencoderKL(R.vae_config(2, 16, widths=(8, 8)))
    t = R.vae_loss(vae, images, beta_kl=0.5, edge_weight=2.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t["loss"], t["rec"] + 2.0 * t["edge"] + 0.5 * t["kl"])
    q = vae.encode(images)
    torch.testing.assert_close(t["kl"], q.kl().mean() / images[0].numel())


@pytest.mark.parametrize("f", [2, 4, 8])
def test_latent_shapes_per_downsampling_factor(f):
    cfg = R.vae_config(f, 32)
    assert cfg.downsampling_factor == f
    vae = AutoencoderKL(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    q = vae.encode(x)
    assert q.mean.shape == (2, *R.latent_shape(f, 32)) == (2, R.LATENT_CHANNELS, 32 // f, 32 // f)
    assert vae.decode(q.sample()).shape == x.shape


def test_pixel_space_is_factor_one():
    assert R.latent_shape(1, 32) == (3, 32, 32)


@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_sweep_unet_takes_its_space_and_is_the_same_network(f):
    model = R.build_ldm({"f": f, "resolution": 32, "width": 8, "seed": 0})
    x = torch.randn(2, *R.latent_shape(f, 32))
    assert model(x, torch.tensor([3, 900])).shape == x.shape
    # the same layers for every f: only the first and last convolutions see the channel count
    ref = R.build_ldm({"f": 4, "resolution": 32, "width": 8, "seed": 0})
    body = [k for k in model.state_dict() if not k.startswith(("conv_in", "conv_out"))]
    assert body == [k for k in ref.state_dict() if not k.startswith(("conv_in", "conv_out"))]


def test_encoding_a_batch_and_decoding_gives_the_right_shapes(images):
    vae = AutoencoderKL(R.vae_config(4, 16, widths=(8, 8, 8)))
    vae.scaling_factor = 2.5
    codes = R.LatentCodes(images, vae, batch=3)
    assert codes.mean.shape == codes.std.shape == (8, R.LATENT_CHANNELS, 4, 4)
    x0 = codes.sample(torch.tensor([0, 5, 5]), torch.Generator().manual_seed(0))
    assert x0.shape == (3, R.LATENT_CHANNELS, 4, 4)
    # x0 = scale * (mu + sigma eps): with sigma -> 0 it is scale * mu
    codes.std = torch.zeros_like(codes.std)
    torch.testing.assert_close(codes.sample(torch.tensor([1])), 2.5 * codes.mean[1:2])
    out = claim.decode(vae, x0)
    assert out.shape == (3, 3, 16, 16) and out.abs().max() <= 1
    assert claim.reconstruct(vae, images).shape == images.shape
    pixels = R.LatentCodes(images, None)
    assert torch.equal(pixels.sample(torch.tensor([2])), images[2:3])


def test_text_to_image_model_reads_captions():
    c = R._t2i_config(SMOKE)
    c.update(resolution=16, width=8, text_width=16)
    model = R.build_t2i(c)
    tok = R.tokenizer_for(c)
    scenes = ShapesWorld(resolution=16, seed=0, max_objects=c["max_objects"], n_paraphrases=2,
                         n_heldout_paraphrases=0).sample(3, seed=2)
    ids = R.caption_ids(scenes, tok)
    assert ids.shape == (3, 3, c["context_length"])
    z = torch.randn(3, *R.latent_shape(c["f"], 16))
    eps = model(z, torch.tensor([1, 2, 3]), input_ids=ids[:, 0])
    assert eps.shape == z.shape
    # the null caption is a well-formed sequence (<start> <end> <pad> ...)
    null = tok.encode([R.NULL_CAPTION])[0]
    assert null[:2].tolist() == [tok.start_id, tok.end_id]
    # a different caption changes the prediction: the condition reaches the UNet
    other = model(z, torch.tensor([1, 2, 3]), input_ids=null.expand(3, -1))
    assert not torch.allclose(eps, other)


def test_text_to_image_learns_one_object_scenes_whose_captions_fit_its_context():
    c = R._t2i_config(SMOKE)
    assert c["max_objects"] == R.T2I_MAX_OBJECTS == 1
    scenes = R.world_for(SMOKE, text=True, max_objects=c["max_objects"]).fixed(64, seed=0)
    assert (scenes.count == 1).all()
    tok = R.tokenizer_for(c)
    ids = R.caption_ids(scenes, tok)  # every caption and paraphrase keeps its end token
    assert (ids == tok.end_id).any(-1).all()
    # the autoencoders and the sweep keep the world of one to three objects
    assert R.world_for(SMOKE).max_objects == 3


def test_recipes_are_registered_by_name():
    names = [f"shapes-vae-f{f}" for f in R.VAE_FACTORS] + [f"shapes-ldm-f{f}" for f in R.FACTORS]
    for name in names + ["shapes-ldm-t2i", "shapes-vae-f4-kl0.1"]:
        assert store.recipe(name).name == name
    # the diffusion recipes carry their autoencoder's recipe, so changing it retrains them
    assert R.LDM_RECIPES[4].config(SMOKE)["vae"]["recipe"] == "shapes-vae-f4"
    assert "vae" not in R.LDM_RECIPES[1].config(SMOKE)


def test_equal_compute_budget_gives_cheaper_spaces_more_steps(monkeypatch):
    configs = {f: {"f": f, "resolution": 16, "width": 8, "seed": 0, "batch_size": 4} for f in (1, 4)}
    sec = R.step_seconds(configs, SMOKE, repeats=3, warmup=1)
    assert set(sec) == {1, 4} and all(s > 0 for s in sec.values())
    # steps = budget / compute per step, clamped to [min_steps, max_steps]
    monkeypatch.setitem(R._STEP_SECONDS, ("smoke", "cpu"), {1: 0.5, 2: 0.2, 4: 0.1, 8: 0.05})
    c = {"f": 4, "budget_seconds": 10, "min_steps": 5, "max_steps": 1000}
    assert R.sweep_steps(c, SMOKE) == (100, 0.1)
    assert R.sweep_steps({**c, "f": 1}, SMOKE)[0] == 20
    assert R.sweep_steps({**c, "f": 8, "max_steps": 150}, SMOKE)[0] == 150
    assert R.sweep_steps({**c, "f": 1, "min_steps": 50}, SMOKE)[0] == 50


def test_the_papers_table_8_covers_every_autoencoder_of_the_sweep_and_loses_more_as_f_grows():
    assert set(R.VAE_FACTORS) <= set(claim.PAPER_TABLE8_KL)
    single = [claim.PAPER_TABLE8_KL[f][0] for f in sorted(R.VAE_FACTORS)]
    assert [r_fid for _, r_fid, _ in single] == sorted(r_fid for _, r_fid, _ in single)     # R-FID rises with f
    assert [psnr for _, _, psnr in single] == sorted((psnr for _, _, psnr in single), reverse=True)


def test_equal_steps_sweep_trains_every_factor_for_the_same_steps(monkeypatch):
    # the equal-steps recipes are the equal-compute ones with the budget replaced by a step count
    for profile in (SMOKE, Profile("cpu", torch.device("cpu"))):
        for f in R.FACTORS:
            a, b = R.LDM_RECIPES[f].config(profile), R.LDM_STEPS_RECIPES[f].config(profile)
            assert b["steps"] == R.equal_steps(profile) and "budget_seconds" not in b
            assert {k: v for k, v in a.items() if k not in ("budget_seconds", "min_steps", "max_steps")} == \
                {k: v for k, v in b.items() if k != "steps"}
            assert store.recipe(f"shapes-ldm-f{f}-steps") is R.LDM_STEPS_RECIPES[f]
    # training reads the fixed count and never times the sweep (no step-seconds measured)
    monkeypatch.setattr(R, "sweep_steps", lambda c, p: (_ for _ in ()).throw(AssertionError("timed")))
    c = R.LDM_STEPS_RECIPES[8].config(SMOKE)
    metrics = R._train_ldm(R.build_ldm(c), c, SMOKE)
    assert metrics["steps"] == R.equal_steps(SMOKE) and metrics["step_compute_seconds"] is None
    with pytest.raises(ValueError, match="equal"):
        claim.evaluate_factor(4, SMOKE, None, equal="time")
