"""ControlNet (chapter 07): diffusers parity with every weight random (zero convolutions included),
the paper's identity at initialisation, the zero convolution's gradient, composition and bad input."""

import pytest
import torch
from parity_utils import perturb, rel_error

from diffusion_core import presets
from diffusion_core.models.controlnet import (
    ControlNet,
    ControlNetConfig,
    MultiControlNet,
    zero_module,
)
from diffusion_core.models.unet_cond import CondUNetConfig, UNet2DCondition

TOL = 1e-5


def _tiny(**kw) -> CondUNetConfig:
    base = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=1, cross_attention_dim=12, num_attention_heads=2, norm_num_groups=8)
    base.update(kw)
    return CondUNetConfig(**base)


# ------------------------------------------------------------------------------------------------
# the paper's claims about the construction
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [_tiny(), _tiny(mid_block_type="UNetMidBlock2D", layers_per_block=(2, 1)),
                                 _tiny(num_class_embeds=5, in_channels=6)])
def test_fresh_controlnet_leaves_the_locked_model_bit_identical(cfg):
    torch.manual_seed(0)
    unet = UNet2DCondition(cfg).eval()
    perturb(unet, 1)
    net = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16, 16))
    x = torch.randn(3, cfg.in_channels, 8, 8)
    ctx = torch.randn(3, 5, 12)
    labels = torch.tensor([0, 2, 4]) if cfg.num_class_embeds else None
    cond = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        base = unet(x, 10, ctx, class_labels=labels)
        down, mid = net(x, 10, ctx, cond, class_labels=labels)
        both = unet(x, 10, ctx, class_labels=labels, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in down)
    assert torch.equal(base, both)
    # the copy is the encoder's weights, exactly
    for name, p in unet.state_dict().items():
        if not name.startswith(("up_blocks", "conv_norm_out", "conv_out")):
            assert torch.equal(net.state_dict()[name], p), name


def test_zero_convolution_gets_a_gradient_and_moves_off_zero():
    # y = W x + b with W = 0: dL/dW = dL/dy x^T is non-zero, so one step makes W non-zero (paper, Sec. 3.1)
    torch.manual_seed(0)
    unet = UNet2DCondition(_tiny()).eval().requires_grad_(False)
    net = ControlNet.from_unet(unet, conditioning_channels=3, conditioning_embedding_out_channels=(8, 16, 16))
    x, ctx, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12), torch.rand(2, 3, 32, 32)
    down, mid = net(x, 5, ctx, cond)
    out = unet(x, 5, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    out.square().mean().backward()
    for zc in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        assert zc.weight.grad.abs().sum() > 0
    # behind the output zero convs nothing learns yet: the gradient reaching the copy is W^T dL/dy = 0
    emb = net.controlnet_cond_embedding.conv_out.weight
    assert emb.grad is None or not emb.grad.any()
    assert not net.down_blocks[0].resnets[0].conv1.weight.grad.any()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    assert net.controlnet_mid_block.weight.abs().sum() > 0
    # after one step the output zero convs are non-zero, and the gradient reaches the copy and E's zero conv
    down, mid = net(x, 5, ctx, cond)
    unet(x, 5, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).square().mean().backward()
    assert emb.grad.abs().sum() > 0
    assert net.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0


def test_conditioning_scale_scales_every_residual_and_zero_switches_control_off():
    torch.manual_seed(0)
    unet = UNet2DCondition(_tiny()).eval()
    net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16))
    perturb(net, 3)
    x, ctx, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        d1, m1 = net(x, 5, ctx, cond, conditioning_scale=1.0)
        d2, m2 = net(x, 5, ctx, cond, conditioning_scale=0.5)
        d0, m0 = net(x, 5, ctx, cond, conditioning_scale=0.0)
    for a, b, c in zip(d1 + [m1], d2 + [m2], d0 + [m0]):
        torch.testing.assert_close(0.5 * a, b)
        assert not c.any()


def test_two_controlnets_add_their_residuals():
    torch.manual_seed(0)
    unet = UNet2DCondition(_tiny()).eval()
    a = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16, 16))
    b = ControlNet.from_unet(unet, conditioning_channels=3, conditioning_embedding_out_channels=(8, 16, 16))
    perturb(a, 1)
    perturb(b, 2)
    multi = MultiControlNet([a, b])
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    ca, cb = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        da, ma = a(x, 5, ctx, ca, 0.7)
        db, mb = b(x, 5, ctx, cb, 1.3)
        d, m = multi(x, 5, ctx, [ca, cb], [0.7, 1.3])
    for s, u, v in zip(d + [m], da + [ma], db + [mb]):
        torch.testing.assert_close(s, u + v)


def test_sd15_preset_has_the_public_checkpoints_parameter_count():
    assert presets.count_parameters(presets.build("controlnet-sd15")) == 361_279_120


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_mismatch():
    torch.manual_seed(0)
    unet = UNet2DCondition(_tiny()).eval()
    net = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16, 16))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match=r"controlnet_cond has shape \(2, 3, 32, 32\); expected \(2, 1, 32, 32\)"):
        net(x, 5, ctx, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="controlnet_cond has shape .* downsamples by 4"):
        net(x, 5, ctx, torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="controlnet_cond must be a tensor"):
        net(x, 5, ctx, None)
    bad = torch.rand(2, 1, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net(x, 5, ctx, bad)
    with pytest.raises(ValueError, match="conditioning_scale must be finite"):
        net(x, 5, ctx, torch.rand(2, 1, 32, 32), conditioning_scale=float("inf"))
    with pytest.raises(ValueError, match="conditioning_scale must be a number"):
        net(x, 5, ctx, torch.rand(2, 1, 32, 32), conditioning_scale="strong")
    with pytest.raises(ValueError, match="expects x of shape"):
        net(torch.randn(2, 3, 8, 8), 5, ctx, torch.rand(2, 1, 32, 32))

    # a ControlNet built for another UNet
    other = UNet2DCondition(_tiny(block_out_channels=(16, 48)))
    with pytest.raises(ValueError, match="built for another UNet: its block_out_channels"):
        net.check_fits(other)
    net.check_fits(unet)
    with torch.no_grad():
        down, mid = net(x, 5, ctx, torch.rand(2, 1, 32, 32))
        with pytest.raises(ValueError, match=r"down_block_additional_residuals\[\d+\] has shape"):
            other(x, 5, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        with pytest.raises(ValueError, match="built for another UNet"):
            other(x, 5, ctx, down_block_additional_residuals=down[:-1])

    multi = MultiControlNet([net, net])
    with pytest.raises(ValueError, match="list of 2 condition images"):
        multi(x, 5, ctx, [torch.rand(2, 1, 32, 32)])
    with pytest.raises(ValueError, match="conditioning_scale has 3 entries for 2"):
        multi(x, 5, ctx, [torch.rand(2, 1, 32, 32)] * 2, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="ControlNet 1: .*controlnet_cond has shape"):
        multi(x, 5, ctx, [torch.rand(2, 1, 32, 32), torch.rand(2, 2, 32, 32)])
    with pytest.raises(ValueError, match="not a ControlNet"):
        MultiControlNet([net, unet])
    with pytest.raises(ValueError, match="ControlNet.from_unet needs a UNet2DCondition"):
        ControlNet.from_unet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="channel_order must be 'rgb' or 'bgr'"):
        ControlNetConfig(_tiny(), controlnet_conditioning_channel_order="rbg")
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels"):
        ControlNetConfig(_tiny(), conditioning_embedding_out_channels=())


def test_zero_module_zeroes_every_parameter():
    conv = zero_module(torch.nn.Conv2d(3, 4, 3))
    assert not conv.weight.any() and not conv.bias.any()


# ------------------------------------------------------------------------------------------------
# diffusers parity: every weight random, the zero convolutions included
# ------------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")

CONTROLNET_CONFIGS = [
    # SD-like: cross-attention, 8x condition embedding (diffusers' default widths, smaller)
    dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
         cross_attention_dim=12, attention_head_dim=2, norm_num_groups=8,
         conditioning_embedding_out_channels=(8, 8, 16, 16)),
    # three levels, 4x embedding, one-channel condition, linear projections, class labels, two layers
    dict(block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                            "DownBlock2D"),
         layers_per_block=2, cross_attention_dim=12, attention_head_dim=(2, 4, 4), use_linear_projection=True,
         transformer_layers_per_block=2, norm_num_groups=8, num_class_embeds=7, in_channels=6, conditioning_channels=1,
         conditioning_embedding_out_channels=(8, 16, 16)),
    # no cross-attention at all, a one-resnet middle, bgr conditions
    dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"), mid_block_type="UNetMidBlock2D",
         layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, controlnet_conditioning_channel_order="bgr",
         conditioning_embedding_out_channels=(4, 8)),
]


def _pair(i):
    torch.manual_seed(i)
    theirs = diffusers.ControlNetModel(**CONTROLNET_CONFIGS[i]).eval()
    perturb(theirs, 200 + i)
    from diffusion_core.interop import from_diffusers

    ours = from_diffusers(theirs).eval()
    assert isinstance(ours, ControlNet)
    return theirs, ours


@pytest.mark.parametrize("i", range(len(CONTROLNET_CONFIGS)))
@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_matches_diffusers(i, guess_mode):
    theirs, ours = _pair(i)
    c = theirs.config
    k = ours.controlnet_config.embedding_downscale
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    cond = torch.rand(2, c.conditioning_channels, 8 * k, 8 * k, generator=g)
    has_cross = ours.config.cross_attention_dim is not None
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g) if has_cross else None
    labels = torch.tensor([1, c.num_class_embeds - 1]) if c.num_class_embeds else None
    with torch.no_grad():
        a = theirs(x, torch.tensor([3, 700]), ctx, cond, conditioning_scale=0.8, class_labels=labels,
                   guess_mode=guess_mode)
        b = ours(x, torch.tensor([3, 700]), ctx, cond, conditioning_scale=0.8, class_labels=labels,
                 guess_mode=guess_mode)
    assert len(a.down_block_res_samples) == len(b.down_block_res_samples)
    for u, v in zip(a.down_block_res_samples, b.down_block_res_samples):
        assert u.shape == v.shape and rel_error(u, v) <= TOL
    assert rel_error(a.mid_block_res_sample, b.mid_block_res_sample) <= TOL


def test_multi_controlnet_matches_diffusers_and_drives_the_unet_alike():
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from diffusion_core.interop import from_diffusers

    unet_kw = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=12,
                   attention_head_dim=2, norm_num_groups=8)
    torch.manual_seed(0)
    t_unet = diffusers.UNet2DConditionModel(sample_size=8, **unet_kw).eval()
    perturb(t_unet, 1)
    nets = [diffusers.ControlNetModel.from_unet(t_unet, conditioning_embedding_out_channels=(8, 16, 16),
                                                conditioning_channels=ch) for ch in (1, 3)]
    for j, n in enumerate(nets):
        perturb(n, 10 + j)
    t_multi = MultiControlNetModel(nets).eval()
    o_unet, o_multi = from_diffusers(t_unet).eval(), from_diffusers(t_multi).eval()
    assert isinstance(o_multi, MultiControlNet)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    conds = [torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)]
    with torch.no_grad():
        td, tm = t_multi(x, 9, ctx, conds, [0.6, 1.2], return_dict=False)
        od, om = o_multi(x, 9, ctx, conds, [0.6, 1.2], return_dict=False)
        for u, v in zip(td, od):
            assert rel_error(u, v) <= TOL
        a = t_unet(x, 9, ctx, down_block_additional_residuals=td, mid_block_additional_residual=tm).sample
        b = o_unet(x, 9, ctx, down_block_additional_residuals=od, mid_block_additional_residual=om)
    assert rel_error(a, b) <= TOL


def test_from_unet_copies_what_diffusers_copies():
    from diffusion_core.interop import from_diffusers

    torch.manual_seed(0)
    t_unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=8).eval()
    perturb(t_unet, 3)
    theirs = diffusers.ControlNetModel.from_unet(t_unet, conditioning_embedding_out_channels=(8, 16, 16))
    ours = ControlNet.from_unet(from_diffusers(t_unet), conditioning_embedding_out_channels=(8, 16, 16))
    t_state, o_state = theirs.state_dict(), ours.state_dict()
    assert set(t_state) == set(o_state)
    for k, v in t_state.items():
        assert v.shape == o_state[k].shape, k
        if not k.startswith("controlnet_cond_embedding.") or k.startswith("controlnet_cond_embedding.conv_out"):
            assert torch.equal(v, o_state[k]), k  # copied encoder weights and every zero conv
