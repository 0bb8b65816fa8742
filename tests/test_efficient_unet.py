"""Imagen's Efficient U-Net (Saharia et al. 2022, App. B.1) as options of the one conditional UNet:
per-level ``layers_per_block``, ``skip_scale`` on the skips, ``downsample_first``. Each option does
what it says (hooks on a tiny model), shapes and gradients are fine, bad values are clear errors,
and the per-level tuple matches diffusers. The defaults are covered by the existing parity tests."""

import math

import pytest
import torch

from diffusion_core.models.controlnet import ControlNet
from diffusion_core.models.unet_cond import CondUNetConfig, UNet2DCondition, unet_config_from_diffusers

CROSS = dict(block_out_channels=(16, 32, 32),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             layers_per_block=(1, 2, 3), cross_attention_dim=24, num_attention_heads=2, norm_num_groups=8)
# the pixel text-conditional family (IF): residual-block resampling, added-K/V attention, AdaGN
GLIDE = dict(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3,
             down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
             up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
             mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=(1, 2, 3), cross_attention_dim=24,
             attention_head_dim=8, norm_num_groups=8, resnet_time_scale_shift="scale_shift")


def _unet(base=CROSS, **options):
    torch.manual_seed(0)
    return UNet2DCondition(CondUNetConfig(**{**base, **options})).eval()


def _inputs(cfg, b=2, hw=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, cfg.in_channels, hw, hw, generator=g), torch.tensor([3, 700])[:b],
            torch.randn(b, 5, cfg.cross_attention_dim, generator=g))


def _resnet_input_shapes(blocks):
    """{(block index, layer index): input shape} of every residual block (not the resamplers)."""
    shapes, hooks = {}, []
    for b, block in enumerate(blocks):
        for j, r in enumerate(block.resnets):
            hooks.append(r.register_forward_pre_hook(
                lambda m, args, key=(b, j): shapes.__setitem__(key, tuple(args[0].shape))))
    return shapes, hooks


def test_downsample_first_runs_the_first_down_blocks_resnets_at_half_resolution():
    for flag in (False, True):
        unet = _unet(downsample_first=flag)
        x, t, ctx = _inputs(unet.config)
        down, hooks = _resnet_input_shapes(unet.down_blocks)
        up, more = _resnet_input_shapes(unet.up_blocks)
        mid: list[tuple[int, ...]] = []
        hooks += more + [unet.mid_block.register_forward_pre_hook(lambda m, a, mid=mid: mid.append(tuple(a[0].shape)))]
        with torch.no_grad():
            out = unet(x, t, ctx)
        for h in hooks:
            h.remove()
        assert out.shape == (2, 4, 16, 16)
        if flag:  # level i at 16 / 2^(i+1); the downsampler already made the width (16 -> 16, 16 -> 32)
            assert down[(0, 0)] == (2, 16, 8, 8) and down[(1, 0)] == (2, 32, 4, 4) and down[(2, 2)] == (2, 32, 2, 2)
            assert mid == [(2, 32, 2, 2)]
            # up block i runs at the resolution of down block n-1-i and upsamples after: the last at 8x8
            assert up[(0, 0)][2:] == (2, 2) and up[(1, 0)][2:] == (4, 4) and up[(2, 1)][2:] == (8, 8)
            assert unet.up_blocks[-1].upsamplers is not None
        else:  # the standard UNet: level i at 16 / 2^i, the first residual block makes the width
            assert down[(0, 0)] == (2, 16, 16, 16) and down[(1, 0)] == (2, 16, 8, 8) and down[(2, 2)] == (2, 32, 4, 4)
            assert mid == [(2, 32, 4, 4)]
            assert up[(2, 1)][2:] == (16, 16) and unet.up_blocks[-1].upsamplers is None


@pytest.mark.parametrize("base", [CROSS, GLIDE], ids=["cross", "glide"])
def test_downsample_first_skips_are_the_downsamplers_and_layers_outputs(base):
    unet = _unet(base, downsample_first=True)
    x, t, ctx = _inputs(unet.config)
    skips = []
    hooks = [b.register_forward_hook(lambda m, i, o: skips.extend(tuple(s.shape) for s in o[1]))
             for b in unet.down_blocks]
    with torch.no_grad():
        unet(x, t, ctx)
    for h in hooks:
        h.remove()
    # no conv_in skip: nothing at 16x16 consumes it
    assert skips == unet.skip_shapes(2, 16, 16)
    assert len(skips) == sum(len(b.resnets) for b in unet.up_blocks) == (1 + 1) + (2 + 1) + (3 + 1)
    assert all(s[2] < 16 for s in skips)
    assert unet.config.downsampling_factor == 8


@pytest.mark.parametrize("base", [CROSS, GLIDE], ids=["cross", "glide"])
def test_skip_scale_multiplies_exactly_the_skips(base):
    s = 0.5  # a power of two: the product is exact, so the check can be torch.equal
    scaled, plain = _unet(base, skip_scale=s), _unet(base)
    plain.load_state_dict(scaled.state_dict())
    x, t, ctx = _inputs(scaled.config)
    emb = scaled.time_embed(x, t, None, ctx)
    with torch.no_grad():
        h_scaled, skips = scaled.encode(scaled.conv_in(x), emb, ctx)
        h_plain, skips_plain = plain.encode(plain.conv_in(x), emb, ctx)
    # the encoder does not change
    assert torch.equal(h_scaled, h_plain) and all(torch.equal(a, b) for a, b in zip(skips, skips_plain))
    seen = []
    hooks = [r.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for block in scaled.up_blocks for r in block.resnets]
    with torch.no_grad():
        scaled(x, t, ctx)
    for h in hooks:
        h.remove()
    # up block resnets run in order and take the skips last first: each input is cat([h, s * skip])
    assert len(seen) == len(skips)
    for inp, skip in zip(seen, reversed(skips)):
        c = skip.shape[1]
        assert torch.equal(inp[:, -c:], s * skip)
    with torch.no_grad():
        assert not torch.allclose(scaled(x, t, ctx), plain(x, t, ctx))
    assert all(b.skip_scale == 1.0 for b in plain.up_blocks)


@pytest.mark.parametrize("base", [CROSS, GLIDE], ids=["cross", "glide"])
def test_all_options_give_the_right_shape_and_gradients_everywhere(base):
    unet = _unet(base, skip_scale=2 ** -0.5, downsample_first=True).train()
    x, t, ctx = _inputs(unet.config)
    out = unet(x, t, ctx)
    assert out.shape == (2, unet.config.out_channels, 16, 16)
    out.square().mean().backward()
    for name, p in unet.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() > 0 for p in unet.parameters()) > 0.9 * len(list(unet.parameters()))


def test_downsample_first_needs_inputs_divisible_by_2_to_the_levels():
    unet = _unet(downsample_first=True)
    x, t, ctx = _inputs(unet.config, hw=12)  # divisible by 4 (the standard UNet's factor), not by 8
    with pytest.raises(ValueError, match="divisible by 8"):
        unet(x, t, ctx)
    _unet()(x, t, ctx)  # the standard UNet takes it


def test_controlnet_and_t2i_adapter_seams_work_with_downsample_first():
    unet = _unet(downsample_first=True, skip_scale=2 ** -0.5)
    x, t, ctx = _inputs(unet.config)
    with torch.no_grad():
        base = unet(x, t, ctx)
        net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        down, mid = net(x, t, ctx, controlnet_cond=torch.rand(2, 3, 32, 32))
        assert [tuple(d.shape) for d in down] == unet.skip_shapes(2, 16, 16)
        assert torch.equal(unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid),
                           base)  # fresh zero convs: base + ControlNet = base
        feats = [torch.zeros(s) for s in unet.adapter_shapes(2, 16, 16)]
        assert [f.shape[2] for f in feats] == [8, 4, 2]
        assert torch.equal(unet(x, t, ctx, down_intrablock_additional_residuals=feats), base)
        feats.append(torch.zeros(2, 32, 2, 2))  # and one for the middle (its resolution is the last block's)
        assert torch.equal(unet(x, t, ctx, down_intrablock_additional_residuals=feats), base)


@pytest.mark.parametrize("options, field", [
    (dict(layers_per_block=(1, 2)), "layers_per_block"),
    (dict(layers_per_block=(1, 0, 2)), "layers_per_block"),
    (dict(skip_scale=0.0), "skip_scale"),
    (dict(skip_scale=-2 ** -0.5), "skip_scale"),
    (dict(skip_scale=math.nan), "skip_scale"),
    (dict(skip_scale="1/sqrt(2)"), "skip_scale"),
    (dict(downsample_first="yes"), "downsample_first"),
])
def test_bad_options_are_errors_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        CondUNetConfig(**{**CROSS, **options})


@pytest.mark.parametrize("options, field", [(dict(skip_scale=2 ** -0.5), "skip_scale"),
                                            (dict(downsample_first=True), "downsample_first")])
def test_our_own_options_have_no_diffusers_config(options, field):
    cfg = CondUNetConfig(**{**CROSS, **options})
    with pytest.raises(ValueError, match=f"{field}.*no diffusers equivalent"):
        cfg.to_diffusers_config()
    # the converter never sets them: a round trip of the same config without them keeps the defaults
    back = unet_config_from_diffusers(CondUNetConfig(**CROSS).to_diffusers_config())
    assert back.skip_scale == 1.0 and back.downsample_first is False and back.layers_per_block == (1, 2, 3)


@pytest.mark.parametrize("base", [CROSS, GLIDE], ids=["cross", "glide"])
def test_per_level_layers_per_block_matches_diffusers(base):
    diffusers = pytest.importorskip("diffusers")
    from parity_utils import perturb, rel_error

    from diffusion_core.interop import from_diffusers

    cfg = CondUNetConfig(**base)
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**cfg.to_diffusers_config()).eval()
    perturb(theirs, 7)
    ours = from_diffusers(theirs).eval()
    assert ours.config.layers_per_block == (1, 2, 3)
    # down block i has layers_per_block[i] residual blocks, up block i reversed(...)[i] + 1
    assert [len(b.resnets) for b in ours.down_blocks] == [len(b.resnets) for b in theirs.down_blocks] == [1, 2, 3]
    assert [len(b.resnets) for b in ours.up_blocks] == [len(b.resnets) for b in theirs.up_blocks] == [4, 3, 2]
    x, t, ctx = _inputs(cfg, hw=8)
    with torch.no_grad():
        assert rel_error(theirs(x, t, ctx).sample, ours(x, t, ctx)) <= 1e-5


def test_benchmark_runs_and_the_efficient_unet_saves_flops_and_activations_at_equal_parameters():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_efficient_unet.py"
    spec = importlib.util.spec_from_file_location("speed_efficient_unet", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(batch=1, repeats=1, warmup=0, names=("regular", "efficient"))
    reg, eff = r["regular"], r["efficient"]
    assert abs(eff["params"] / reg["params"] - 1) < 0.02  # parameters moved, not removed
    assert eff["gflops_fwd_bwd"] < 0.5 * reg["gflops_fwd_bwd"] and eff["saved_mb"] < 0.6 * reg["saved_mb"]
    assert eff["seconds"] > 0 and "efficient" in bench.table(r)


# -- the pixel UNet (DDPM/ADM, chapters 01-02) takes the same options through the same blocks -------------------------
def _pixel(**options):
    from diffusion_core.models.unet import UNet2D, UNetConfig

    torch.manual_seed(0)
    return UNet2D(UNetConfig.tiny(block_out_channels=(16, 32), norm_num_groups=8, **options)).eval()


def test_pixel_unet_downsample_first_and_skip_scale():
    unet = _pixel(layers_per_block=(1, 2), downsample_first=True, skip_scale=0.5)
    x = torch.randn(2, 3, 16, 16)
    down, hooks = _resnet_input_shapes(unet.down_blocks)
    seen = []
    hooks += [r.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in unet.up_blocks for r in b.resnets]
    skips = []
    hooks += [b.register_forward_hook(lambda m, i, o: skips.extend(o[1])) for b in unet.down_blocks]
    with torch.no_grad():
        out = unet(x, 5)
    for h in hooks:
        h.remove()
    assert out.shape == x.shape
    assert down[(0, 0)] == (2, 16, 8, 8) and down[(1, 1)] == (2, 32, 4, 4)
    assert [len(b.resnets) for b in unet.down_blocks] == [1, 2] and [len(b.resnets) for b in unet.up_blocks] == [3, 2]
    assert len(seen) == len(skips) == 5
    for inp, skip in zip(seen, reversed(skips)):
        assert torch.equal(inp[:, -skip.shape[1]:], 0.5 * skip)
    unet.train()(x, 5).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())
    with pytest.raises(ValueError, match="multiples of 4"):
        unet(torch.randn(1, 3, 6, 6), 5)


@pytest.mark.parametrize("options, field", [
    (dict(layers_per_block=(1, 2, 3)), "layers_per_block"),
    (dict(layers_per_block=(1, 0)), "layers_per_block"),
    (dict(skip_scale=0), "skip_scale"),
    (dict(skip_scale=math.inf), "skip_scale"),
    (dict(downsample_first=1), "downsample_first"),
])
def test_pixel_unet_bad_options_are_errors_naming_the_field(options, field):
    from diffusion_core.models.unet import UNetConfig

    with pytest.raises(ValueError, match=field):
        UNetConfig.tiny(**options)


def test_pixel_unet_own_options_have_no_diffusers_config():
    from diffusion_core.models.unet import UNetConfig

    for options, field in ((dict(skip_scale=0.5), "skip_scale"), (dict(downsample_first=True), "downsample_first"),
                           (dict(layers_per_block=(1, 2)), "layers_per_block")):
        with pytest.raises(ValueError, match=f"{field}.*no diffusers equivalent"):
            UNetConfig.tiny(**options).to_diffusers_config()
    d = UNetConfig.tiny().to_diffusers_config()
    assert "skip_scale" not in d and "downsample_first" not in d
    assert UNetConfig.tiny(layers_per_block=(1, 1)).to_diffusers_config() == d
    with pytest.raises(ValueError, match="unknown UNet2DModel keys.*skip_scale"):
        UNetConfig.from_diffusers_config({**d, "skip_scale": 0.5})
