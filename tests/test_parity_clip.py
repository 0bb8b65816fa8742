"""Our CLIP equals transformers' CLIP: random small configs, random weights, converted, compared."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from diffusion_core.interop import from_transformers  # noqa: E402
from diffusion_core.models import clip  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-5


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


def hf_text_config(width, layers, heads, act, eos, vocab=97, context=12, projection=24):
    return transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width + 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=context,
        hidden_act=act,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=eos,
        projection_dim=projection,
    )


def hf_vision_config(width, layers, heads, act, image, patch, projection=24):
    return transformers.CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=3 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=act,
        image_size=image,
        patch_size=patch,
        projection_dim=projection,
    )


def random_ids(B, N, vocab, eos, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (B, N), generator=g)
    for b in range(B):  # end token at different places, followed by eos padding in row 0
        pos = 2 + (3 * b) % (N - 2)
        ids[b, pos] = eos if eos != 2 else vocab - 1  # legacy rule: the largest id is the end token
        if b == 0:
            ids[b, pos:] = ids[b, pos]
    return ids


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_gain = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_gain else 0.0))
    return model.eval()


TEXT_CASES = [
    # width, layers, heads, act, eos
    (32, 1, 2, "quick_gelu", 2),
    (48, 2, 4, "gelu", 96),
    (64, 3, 8, "quick_gelu", 50),
    (40, 2, 5, "gelu", 2),
]


@pytest.mark.parametrize("width, layers, heads, act, eos", TEXT_CASES)
def test_text_model_with_projection_matches_transformers(width, layers, heads, act, eos):
    theirs = randomise(
        transformers.CLIPTextModelWithProjection(hf_text_config(width, layers, heads, act, eos)), 0
    )
    ours = from_transformers(theirs)
    assert isinstance(ours, clip.CLIPTextModelWithProjection)
    assert ours.config.pooling == ("argmax" if eos == 2 else "eos")
    ids = random_ids(3, 12, 97, eos, seed=width)
    with torch.no_grad():
        a = theirs(ids, output_hidden_states=True)
        b = ours(ids, output_hidden_states=True)
    assert rel_err(b.last_hidden_state, a.last_hidden_state) <= TOL
    assert rel_err(b.text_embeds, a.text_embeds) <= TOL
    for x, y in zip(b.hidden_states, a.hidden_states, strict=True):
        assert rel_err(x, y) <= TOL


@pytest.mark.parametrize("width, layers, heads, act, eos", TEXT_CASES[:2])
def test_text_model_matches_transformers_pooled_and_padding_mask(width, layers, heads, act, eos):
    theirs = randomise(transformers.CLIPTextModel(hf_text_config(width, layers, heads, act, eos)), 1)
    ours = from_transformers(theirs)
    assert isinstance(ours, clip.CLIPTextModel)
    ids = random_ids(3, 12, 97, eos, seed=3)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 10:] = 0
    with torch.no_grad():
        for m in (None, mask):
            a, b = theirs(ids, attention_mask=m), ours(ids, attention_mask=m)
            assert rel_err(b.last_hidden_state, a.last_hidden_state) <= TOL
            assert rel_err(b.pooled, a.pooler_output) <= TOL


VISION_CASES = [
    # width, layers, heads, act, image, patch
    (32, 1, 2, "quick_gelu", 16, 4),
    (48, 2, 4, "gelu", 24, 8),
    (64, 2, 8, "quick_gelu", 28, 14),
]


@pytest.mark.parametrize("width, layers, heads, act, image, patch", VISION_CASES)
def test_vision_model_with_projection_matches_transformers(width, layers, heads, act, image, patch):
    cfg = hf_vision_config(width, layers, heads, act, image, patch)
    theirs = randomise(transformers.CLIPVisionModelWithProjection(cfg), 2)
    ours = from_transformers(theirs)
    assert isinstance(ours, clip.CLIPVisionModelWithProjection)
    pix = torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(image))
    with torch.no_grad():
        a = theirs(pix, output_hidden_states=True)
        b = ours(pix, output_hidden_states=True)
    assert rel_err(b.last_hidden_state, a.last_hidden_state) <= TOL
    assert rel_err(b.image_embeds, a.image_embeds) <= TOL
    for x, y in zip(b.hidden_states, a.hidden_states, strict=True):
        assert rel_err(x, y) <= TOL


def test_vision_model_without_projection_matches_transformers():
    theirs = randomise(transformers.CLIPVisionModel(hf_vision_config(32, 2, 4, "gelu", 16, 8)), 3)
    ours = from_transformers(theirs)
    pix = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = theirs(pix), ours(pix)
    assert rel_err(b.last_hidden_state, a.last_hidden_state) <= TOL
    assert rel_err(b.pooled, a.pooler_output) <= TOL


@pytest.mark.parametrize("eos", [2, 96])
def test_clip_model_matches_transformers(eos):
    cfg = transformers.CLIPConfig(
        text_config=hf_text_config(32, 2, 4, "quick_gelu", eos).to_dict(),
        vision_config=hf_vision_config(48, 2, 4, "quick_gelu", 16, 4).to_dict(),
        projection_dim=24,
    )
    theirs = randomise(transformers.CLIPModel(cfg), 4)
    with torch.no_grad():
        theirs.logit_scale.fill_(2.6592)
    ours = from_transformers(theirs)
    assert isinstance(ours, clip.CLIPModel)
    ids, pix = random_ids(3, 12, 97, eos, seed=5), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = theirs(input_ids=ids, pixel_values=pix)
        b = ours(ids, pix)
    assert b.logits_per_image.shape == (2, 3)
    assert rel_err(b.logits_per_image, a.logits_per_image) <= TOL
    assert rel_err(b.text_embeds, a.text_embeds) <= TOL
    assert rel_err(b.image_embeds, a.image_embeds) <= TOL


def test_unknown_transformers_class_is_named():
    with pytest.raises(TypeError, match="CLIPTextModel"):
        from_transformers(torch.nn.Linear(2, 2))


def test_unsupported_activation_is_a_clear_error():
    cfg = hf_text_config(32, 1, 2, "relu", 96)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        from_transformers(transformers.CLIPTextModel(cfg))
