"""Chapter 12 (unCLIP): the prior and decoder recipes train at smoke around the frozen shapes CLIP;
the prior samples unit embeddings and predicts x0; the decoder reads z_i through the time embedding
and extra context tokens; DDIM decoding is deterministic at eta = 0 and varies at eta > 0; slerp is
the great-circle interpolation; the bars read the numbers; bad input is a clear ValueError."""

from __future__ import annotations

import math

import pytest
import torch

import diffusion_core as dc
from diffusion_core.experiments import unclip as claim
from diffusion_core.models.prior import PriorTransformer
from diffusion_core.models.unclip import UnCLIPDecoder
from diffusion_core.models.unet_cond import CondUNetConfig
from diffusion_core.recipes import unclip as U
from diffusion_core.store import load, recipe

SMOKE = dc.Profile("smoke", torch.device("cpu"))
CAPTIONS = ["a large red circle at the top left", "a small blue square at the bottom right",
            "a large green triangle in the center"]


@pytest.fixture(scope="module")
def models():
    """The two recipes at smoke (from the test cache, trained on first use) and the frozen CLIP."""
    prior = load("shapes-unclip-prior", SMOKE, verbose=False)
    decoder = load("shapes-unclip-decoder", SMOKE, verbose=False)
    return prior, decoder, U.frozen_clip(SMOKE)


def test_the_recipes_train_at_smoke_around_the_frozen_clip(models):
    prior, decoder, clip = models
    assert isinstance(prior.model, PriorTransformer) and isinstance(decoder.model, UnCLIPDecoder)
    for s in (prior, decoder):
        assert math.isfinite(s.metrics["final_loss"]) and s.metrics["final_loss"] < s.metrics["first_loss"]
        assert s.config["clip"]["recipe"] == "shapes-clip"
    assert U.prior_diffusion(prior.config).prediction == "x0"          # the paper: predict z_i itself
    assert U.decoder_diffusion(decoder.config).prediction == "eps"
    assert prior.config["p_uncond"] == 0.1
    assert (decoder.config["p_uncond_image"], decoder.config["p_uncond_caption"]) == (0.1, 0.5)
    # the prior's standardisation was fitted, not trained
    assert not prior.model.clip_mean.requires_grad and float(prior.model.clip_std.min()) > 0
    assert float(prior.model.clip_std.mean()) != 1.0
    assert not any(p.requires_grad for p in clip.model.parameters())


def test_the_profiles_set_resolution():
    gpu, cpu = dc.Profile("gpu", torch.device("cpu")), dc.Profile("cpu", torch.device("cpu"))
    assert recipe("shapes-unclip-decoder").config(gpu)["resolution"] == 32
    assert recipe("shapes-unclip-decoder").config(cpu)["resolution"] == 16
    assert recipe("shapes-unclip-prior").config(cpu)["context_length"] == U.context_length(16)


def test_the_standardisation_maps_the_training_embeddings_to_unit_variance():
    prior = U.build_prior(recipe("shapes-unclip-prior").config(SMOKE))
    z = torch.nn.functional.normalize(torch.randn(500, prior.clip_embed_dim) + 2.0, dim=-1)
    U.fit_standardisation(prior, z)
    x = prior.pre_process_latents(z)
    torch.testing.assert_close(x.mean(0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(z.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(prior.post_process_latents(x), z, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_prior_samples_unit_embeddings_and_keeps_the_candidate_closest_to_the_text(models):
    prior, _, clip = models
    z = U.sample_prior(prior, clip, CAPTIONS, steps=5, candidates=1, seed=0)
    assert z.shape == (3, clip.config["embed_dim"])
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(z, U.sample_prior(prior, clip, CAPTIONS, steps=5, candidates=1, seed=0))
    z_t = U.encode_captions(clip, CAPTIONS, prior.config["context_length"])["prompt_embeds"].cpu()
    # with 3 candidates the kept one is at least as close to z_t as the first candidate of the same draw
    many = U.sample_prior(prior, clip, CAPTIONS, steps=5, candidates=3, seed=0)
    first = U.sample_prior(prior, clip, CAPTIONS * 3, steps=5, candidates=1, seed=0)[:3]
    assert bool(((many * z_t).sum(-1) >= (first * z_t).sum(-1) - 1e-5).all())


@torch.no_grad()
def test_the_decoder_reads_the_image_embedding_through_time_and_context_tokens(models):
    _, decoder, clip = models
    model = decoder.model.eval()
    P, R, L = clip.config["embed_dim"], decoder.config["resolution"], decoder.config["context_length"]
    text = U.encode_captions(clip, CAPTIONS[:2], L)
    x, t = torch.randn(2, 3, R, R), torch.tensor([500, 500])
    z1, z2 = torch.nn.functional.normalize(torch.randn(2, P), dim=-1), torch.nn.functional.normalize(torch.randn(2, P), dim=-1)
    a, b = model(x, t, z1, **text), model(x, t, z2, **text)
    assert a.shape == (2, 3, R, R) and not torch.allclose(a, b)
    ctx, add = model.text_proj(image_embeddings=z1, prompt_embeds=text["prompt_embeds"],
                               text_encoder_hidden_states=text["text_hidden_states"], do_classifier_free_guidance=False)
    assert ctx.shape == (2, decoder.config["extra_tokens"] + L, model.unet.config.cross_attention_dim)
    assert add.shape == (2, model.unet.config.time_embed_dim)
    assert model.null_image_embedding().shape == (1, P)


@torch.no_grad()
def test_decode_is_deterministic_at_eta_0_and_varies_at_eta_1(models):
    _, decoder, clip = models
    R = decoder.config["resolution"]
    z = U.image_embeddings(clip, claim.world(R).fixed(2, seed=0).images)
    x_T = torch.randn(2, 3, R, R, generator=torch.Generator().manual_seed(0))
    a = U.decode(decoder, clip, z, None, steps=4, eta=0.0, x_T=x_T, seed=0)
    b = U.decode(decoder, clip, z, None, steps=4, eta=0.0, x_T=x_T, seed=5)
    c = U.decode(decoder, clip, z, None, steps=4, eta=1.0, x_T=x_T, seed=5)
    assert a.shape == (2, 3, R, R) and float(a.abs().max()) <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    only_caption = U.decode(decoder, clip, None, CAPTIONS[:2], steps=3)
    assert only_caption.shape == (2, 3, R, R)


def test_slerp_follows_the_great_circle():
    torch.manual_seed(0)
    a, b = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    th = torch.linspace(0, 1, 5)
    z = U.slerp(a, b, th)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z[0], a)
    torch.testing.assert_close(z[-1], b)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    omega = torch.arccos((a * b).sum())
    angles = torch.arccos((z @ a).clamp(-1, 1))
    torch.testing.assert_close(angles, th * omega, atol=1e-3, rtol=0)   # constant angular speed
    batched = U.slerp(torch.stack([a, b]), torch.stack([b, a]), 0.5)
    assert batched.shape == (2, 8)
    torch.testing.assert_close(U.slerp(a, a, 0.3), a)                   # parallel: the straight line


def test_verdicts_read_the_bars():
    m = {"prior_cosine": 0.9, "text_embedding_cosine": 0.5, "caption_accuracy_prior": 0.4,
         "caption_accuracy_text_embedding": 0.4}
    assert claim.verdicts(m) == {"prior_closer_than_text_embedding": True, "prior_at_least_as_accurate": True}
    m["prior_cosine"], m["caption_accuracy_prior"] = 0.5, 0.3
    assert claim.verdicts(m) == {"prior_closer_than_text_embedding": False, "prior_at_least_as_accurate": False}
    with pytest.raises(ValueError, match="prior_cosine"):
        claim.verdicts({})


def test_bad_input_is_a_clear_error(models):
    prior, decoder, clip = models
    P, R = clip.config["embed_dim"], decoder.config["resolution"]
    z = torch.nn.functional.normalize(torch.randn(2, P), dim=-1)
    with pytest.raises(ValueError, match="captions"):
        U.sample_prior(prior, clip, "a red circle")
    with pytest.raises(ValueError, match="candidates"):
        U.sample_prior(prior, clip, CAPTIONS, candidates=0)
    with pytest.raises(ValueError, match="scale"):
        U.sample_prior(prior, clip, CAPTIONS, scale=-1.0)
    with pytest.raises(ValueError, match="steps"):
        U.sample_prior(prior, clip, CAPTIONS, steps=0)
    with pytest.raises(ValueError, match="image_embeds"):
        U.decode(decoder, clip, torch.randn(2, P + 1), None)
    with pytest.raises(ValueError, match="image_embeds"):
        U.decode(decoder, clip, torch.full((2, P), float("nan")), None)
    with pytest.raises(ValueError, match="one per image embedding"):
        U.decode(decoder, clip, z, CAPTIONS)
    with pytest.raises(ValueError, match="eta"):
        U.decode(decoder, clip, z, None, eta=-0.5)
    with pytest.raises(ValueError, match="x_T"):
        U.decode(decoder, clip, z, None, x_T=torch.randn(2, 3, R + 1, R + 1))
    with pytest.raises(ValueError, match="image_embeds, captions"):
        U.decode(decoder, clip, None, None)
    with pytest.raises(ValueError, match="longer"):
        U.caption_tokens(clip, [" ".join(["red"] * 20)], 8)
    with pytest.raises(ValueError, match="images"):
        U.image_embeddings(clip, torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="theta"):
        U.slerp(z[0], z[1], 1.5)
    with pytest.raises(ValueError, match="one shape"):
        U.slerp(z[0], z, 0.5)
    with pytest.raises(ValueError, match="z0"):
        U.slerp(torch.full((P,), float("inf")), z[1], 0.5)
    with pytest.raises(ValueError, match="text_mask"):
        decoder.model(torch.randn(1, 3, R, R), torch.tensor([1]), z[:1], z[:1], torch.randn(1, 4, P), torch.ones(1, 3))
    with pytest.raises(ValueError, match="arm"):
        claim.Setting.embedding(object.__new__(claim.Setting), "image")


def test_the_decoder_refuses_a_unet_it_cannot_condition():
    c = recipe("shapes-unclip-decoder").config(SMOKE)
    good = U.decoder_unet_config(c)
    kw = {k: getattr(good, k) for k in ("sample_size", "in_channels", "out_channels", "block_out_channels",
                                        "down_block_types", "up_block_types", "mid_block_type", "layers_per_block",
                                        "cross_attention_dim", "attention_head_dim", "norm_num_groups",
                                        "resnet_time_scale_shift")}
    with pytest.raises(ValueError, match="class_embed_type"):
        UnCLIPDecoder(CondUNetConfig(**kw, class_embed_type=None), 64)
    with pytest.raises(ValueError, match="input channels"):
        UnCLIPDecoder(CondUNetConfig(**{**kw, "in_channels": 3}, class_embed_type="identity"), 64)
    with pytest.raises(ValueError, match="embedding_scale"):
        UnCLIPDecoder(good, 64, embedding_scale=0.0)
