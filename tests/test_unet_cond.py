"""The conditional UNet: shapes, the ControlNet / T2I-Adapter / IP-Adapter seams, the
class-conditional variant without cross-attention, the SD 1.5 preset, clear errors."""

import pytest
import torch

from diffusion_core import presets
from diffusion_core.models.attention import AttnProcessor
from diffusion_core.models.transformer import Transformer2DModel
from diffusion_core.models.unet_cond import CondUNetConfig, UNet2DCondition

SMALL = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
             num_attention_heads=2, norm_num_groups=8)


def _tiny():
    torch.manual_seed(0)
    return UNet2DCondition(CondUNetConfig(**SMALL)).eval()


def _inputs(b=2, hw=8, ctx_dim=24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, hw, hw, generator=g), torch.tensor([3, 700])[:b], torch.randn(b, 5, ctx_dim, generator=g)


def _skip_shapes(unet, x, t, ctx):
    """Record the skip connections' shapes by hooking the blocks."""
    shapes = [(x.shape[0], unet.config.block_out_channels[0], *x.shape[2:])]
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.extend(s.shape for s in o[1])) for b in unet.down_blocks]
    with torch.no_grad():
        unet(x, t, ctx)
    for h in hooks:
        h.remove()
    return shapes


def test_forward_shape_and_timestep_broadcast():
    unet = _tiny()
    x, t, ctx = _inputs()
    with torch.no_grad():
        out = unet(x, t, ctx)
        assert out.shape == x.shape
        torch.testing.assert_close(unet(x, 50, ctx), unet(x, torch.tensor([50, 50]), ctx))


def test_output_depends_on_the_text_through_cross_attention():
    unet = _tiny()
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, ctx), unet(x, t, ctx + 1.0))


def test_controlnet_residuals_add_to_every_skip_and_the_mid_block():
    unet = _tiny()
    x, t, ctx = _inputs()
    shapes = _skip_shapes(unet, x, t, ctx)
    assert len(shapes) == 1 + 2 + 1  # conv_in, block 0's (resnet, downsampler), block 1's resnet
    zeros = [torch.zeros(s) for s in shapes]
    mid = torch.zeros(2, 32, 4, 4)
    with torch.no_grad():
        base = unet(x, t, ctx)
        # zero residuals (ControlNet's zero convolutions at init) leave the model unchanged
        torch.testing.assert_close(unet(x, t, ctx, down_block_additional_residuals=zeros,
                                        mid_block_additional_residual=mid), base, rtol=0, atol=0)
        # each residual is used: sample i of a batch perturbs skip i only (the last one: the mid)
        n = len(shapes) + 1
        xs, ts, cs = x[:1].expand(n, -1, -1, -1), t[:1].expand(n), ctx[:1].expand(n, -1, -1)
        res = [torch.zeros(n, *s[1:]) for s in shapes]
        for i in range(len(shapes)):
            res[i][i] += 0.5
        mids = torch.zeros(n, *mid.shape[1:])
        mids[-1] += 0.5
        out = unet(xs, ts, cs, down_block_additional_residuals=res, mid_block_additional_residual=mids)
        for i in range(n):
            assert not torch.allclose(out[i], base[0], atol=1e-4), f"residual {i} had no effect"


def test_controlnet_residual_reaches_only_the_skip_but_a_t2i_feature_also_feeds_the_down_path():
    """The same tensor added to the last down block's output: as a ControlNet residual it changes
    only the skip connection; as a T2I-Adapter feature it also flows into the middle block."""
    unet = _tiny()
    x, t, ctx = _inputs()
    shapes = _skip_shapes(unet, x, t, ctx)
    r = [torch.zeros(s) for s in shapes]
    r[-1] = torch.randn(shapes[-1])
    with torch.no_grad():
        out = unet(x, t, ctx, down_block_additional_residuals=r)
        intra = unet(x, t, ctx, down_intrablock_additional_residuals=[torch.zeros(shapes[1]), r[-1]])
    assert not torch.allclose(out, intra)


def test_t2i_intrablock_residuals_zero_is_identity_and_list_is_not_consumed():
    unet = _tiny()
    x, t, ctx = _inputs()
    feats = [torch.zeros(2, 16, 8, 8), torch.zeros(2, 32, 4, 4)]
    with torch.no_grad():
        base = unet(x, t, ctx)
        torch.testing.assert_close(unet(x, t, ctx, down_intrablock_additional_residuals=feats), base,
                                   rtol=0, atol=0)
        assert len(feats) == 2  # the caller's list is not popped
        feats[0] = feats[0] + 1.0
        assert not torch.allclose(unet(x, t, ctx, down_intrablock_additional_residuals=feats), base)


class ScaledProcessor(torch.nn.Module):
    """An IP-Adapter-like processor: the default attention plus ``scale`` times an extra term."""

    def __init__(self):
        super().__init__()
        self.base = AttnProcessor()
        self.calls = 0

    def forward(self, attn, hidden_states, encoder_hidden_states=None, scale=0.0, **kw):
        self.calls += 1
        return self.base(attn, hidden_states, encoder_hidden_states, **kw) + scale


def test_cross_attention_processors_can_be_swapped_by_diffusers_name():
    unet = _tiny()
    x, t, ctx = _inputs()
    names = [n for n, _ in unet.cross_attentions()]
    # 1 cross-attn down block x 1 layer, the mid block, 1 cross-attn up block x 2 layers
    assert len(names) == 1 + 1 + 2
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in names
    with torch.no_grad():
        base = unet(x, t, ctx)
        proc = ScaledProcessor()
        unet.set_cross_attention_processors(proc)
        assert all(a.processor is proc for _, a in unet.cross_attentions())
        torch.testing.assert_close(unet(x, t, ctx), base)  # scale 0: unchanged
        assert proc.calls == len(names)
        assert not torch.allclose(unet(x, t, ctx, cross_attention_kwargs={"scale": 0.3}), base)
        # attn1 (self-attention) keeps its default processor and never sees the kwargs
        assert all(isinstance(m.attn1.processor, AttnProcessor)
                   for m in unet.modules() if hasattr(m, "attn1"))
        # per-layer dict with diffusers' ".processor" keys
        unet.set_cross_attention_processors({f"{n}.processor": AttnProcessor() for n in names})
        torch.testing.assert_close(unet(x, t, ctx), base)
    with pytest.raises(ValueError, match="missing"):
        unet.set_cross_attention_processors({names[0]: AttnProcessor()})


def test_class_conditional_unet_without_cross_attention():
    torch.manual_seed(0)
    cfg = CondUNetConfig.class_conditional(num_classes=10, in_channels=1, sample_size=8, block_out_channels=(16, 32))
    unet = UNet2DCondition(cfg).eval()
    assert not any(isinstance(m, Transformer2DModel) for m in unet.modules())
    assert unet.class_embedding.num_embeddings == 11
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        a = unet(x, 10, class_labels=torch.tensor([0, 1, 10]))
        b = unet(x, 10, class_labels=torch.tensor([0, 2, 10]))
    assert a.shape == x.shape
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="needs class_labels"):
        unet(x, 10)
    with pytest.raises(ValueError, match="no cross-attention"):
        unet(x, 10, torch.randn(3, 4, 8), class_labels=torch.tensor([0, 1, 2]))


def test_training_step_backpropagates_to_every_parameter():
    unet = _tiny().train()
    x, t, ctx = _inputs()
    unet(x, t, ctx).pow(2).mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None]
    assert not missing


def test_sd15_preset_parameter_count():
    unet = presets.build("sd15-unet")
    assert presets.count_parameters(unet) == 859_520_964
    assert len(list(unet.cross_attentions())) == 16


def test_bad_inputs_raise_errors_that_name_the_problem():
    unet = _tiny()
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4, H, W\)"):
        unet(torch.randn(2, 3, 8, 8), t, ctx)
    with pytest.raises(ValueError, match="not divisible by 2"):
        unet(torch.randn(2, 4, 9, 8), t, ctx)
    with pytest.raises(ValueError, match="context dim 16, but the model's cross_attention_dim is 24"):
        unet(x, t, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        unet(x, t)
    with pytest.raises(ValueError, match="t must be a scalar or of shape"):
        unet(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="got 2 down_block_additional_residuals .ControlNet.; the UNet has 4"):
        unet(x, t, ctx, down_block_additional_residuals=[torch.zeros(1)] * 2)
    with pytest.raises(ValueError, match="mid_block_additional_residual has shape"):
        unet(x, t, ctx, mid_block_additional_residual=torch.zeros(2, 32, 8, 8))
    with pytest.raises(ValueError, match="no class embedding"):
        unet(x, t, ctx, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not divisible into 5 attention heads"):
        CondUNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_attention_heads=5,
                       cross_attention_dim=8, norm_num_groups=8)
    with pytest.raises(ValueError, match="need cross_attention_dim"):
        CondUNetConfig(cross_attention_dim=None)
    with pytest.raises(ValueError, match="unknown down block"):
        CondUNetConfig(down_block_types=("AttnDownBlock2D",) * 4)


def test_spatial_transformer_linear_and_conv_projections_compute_the_same_function():
    torch.manual_seed(0)
    conv = Transformer2DModel(2, 8, 16, cross_attention_dim=12, norm_num_groups=4).eval()
    lin = Transformer2DModel(2, 8, 16, cross_attention_dim=12, norm_num_groups=4, use_linear_projection=True).eval()
    sd = {k: v.flatten(1) if k.startswith("proj_") and k.endswith("weight") else v
          for k, v in conv.state_dict().items()}
    lin.load_state_dict(sd)
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, ctx), lin(x, ctx))


def test_cross_attention_treats_the_context_as_a_set_of_tokens():
    """K and V come from the context tokens and nothing marks their order: permuting the tokens
    leaves the output unchanged, while changing one token changes it."""
    torch.manual_seed(0)
    tr = Transformer2DModel(2, 8, 16, cross_attention_dim=12, norm_num_groups=4).eval()
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    with torch.no_grad():
        out = tr(x, ctx)
        torch.testing.assert_close(tr(x, ctx[:, [3, 0, 4, 1, 2]]), out)
        ctx2 = ctx.clone()
        ctx2[:, 2] += 1.0
        assert not torch.allclose(tr(x, ctx2), out)
    with pytest.raises(ValueError, match="context dim 7"):
        tr(x, torch.randn(2, 5, 7))


def test_adapter_features_that_do_not_fit_the_unet_name_the_block():
    from diffusion_core.models.t2i_adapter import T2IAdapter, T2IAdapterConfig

    torch.manual_seed(0)
    cfg = CondUNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         cross_attention_dim=12, num_attention_heads=2, norm_num_groups=8)
    unet = UNet2DCondition(cfg).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    assert unet.adapter_shapes(2, 8, 8) == [(2, 16, 8, 8), (2, 32, 4, 4)]
    fits = T2IAdapter(T2IAdapterConfig(in_channels=1, channels=(16, 32), num_res_blocks=1, downscale_factor=4))
    wide = T2IAdapter(T2IAdapterConfig(in_channels=1, channels=(24, 32), num_res_blocks=1, downscale_factor=4))
    coarse = T2IAdapter(T2IAdapterConfig(in_channels=1, channels=(16, 32), num_res_blocks=1, downscale_factor=8))
    cond = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = unet(x, 3, ctx, down_intrablock_additional_residuals=fits(cond))
        assert out.shape == x.shape
        with pytest.raises(ValueError, match=r"\[0\] \(T2I-Adapter feature\) has shape \(2, 24, 8, 8\); down block 0 "
                                             r"needs \(2, 16, 8, 8\)"):
            unet(x, 3, ctx, down_intrablock_additional_residuals=wide(cond))
        with pytest.raises(ValueError, match="has shape \\(2, 16, 4, 4\\); down block 0 needs"):
            unet(x, 3, ctx, down_intrablock_additional_residuals=coarse(cond))
        with pytest.raises(ValueError, match="got 4 down_intrablock_additional_residuals"):
            unet(x, 3, ctx, down_intrablock_additional_residuals=fits(cond) + fits(cond))
        with pytest.raises(ValueError, match="T2I-Adapter feature"):
            unet(x, 3, ctx, down_intrablock_additional_residuals=[None])


def test_zero_groups_or_heads_are_value_errors_not_zero_division():
    small = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, norm_num_groups=8)
    with pytest.raises(ValueError, match="CondUNetConfig: norm_num_groups must be positive"):
        CondUNetConfig(**{**small, "norm_num_groups": 0})  # before: ZeroDivisionError
    for heads in (0, -4, (4, 0)):
        with pytest.raises(ValueError, match="CondUNetConfig: num_attention_heads must be positive"):
            CondUNetConfig(**small, num_attention_heads=heads)
    with pytest.raises(ValueError, match="Transformer2DModel: norm_num_groups must be positive"):
        Transformer2DModel(4, 8, 32, norm_num_groups=0)  # before: ZeroDivisionError
    with pytest.raises(ValueError, match="Transformer2DModel: heads must be positive"):
        Transformer2DModel(0, 8, 32, norm_num_groups=8)
