"""Parity with diffusers: the same weights give the same outputs (max relative error <= 1e-5) for
random small UNet2DConditionModel and AutoencoderKL configurations, every parameter perturbed."""

import pytest
import torch
from parity_utils import perturb, rel_error

diffusers = pytest.importorskip("diffusers")

from diffusion_core.interop import from_diffusers  # noqa: E402
from diffusion_core.models.unet_cond import UNet2DCondition  # noqa: E402
from diffusion_core.models.vae import AutoencoderKL  # noqa: E402

TOL = 1e-5


UNET_CONFIGS = [
    # cross-attention, 1x1 conv projections, one layer per block
    dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
         attention_head_dim=2, norm_num_groups=8),
    # linear projections, per-block heads, two layers, two transformer layers, class embedding
    dict(block_out_channels=(16, 32, 32),
         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
         cross_attention_dim=12, attention_head_dim=(2, 4, 4), transformer_layers_per_block=2,
         use_linear_projection=True, norm_num_groups=8, num_class_embeds=7, in_channels=3, out_channels=5),
    # class-conditional, no cross-attention anywhere (the guidance chapter's digits model)
    dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D", layers_per_block=2,
         norm_num_groups=8, num_class_embeds=11, in_channels=1, out_channels=1),
    # no middle block, mixed layers per block
    dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
         layers_per_block=(1, 2), cross_attention_dim=16, attention_head_dim=1, norm_num_groups=4),
]


def _unet_pair(i: int):
    torch.manual_seed(i)
    theirs = diffusers.UNet2DConditionModel(sample_size=8, **UNET_CONFIGS[i]).eval()
    perturb(theirs, 100 + i)
    ours = from_diffusers(theirs).eval()
    assert isinstance(ours, UNet2DCondition)
    return theirs, ours


def _skips(ours: UNet2DCondition, x, t, ctx, labels):
    shapes = [(x.shape[0], ours.config.block_out_channels[0], *x.shape[2:])]
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.extend(s.shape for s in o[1])) for b in ours.down_blocks]
    ours(x, t, ctx, class_labels=labels)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("i", range(len(UNET_CONFIGS)))
def test_unet_matches_diffusers_with_and_without_residuals(i):
    theirs, ours = _unet_pair(i)
    c = theirs.config
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    t = torch.tensor([17, 901])
    has_cross = ours.config.cross_attention_dim is not None
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g) if has_cross else None
    labels = torch.tensor([1, c.num_class_embeds - 1]) if c.num_class_embeds else None
    with torch.no_grad():
        a = theirs(x, t, ctx, class_labels=labels).sample
        b = ours(x, t, ctx, class_labels=labels)
        assert a.shape == b.shape
        assert rel_error(a, b) <= TOL

        # ControlNet residuals on every skip and on the middle block's output
        shapes = _skips(ours, x, t, ctx, labels)
        down = [0.3 * torch.randn(s, generator=g) for s in shapes]
        mid_shape = shapes[-1]
        mid = 0.3 * torch.randn(mid_shape, generator=g)
        a = theirs(x, t, ctx, class_labels=labels, down_block_additional_residuals=tuple(down),
                   mid_block_additional_residual=mid).sample
        b = ours(x, t, ctx, class_labels=labels, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
        assert rel_error(a, b) <= TOL

        # T2I-Adapter features, one per down block (diffusers pops its list, so it gets a copy)
        feats = []
        for blk in ours.down_blocks:
            w = blk.resnets[0].out_channels
            res = x.shape[-1] // 2 ** len(feats)
            if not blk.has_cross_attention and blk.downsamplers is not None:
                res //= 2  # a DownBlock2D gets its feature after downsampling
            feats.append(0.3 * torch.randn(2, w, res, res, generator=g))
        a = theirs(x, t, ctx, class_labels=labels, down_intrablock_additional_residuals=list(feats)).sample
        b = ours(x, t, ctx, class_labels=labels, down_intrablock_additional_residuals=feats)
        assert rel_error(a, b) <= TOL


@pytest.mark.parametrize("i", [0, 1])
def test_unet_gradients_match_diffusers_so_training_is_the_same(i):
    """Training parity: the same loss gives the same gradient for every weight, ControlNet-style residuals
    (which carry gradient back to their producer) included."""
    theirs, ours = _unet_pair(i)
    c = theirs.config
    g = torch.Generator().manual_seed(10 + i)
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    t = torch.tensor([17, 901])
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    labels = torch.tensor([1, c.num_class_embeds - 1]) if c.num_class_embeds else None
    shapes = _skips(ours, x, t, ctx, labels)
    res = [0.3 * torch.randn(s, generator=g) for s in shapes]
    res.append(0.3 * torch.randn(shapes[-1], generator=g))  # the middle's (diffusers needs it with the skips)
    res_t = [r.clone().requires_grad_(True) for r in res]
    res_o = [r.clone().requires_grad_(True) for r in res]
    theirs(x, t, ctx, class_labels=labels, down_block_additional_residuals=tuple(res_t[:-1]),
           mid_block_additional_residual=res_t[-1]).sample.square().mean().backward()
    ours(x, t, ctx, class_labels=labels, down_block_additional_residuals=res_o[:-1],
         mid_block_additional_residual=res_o[-1]).square().mean().backward()
    t_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_error(t_params[name].grad, p.grad) <= 1e-4, name
    for a, b in zip(res_t, res_o):
        assert rel_error(a.grad, b.grad) <= 1e-4


VAE_CONFIGS = [
    dict(block_out_channels=(16,), layers_per_block=1, latent_channels=4, norm_num_groups=8),  # f = 1
    dict(block_out_channels=(16, 32), layers_per_block=2, latent_channels=3, norm_num_groups=8),  # f = 2
    dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
         in_channels=1, out_channels=1),  # f = 4
]


@pytest.mark.parametrize("i", range(len(VAE_CONFIGS)))
def test_vae_matches_diffusers_encode_and_decode(i):
    cfg = VAE_CONFIGS[i]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(i)
    theirs = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                     up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval()
    perturb(theirs, 200 + i)
    ours = from_diffusers(theirs).eval()
    assert isinstance(ours, AutoencoderKL) and ours.downsampling_factor == 2 ** (n - 1)
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2, theirs.config.in_channels, 16, 16, generator=g)
    with torch.no_grad():
        qa, qb = theirs.encode(x).latent_dist, ours.encode(x)
        assert rel_error(qa.mean, qb.mean) <= TOL and rel_error(qa.logvar, qb.logvar) <= TOL
        torch.testing.assert_close(qa.kl(), qb.kl(), rtol=TOL, atol=0)
        z = torch.randn(qa.mean.shape, generator=g)
        a, b = theirs.decode(z).sample, ours.decode(z)
        assert a.shape == b.shape == x.shape
        assert rel_error(a, b) <= TOL
        assert ours.scaling_factor == theirs.config.scaling_factor


def test_converters_refuse_configurations_they_do_not_implement():
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, use_quant_conv=False)
    with pytest.raises(ValueError, match="use_quant_conv=False"):
        from_diffusers(vae)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, layers_per_block=1, norm_num_groups=4,
        time_cond_proj_dim=8)  # (resnet_time_scale_shift="scale_shift" is built now: the GLIDE/IF family)
    with pytest.raises(ValueError, match="time_cond_proj_dim=8"):
        from_diffusers(unet)


def test_speed_benchmarks_run_and_return_ratios():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_cond.py"
    spec = importlib.util.spec_from_file_location("speed_cond", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from diffusion_core.models.unet_cond import CondUNetConfig
    from diffusion_core.models.vae import VAEConfig

    unet_cfg = CondUNetConfig(sample_size=8, **{k: v for k, v in UNET_CONFIGS[0].items() if k != "attention_head_dim"},
                              num_attention_heads=2)
    r = bench.cond_unet_fwd_bwd_vs_diffusers(unet_cfg, batch=1, repeats=1, warmup=0)
    assert r["ratio"] > 0 and r["ours_s"] > 0
    r = bench.vae_fwd_bwd_vs_diffusers(VAEConfig.tiny(f=2, sample_size=8), batch=1, repeats=1, warmup=0)
    assert r["ratio"] > 0
