"""The shapes CLIP recipes: configs, the model and tokenizer they build, a few steps that lower the
loss, and the retrieval metric."""

from __future__ import annotations

import pytest
import torch

import diffusion_core as dc
from diffusion_core.models.clip import CLIPModel
from diffusion_core.recipes import clip as rc
from diffusion_core.store import recipe


@pytest.fixture(scope="module")
def config():
    c = rc.SHAPES_CLIP.config(dc.Profile("smoke", torch.device("cpu")))
    c.update(vision_width=32, text_width=32, vision_layers=1, text_layers=1, embed_dim=16, batch_size=32)
    return c


def test_recipes_are_registered_and_differ_only_in_their_seeds():
    p = dc.Profile("smoke", torch.device("cpu"))
    a, b = recipe("shapes-clip").config(p), recipe("shapes-clip-judge").config(p)
    assert {k for k in a if a[k] != b[k]} == {"seed", "data_seed"}


def test_build_and_tokenize_every_caption_and_prompt(config):
    model = rc._build(config)
    assert isinstance(model, CLIPModel)
    tok = rc.tokenizer_for(config)
    scenes = rc.training_world(config).sample(8, seed=0)
    texts = scenes.captions + [p for ps in scenes.paraphrases for p in ps] + scenes.heldout_paraphrases[0]
    ids = tok.encode(texts)
    assert ids.shape == (len(texts), config["context_length"])
    out = model(ids[:8], scenes.images, return_loss=True)
    assert out.logits_per_image.shape == (8, 8) and torch.isfinite(out.loss)


def test_a_few_steps_lower_the_contrastive_loss(config):
    model = rc._build(config)
    batch = next(rc.pair_batches(config, rc.tokenizer_for(config)))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = rc.contrastive_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_shapes_clip_embeddings_are_unit_vectors_and_similarity_is_per_pair(config):
    clip = rc.ShapesCLIP(rc._build(config).eval(), rc.tokenizer_for(config), config)
    scenes = rc.training_world(config).sample(5, seed=1)
    img, txt = clip.encode_image(scenes.images), clip.encode_text(scenes.captions)
    assert img.shape == txt.shape == (5, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(clip.similarity(scenes.images, scenes.captions), (img * txt).sum(-1), atol=1e-5)
    with pytest.raises(ValueError, match="one text per image"):
        clip.similarity(scenes.images, scenes.captions[:2])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        clip.encode_image(torch.zeros(1, 3, 16, 16))


def test_recall_at_k_on_known_rankings():
    assert rc.recall_at_k(torch.eye(4), (1,)) == {"image_to_text_recall_at_1": 1.0, "text_to_image_recall_at_1": 1.0}
    sims = torch.eye(4).roll(1, dims=1)  # every row's best match is the wrong one
    r = rc.recall_at_k(sims, (1, 2))
    assert r["image_to_text_recall_at_1"] == 0.0 and r["image_to_text_recall_at_2"] == 1.0


def test_k_shot_equivalent_interpolates_in_log_k():
    from diffusion_core.experiments.clip import k_shot_equivalent

    probes = {1: {"pair": 0.1}, 4: {"pair": 0.3}, 16: {"pair": 0.5}, "all": {"pair": 0.9}}
    assert k_shot_equivalent(probes, 0.4) == pytest.approx(8.0)
    assert k_shot_equivalent(probes, 0.05) == 1.0
    assert k_shot_equivalent(probes, 0.6) is None
