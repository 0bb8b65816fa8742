"""The pixel text-conditional UNet of GLIDE, unCLIP's decoder and DeepFloyd IF (chapters 11-13):
the same weights give diffusers' outputs (max relative error <= 1e-5) for small configurations of
``UNet2DConditionModel`` with residual-block resampling, added-K/V attention, scale-shift norm, text
and class embeddings, every parameter perturbed; ``UnCLIPTextProjModel`` likewise; options this
package does not build are errors that name the diffusers config key."""

import pytest
import torch
from parity_utils import perturb, rel_error

diffusers = pytest.importorskip("diffusers")

from diffusion_core.interop import from_diffusers  # noqa: E402
from diffusion_core.models.unclip import UnCLIPTextProjModel  # noqa: E402
from diffusion_core.models.unet_cond import CondUNetConfig, UNet2DCondition  # noqa: E402

TOL = 1e-5
GLIDE_DOWN = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
GLIDE_UP = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")

CONFIGS = {
    # GLIDE: AdaGN, added-K/V attention, the final text token into the time embedding (projection)
    "glide": dict(block_out_channels=(16, 32), down_block_types=GLIDE_DOWN, up_block_types=GLIDE_UP,
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=2, cross_attention_dim=24,
                  attention_head_dim=8, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
                  class_embed_type="projection", projection_class_embeddings_input_dim=24,
                  resnet_out_scale_factor=2**0.5, in_channels=3, out_channels=6),
    # DeepFloyd IF stage I: GELU, group-normed text, T5 tokens projected (text_proj) and pooled into the
    # time embedding; per-block head widths (up block i takes entry i), only_cross_attention per block
    "if": dict(block_out_channels=(16, 32, 32), down_block_types=("ResnetDownsampleBlock2D",
               "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
               up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=(1, 2, 1), cross_attention_dim=64,
               encoder_hid_dim=48, encoder_hid_dim_type="text_proj", attention_head_dim=(4, 8, 16),
               addition_embed_type="text", addition_embed_type_num_heads=4, cross_attention_norm="group_norm",
               resnet_time_scale_shift="scale_shift", act_fn="gelu", time_embedding_act_fn="gelu",
               resnet_skip_time_act=True, only_cross_attention=(False, False, True), norm_num_groups=8,
               out_channels=6),
    # unCLIP's decoder (Karlo): the projected CLIP embeddings as class_labels (identity), extra tokens
    "karlo": dict(block_out_channels=(16, 32), down_block_types=GLIDE_DOWN, up_block_types=GLIDE_UP,
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
                  class_embed_type="identity", in_channels=3, out_channels=6),
    # DeepFloyd IF stage II as diffusers' convert_if.py writes it: the noise level of the augmented
    # low-resolution input (concatenated to x_t) as a "timestep" class label, the pooled text added,
    # GELU time embedding and no activation before each block's projection, skips scaled by 1/0.7071,
    # cross-attention only, its own time width, per-block depth
    "if_stage2": dict(block_out_channels=(16, 32, 32), down_block_types=("ResnetDownsampleBlock2D",
                      "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
                      up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                      mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=(1, 1, 2), in_channels=6,
                      out_channels=6, cross_attention_dim=32, encoder_hid_dim=40, attention_head_dim=8,
                      addition_embed_type="text", addition_embed_type_num_heads=4, class_embed_type="timestep",
                      time_embedding_dim=32, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
                      act_fn="gelu", time_embedding_act_fn="gelu", resnet_skip_time_act=True,
                      resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071,
                      only_cross_attention=True, norm_num_groups=8),
    # mixed: plain, transformer and added-K/V blocks; noise level as a "timestep" class label (IF stage
    # II's embedding, without its class_embeddings_concat); own time width; scaled middle
    "mixed": dict(block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                  "SimpleCrossAttnDownBlock2D"), up_block_types=("SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                  "UpBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=1,
                  cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, class_embed_type="timestep",
                  time_embedding_dim=40, mid_block_scale_factor=1.5, resnet_out_scale_factor=1.25,
                  resnet_skip_time_act=True, only_cross_attention=(False, False, True),
                  mid_block_only_cross_attention=True, resnet_time_scale_shift="scale_shift"),
}


def _pair(name: str, seed: int = 0):
    torch.manual_seed(seed)
    theirs = diffusers.UNet2DConditionModel(sample_size=8, **CONFIGS[name]).eval()
    perturb(theirs, 100 + seed)
    ours = from_diffusers(theirs).eval()
    assert isinstance(ours, UNet2DCondition)
    return theirs, ours


def _inputs(theirs, g, batch=2, tokens=5):
    c = theirs.config
    x = torch.randn(batch, c.in_channels, 8, 8, generator=g)
    width = c.encoder_hid_dim or c.cross_attention_dim
    ctx = torch.randn(batch, tokens, width, generator=g)
    labels = None
    if c.class_embed_type == "projection":
        labels = torch.randn(batch, c.projection_class_embeddings_input_dim, generator=g)
    elif c.class_embed_type == "identity":
        labels = torch.randn(batch, 4 * c.block_out_channels[0], generator=g)
    elif c.class_embed_type == "timestep":
        labels = torch.tensor([3.0, 250.0])
    return x, ctx, labels


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pixel_text_unet_matches_diffusers(name):
    theirs, ours = _pair(name)
    g = torch.Generator().manual_seed(1)
    x, ctx, labels = _inputs(theirs, g)
    t = torch.tensor([17, 901])
    with torch.no_grad():
        a = theirs(x, t, ctx, class_labels=labels).sample
        b = ours(x, t, ctx, class_labels=labels)
    assert a.shape == b.shape == (2, theirs.config.out_channels, 8, 8)
    assert rel_error(a, b) <= TOL


@pytest.mark.parametrize("norm, only_cross", [(None, False), ("group_norm", False), ("layer_norm", False),
                                              ("group_norm", True)])
def test_added_kv_attention_matches_diffusers(norm, only_cross):
    """One attention layer of the family against diffusers' Attention with AttnAddedKVProcessor2_0:
    text keys/values before the image's, a normed text, a text mask (not with only_cross_attention,
    where diffusers pads the mask for image keys that are not there)."""
    from diffusers.models.attention_processor import Attention as TheirAttention
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

    from diffusion_core.models.attention import Attention

    torch.manual_seed(0)
    kw = dict(heads=4, dim_head=8, bias=True, norm_num_groups=8, added_kv_proj_dim=32, only_cross_attention=only_cross,
              cross_attention_norm=norm)
    theirs = TheirAttention(32, cross_attention_dim=32, upcast_softmax=True, processor=AttnAddedKVProcessor2_0(), **kw)
    perturb(theirs, 1)
    ours = Attention(32, residual_connection=True, **kw)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(2)
    h, c = torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 6, 32, generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        assert rel_error(theirs(h, c), ours(h, c)) <= TOL
        if not only_cross:
            bias = ((1 - keep.float()) * -10000.0)[:, None]  # as UNet2DConditionModel makes it
            a = theirs(h, c, attention_mask=bias)
            assert rel_error(a, ours(h, c, attention_mask=keep.bool()[:, None, None])) <= TOL
            assert rel_error(a, ours(h, c, attention_mask=bias[:, None])) <= TOL  # an additive bias works too


@pytest.mark.parametrize("name", ["glide", "karlo"])
def test_attention_mask_over_padded_text_matches_diffusers(name):
    theirs, ours = _pair(name, seed=3)
    g = torch.Generator().manual_seed(4)
    x, ctx, labels = _inputs(theirs, g, tokens=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # the second caption is padded
    t = torch.tensor([5, 640])
    with torch.no_grad():
        a = theirs(x, t, ctx, class_labels=labels, attention_mask=mask).sample
        b = ours(x, t, ctx, class_labels=labels, attention_mask=mask)
        assert rel_error(a, b) <= TOL
        # the padding is really ignored: other values there change nothing
        ctx2 = ctx.clone()
        ctx2[1, 3:] = torch.randn(3, ctx.shape[-1], generator=g)
        c = ours(x, t, ctx2, class_labels=labels, attention_mask=mask.bool())
        assert rel_error(b, c) <= TOL
        # without the mask the padding counts, and encoder_attention_mask is the same mask
        assert rel_error(b, ours(x, t, ctx2, class_labels=labels)) > 1e-3
        assert rel_error(b, ours(x, t, ctx, class_labels=labels, encoder_attention_mask=mask)) <= TOL


def test_karlo_decoder_with_unclip_text_projection_matches_diffusers():
    """unCLIP's decoder step as diffusers' UnCLIPPipeline runs it: the text projection makes the
    context (4 extra tokens + projected text) and the time addition (as class_labels), the text mask
    is padded with ones for the extra tokens, classifier-free guidance doubles the batch."""
    try:
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel as TheirProj
    except ImportError:  # diffusers >= 0.36 keeps unCLIP among its deprecated pipelines
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as TheirProj

    theirs, ours = _pair("karlo", seed=5)
    torch.manual_seed(6)
    their_proj = TheirProj(clip_extra_context_tokens=4, clip_embeddings_dim=20, time_embed_dim=64,
                           cross_attention_dim=32).eval()
    perturb(their_proj, 7)
    our_proj = from_diffusers(their_proj)
    assert isinstance(our_proj, UnCLIPTextProjModel)
    g = torch.Generator().manual_seed(8)
    image = torch.randn(2, 20, generator=g)
    prompt = torch.randn(4, 20, generator=g)  # [unconditional; conditional] captions
    states = torch.randn(4, 5, 20, generator=g)
    text_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    kw = dict(image_embeddings=image, prompt_embeds=prompt, text_encoder_hidden_states=states,
              do_classifier_free_guidance=True)
    x = torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        ctx_a, add_a = their_proj(**kw)
        ctx_b, add_b = our_proj(**kw)
        assert ctx_b.shape == (4, 4 + 5, 32) and add_b.shape == (4, 64)
        assert rel_error(ctx_a, ctx_b) <= TOL and rel_error(add_a, add_b) <= TOL
        mask = torch.nn.functional.pad(text_mask, (4, 0), value=True)
        a = theirs(x, 300, ctx_a, class_labels=add_a, attention_mask=mask).sample
        b = ours(x, 300, ctx_b, class_labels=add_b, attention_mask=mask)
    assert rel_error(a, b) <= TOL


def test_karlo_decoder_preset_counts_diffusers_parameters_on_meta():
    """The preset is the decoder configuration of diffusers' Karlo conversion script
    (scripts/convert_kakao_brain_unclip_to_diffusers.py, DECODER_CONFIG)."""
    from diffusion_core import presets

    karlo = dict(sample_size=64, layers_per_block=3, block_out_channels=(320, 640, 960, 1280), in_channels=3,
                 out_channels=6, down_block_types=GLIDE_DOWN[:1] + GLIDE_DOWN[1:] * 3,
                 up_block_types=GLIDE_UP[:1] * 3 + GLIDE_UP[1:], mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                 cross_attention_dim=1536, class_embed_type="identity", attention_head_dim=64,
                 resnet_time_scale_shift="scale_shift")
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**karlo)
    ours = presets.build("karlo-decoder", device="meta")
    assert presets.count_parameters(ours) == presets.count_parameters(theirs) == 885_439_686
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_if_stage1_xl_converts_from_its_diffusers_config_on_meta():
    """The full-size IF stage I XL configuration goes through the converter: diffusers' model (on the
    meta device) and ours from its config have the same parameter names and shapes."""
    from diffusion_core.models.unet_cond import _unet_config_from_diffusers

    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**CondUNetConfig.if_stage1_xl().to_diffusers_config())
        ours = UNet2DCondition(_unet_config_from_diffusers(theirs.config))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 4_304_695_110


def test_config_round_trips_through_diffusers():
    for name in ("glide", "if", "karlo"):
        theirs, ours = _pair(name)
        assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
        back = diffusers.UNet2DConditionModel(**ours.config.to_diffusers_config())
        assert from_diffusers(back).config == ours.config


def test_saved_folders_load_with_load_pretrained(tmp_path):
    """A diffusers folder (config.json with every key diffusers writes, safetensors) of an IF-like UNet
    and of unCLIP's text projection loads into our classes with the same outputs."""
    from diffusion_core.interop import load_pretrained

    theirs, _ = _pair("if")
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_pretrained(tmp_path, subfolder="unet").eval()
    g = torch.Generator().manual_seed(2)
    x, ctx, labels = _inputs(theirs, g)
    with torch.no_grad():
        assert rel_error(theirs(x, 7, ctx).sample, ours(x, 7, ctx)) <= TOL

    try:
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel as TheirProj
    except ImportError:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as TheirProj
    proj = TheirProj(clip_extra_context_tokens=2, clip_embeddings_dim=8, time_embed_dim=12, cross_attention_dim=6)
    perturb(proj, 9)
    proj.save_pretrained(tmp_path / "text_proj")
    loaded = load_pretrained(tmp_path / "text_proj")
    assert isinstance(loaded, UnCLIPTextProjModel)
    kw = dict(image_embeddings=torch.randn(1, 8), prompt_embeds=torch.randn(2, 8),
              text_encoder_hidden_states=torch.randn(2, 3, 8), do_classifier_free_guidance=True)
    with torch.no_grad():
        for a, b in zip(proj(**kw), loaded(**kw)):
            assert rel_error(a, b) <= TOL


@pytest.mark.parametrize("key, value", [
    ("class_embeddings_concat", True),  # IF stage II: the noise level's embedding concatenated
    ("addition_embed_type", "text_time"),  # SDXL
    ("encoder_hid_dim_type", "image_proj"),
    ("cross_attention_norm", "layer_norm"),
    ("act_fn", "mish"),
    ("time_cond_proj_dim", 8),
])
def test_unsupported_diffusers_option_is_an_error_naming_the_key(key, value):
    from diffusion_core.models.unet_cond import _unet_config_from_diffusers

    config = dict(CONFIGS["glide"], sample_size=8, **{key: value})
    if key == "encoder_hid_dim_type":
        config["encoder_hid_dim"] = 24
    with pytest.raises(ValueError, match=key):
        _unet_config_from_diffusers(config)


def test_concatenated_class_embedding_is_refused_by_name():
    """A class embedding concatenated to the time embedding (``class_embeddings_concat``, doubling
    the width the blocks take) is not built here: converting it names the key."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(sample_size=8, **dict(
        CONFIGS["glide"], class_embed_type="timestep", projection_class_embeddings_input_dim=None,
        class_embeddings_concat=True, in_channels=6))
    with pytest.raises(ValueError, match="class_embeddings_concat=True"):
        from_diffusers(theirs)


def test_bad_inputs_are_errors_naming_the_argument():
    _, ours = _pair("glide")
    x, ctx = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 24)
    labels = torch.randn(2, 24)
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, 1, ctx)  # projection needs the text vector
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, 1, ctx, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(x, 1, ctx, class_labels=labels, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(x, 1, ctx, class_labels=labels, attention_mask=torch.full((2, 5), 0.5))
    _, mixed = _pair("mixed")
    with pytest.raises(ValueError, match="spatial transformers"):
        mixed(torch.randn(2, 4, 8, 8), 1, torch.randn(2, 5, 16), class_labels=torch.tensor([1.0, 2.0]),
              attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="only_cross_attention"):
        CondUNetConfig.tiny().__class__(**{**CondUNetConfig.tiny().__dict__, "only_cross_attention": True})
