"""CLIP (chapter 05): shapes, the causal mask, pooling, the temperature and the contrastive loss."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_core import presets
from diffusion_core.interop import CheckpointMismatchError
from diffusion_core.models.clip import (
    LOGIT_SCALE_INIT,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    clip_logits,
    clip_loss,
    load_clip_state_dict,
)


@pytest.fixture
def text_cfg():
    return CLIPTextConfig.tiny(vocab_size=50, max_position_embeddings=10, eos_token_id=2)


@pytest.fixture
def vision_cfg():
    return CLIPVisionConfig.tiny(image_size=16, patch_size=4)


def ids_with_eos(B=3, N=10, eos=2, at=(4, 6, 9), vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, N), generator=g)
    for b in range(B):
        ids[b, at[b]] = eos
    return ids


# ---------------------------------------------------------------- presets and configs


@pytest.mark.parametrize(
    "name, count",
    [("clip-vit-l14-text", 123_060_480), ("clip-vit-l14-vision", 303_966_208), ("clip-vit-l14", 427_616_513)],
)
def test_preset_parameter_counts_equal_public_checkpoints(name, count):
    assert presets.count_parameters(presets.build(name, device="meta")) == count


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="clip-vit-l14-text"):
        presets.build("clip-vit-l99")


def test_sd15_text_encoder_layout_has_the_checkpoint_names():
    keys = set(presets.build("clip-vit-l14-text").state_dict())
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.encoder.layers.11.self_attn.out_proj.bias" in keys
    assert "text_model.final_layer_norm.weight" in keys
    assert not any("position_ids" in k for k in keys)
    vkeys = set(presets.build("clip-vit-l14-vision").state_dict())
    assert {
        "vision_model.pre_layrnorm.weight",
        "vision_model.embeddings.class_embedding",
        "visual_projection.weight",
    } <= vkeys
    assert "visual_projection.bias" not in vkeys


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(pooling="mean"), "pooling"),
        (dict(eos_token_id=999), "eos_token_id"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
    ],
)
def test_text_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig.tiny(**kwargs)


def test_vision_config_rejects_image_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CLIPVisionConfig.tiny(image_size=30, patch_size=4)


# ---------------------------------------------------------------- text tower


def test_text_model_shapes(text_cfg):
    model = CLIPTextModelWithProjection(text_cfg)
    out = model(ids_with_eos(), output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 10, 64)
    assert out.pooled.shape == (3, 64)
    assert out.text_embeds.shape == (3, 32)
    assert len(out.hidden_states) == text_cfg.num_hidden_layers + 1
    assert out.pooler_output is out.pooled


def test_causal_mask_later_tokens_do_not_change_earlier_states(text_cfg):
    model = CLIPTextModel(text_cfg).eval()
    ids = ids_with_eos()
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1 - 3) % 47 + 3  # a different ordinary token at position 7
    a = model(ids).last_hidden_state
    b = model(changed).last_hidden_state
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-4


def test_pooled_output_is_read_at_the_first_end_token(text_cfg):
    model = CLIPTextModel(text_cfg)
    ids = ids_with_eos(at=(4, 6, 9))
    ids[0, 8] = 2  # a second end token (padding with eos): the first one counts
    out = model(ids)
    torch.testing.assert_close(out.pooled, out.last_hidden_state[torch.arange(3), torch.tensor([4, 6, 9])])


def test_argmax_pooling_reads_the_largest_id(text_cfg):
    cfg = CLIPTextConfig.tiny(vocab_size=50, max_position_embeddings=10, pooling="argmax")
    model = CLIPTextModel(cfg)
    ids = torch.randint(0, 40, (2, 10))
    ids[0, 3] = 49
    ids[1, 8] = 49
    out = model(ids)
    torch.testing.assert_close(out.pooled, out.last_hidden_state[torch.arange(2), torch.tensor([3, 8])])


def test_missing_end_token_is_an_error(text_cfg):
    ids = torch.randint(3, 50, (2, 10))
    with pytest.raises(ValueError, match="no end-of-text token"):
        CLIPTextModel(text_cfg)(ids)


def test_bad_input_ids_are_errors(text_cfg):
    model = CLIPTextModel(text_cfg)
    with pytest.raises(ValueError, match="context length"):
        model(ids_with_eos(N=11, at=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model(ids_with_eos() + 100)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        model(ids_with_eos().float())


def test_padding_mask_hides_padded_tokens(text_cfg):
    model = CLIPTextModel(text_cfg).eval()
    ids = ids_with_eos(at=(4, 4, 4))
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    changed = ids.clone()
    changed[:, 5:] = 7
    a = model(ids, attention_mask=mask).last_hidden_state
    b = model(changed, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[:, :5], b[:, :5])


def test_clip_skip_uses_the_earlier_layer_through_the_final_layer_norm(text_cfg):
    model = CLIPTextModel(text_cfg)
    ids = ids_with_eos()
    out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(model.conditioning(ids), out.last_hidden_state)
    torch.testing.assert_close(
        model.conditioning(ids, clip_skip=1), model.text_model.final_layer_norm(out.hidden_states[-2])
    )
    with pytest.raises(ValueError, match="clip_skip"):
        model.conditioning(ids, clip_skip=2)


# ---------------------------------------------------------------- vision tower


def test_vision_model_shapes(vision_cfg):
    model = CLIPVisionModelWithProjection(vision_cfg)
    out = model(torch.randn(2, 3, 16, 16), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 1 + 16, 64)
    assert out.pooled.shape == (2, 64)
    assert out.image_embeds.shape == (2, 32)
    assert len(out.hidden_states) == vision_cfg.num_hidden_layers + 1
    torch.testing.assert_close(out.pooled, model.vision_model.post_layernorm(out.last_hidden_state[:, 0]))


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_a_model_with_projection_is_its_tower_model_plus_the_projection(tower, text_cfg, vision_cfg):
    """The *WithProjection models share their tower model's code: the same seeded tower weights, the
    same outputs, plus the projection of the pooled output; without a projection_dim, an error before
    anything is built."""
    from diffusion_core.models import clip

    cfg = text_cfg if tower == "text" else vision_cfg
    plain_cls, proj_cls = ((CLIPTextModel, CLIPTextModelWithProjection) if tower == "text"
                           else (CLIPVisionModel, CLIPVisionModelWithProjection))
    torch.manual_seed(0)
    plain = plain_cls(cfg)
    torch.manual_seed(0)
    proj = proj_cls(cfg)
    name, embeds = ("text_projection", "text_embeds") if tower == "text" else ("visual_projection", "image_embeds")
    assert list(proj.state_dict()) == list(plain.state_dict()) + [f"{name}.weight"]
    assert all(torch.equal(v, proj.state_dict()[k]) for k, v in plain.state_dict().items())
    x = ids_with_eos() if tower == "text" else torch.randn(2, 3, 16, 16)
    a, b = plain(x), proj(x)
    assert torch.equal(a.pooled, b.pooled) and getattr(a, embeds) is None
    torch.testing.assert_close(getattr(b, embeds), getattr(proj, name)(b.pooled))
    with pytest.raises(ValueError, match=f"{proj_cls.__name__} needs {type(cfg).__name__}.projection_dim"):
        proj_cls(dataclasses.replace(cfg, projection_dim=None))
    # the converters keep their public names (interop's registries resolve them by name)
    for fn_name in ("text_model", "text_model_with_projection", "vision_model", "vision_model_with_projection",
                    "clip_model"):
        for suffix in ("_from_transformers", "_from_transformers_config"):
            fn = getattr(clip, fn_name + suffix)
            assert fn.__name__ == fn_name + suffix and fn.__doc__


def test_vision_model_rejects_wrong_image_size(vision_cfg):
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        CLIPVisionModel(vision_cfg)(torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------- temperature and loss


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100(text_cfg, vision_cfg):
    model = CLIPModel(text_cfg, vision_cfg)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale.item() == pytest.approx(100.0)
    out = model(ids_with_eos(B=2, at=(3, 4)), torch.randn(2, 3, 16, 16))
    assert out.logits_per_image.abs().max().item() <= 100.0 + 1e-4


def test_clip_model_logits_and_loss(text_cfg, vision_cfg):
    model = CLIPModel(text_cfg, vision_cfg)
    ids, pix = ids_with_eos(), torch.randn(3, 3, 16, 16)
    out = model(ids, pix, return_loss=True)
    assert out.logits_per_image.shape == (3, 3)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    expected = clip_loss(model.encode_image(pix), model.encode_text(ids), LOGIT_SCALE_INIT)
    torch.testing.assert_close(out.loss, expected)


def test_clip_model_needs_one_projection_size(text_cfg):
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPModel(text_cfg, CLIPVisionConfig.tiny(projection_dim=16))


def test_clip_loss_is_the_mean_of_both_cross_entropies():
    g = torch.Generator().manual_seed(1)
    I, T = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    t = 2.0
    logits = math.exp(t) * F.normalize(I, dim=-1) @ F.normalize(T, dim=-1).T
    labels = torch.arange(5)
    manual = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(clip_loss(I, T, t), manual)
    torch.testing.assert_close(clip_logits(I, T, t), logits)


def test_clip_loss_is_symmetric_in_images_and_captions():
    g = torch.Generator().manual_seed(2)
    I, T = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    torch.testing.assert_close(clip_loss(I, T, 1.5), clip_loss(T, I, 1.5))


def test_clip_loss_of_aligned_embeddings_tends_to_zero_as_the_scale_grows():
    B = 4
    I = torch.eye(B, dtype=torch.float64) * 3.0  # orthogonal, any norm
    T = torch.eye(B, dtype=torch.float64)
    losses = []
    for s in (1.0, 10.0, 30.0, 100.0):
        loss = clip_loss(I, T, math.log(s)).item()
        assert loss == pytest.approx(math.log(1 + (B - 1) * math.exp(-s)), rel=1e-5, abs=1e-12)
        losses.append(loss)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 1e-12


def test_clip_loss_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="3 images and 4 captions"):
        clip_loss(torch.randn(3, 8), torch.randn(4, 8), 0.0)
    with pytest.raises(ValueError, match="8 features but text_embeds has 6"):
        clip_loss(torch.randn(3, 8), torch.randn(3, 6), 0.0)


def test_a_few_contrastive_steps_reduce_the_loss(text_cfg, vision_cfg):
    torch.manual_seed(0)
    model = CLIPModel(text_cfg, vision_cfg)
    ids, pix = ids_with_eos(B=4, at=(3, 5, 7, 9)), torch.randn(4, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = model(ids, pix, return_loss=True).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ---------------------------------------------------------------- loading


def test_loading_a_state_dict_of_another_config_names_the_mismatch(text_cfg):
    small = CLIPTextModel(text_cfg)
    other = CLIPTextModel(CLIPTextConfig.tiny(vocab_size=50, max_position_embeddings=10, num_hidden_layers=3))
    with pytest.raises(CheckpointMismatchError, match="layers.2"):
        load_clip_state_dict(small, other.state_dict())
    wider = CLIPTextModel(CLIPTextConfig.tiny(vocab_size=60, max_position_embeddings=10))
    with pytest.raises(CheckpointMismatchError, match="token_embedding.weight: \\(60, 64\\)"):
        load_clip_state_dict(small, wider.state_dict())


def test_loader_drops_position_ids_and_adds_the_tower_prefix(text_cfg):
    src, dst = CLIPTextModel(text_cfg), CLIPTextModel(text_cfg)
    bare = {k.removeprefix("text_model."): v for k, v in src.state_dict().items()}
    bare["embeddings.position_ids"] = torch.arange(10)[None]
    load_clip_state_dict(dst, bare)
    ids = ids_with_eos()
    torch.testing.assert_close(dst(ids).pooled, src(ids).pooled)
