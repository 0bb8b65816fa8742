"""The KL autoencoder: shapes for every f, the posterior's algebra, the latent scale, clear errors."""

import math

import pytest
import torch

from diffusion_core import presets
from diffusion_core.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, compute_latent_scale


@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_encode_decode_shapes_for_every_downsampling_factor(f):
    torch.manual_seed(0)
    cfg = VAEConfig.tiny(f=f, latent_channels=3)
    assert cfg.downsampling_factor == f and len(cfg.block_out_channels) == int(math.log2(f)) + 1
    vae = AutoencoderKL(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    q = vae.encode(x)
    assert q.mean.shape == q.logvar.shape == q.std.shape == (2, 3, 16 // f, 16 // f)
    assert vae.decode(q.sample()).shape == x.shape
    assert vae(x).shape == x.shape
    if f == 1:
        assert all(b.downsamplers is None for b in vae.encoder.down_blocks)


def test_posterior_sample_kl_and_mode_follow_the_formulas():
    params = torch.randn(3, 8, 4, 4)
    params[:, 4:][0, 0, 0, 0] = 100.0  # clamped to 20
    q = DiagonalGaussian(params)
    mean, logvar = params[:, :4], params[:, 4:].clamp(-30, 20)
    assert q.logvar.max().item() == 20.0
    torch.testing.assert_close(q.std, torch.exp(0.5 * logvar))
    assert torch.equal(q.mode(), mean)
    # the reparameterisation z = mean + std * eps with the generator's eps
    z = q.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * eps)
    # KL against N(0, I), per sample, equals the sum of per-dimension Gaussian KLs
    var = logvar.exp()
    kl_ref = (0.5 * (mean**2 + var - 1 - logvar)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(), kl_ref)
    # a standard normal posterior has zero KL
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_sample_is_differentiable_in_mean_and_std():
    vae = AutoencoderKL(VAEConfig.tiny(f=2))
    x = torch.randn(1, 3, 8, 8)
    q = vae.encode(x)
    loss = (vae.decode(q.sample()) - x).pow(2).mean() + 1e-3 * q.kl().mean()
    loss.backward()
    assert vae.encoder.conv_in.weight.grad is not None and vae.quant_conv.weight.grad.abs().sum() > 0


def test_compute_latent_scale_is_one_over_latent_std():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny(f=2))
    x = torch.rand(10, 3, 8, 8) * 2 - 1
    s = compute_latent_scale(vae, x, generator=torch.Generator().manual_seed(1), batch_size=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 4]).sample(g) for i in range(0, 10, 4)])
    assert s == pytest.approx(1.0 / z.std().item(), rel=1e-6)
    assert (z * s).std().item() == pytest.approx(1.0, rel=1e-5)  # rescaled latents have unit variance


def test_sd15_preset_counts_and_scaling_factor():
    vae = presets.build("sd15-vae")
    assert presets.count_parameters(vae) == 83_653_863
    assert vae.scaling_factor == 0.18215 and vae.downsampling_factor == 8


def test_bad_inputs_raise_errors_that_name_the_problem():
    vae = AutoencoderKL(VAEConfig.tiny(f=4))
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        vae.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor f=4"):
        vae.encode(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"expects latents \(B, 4, h, w\)"):
        vae.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="f must be one of"):
        VAEConfig.tiny(f=3)
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        VAEConfig(block_out_channels=(30, 64), norm_num_groups=8)


@pytest.mark.parametrize("kwargs, words", [({"norm_num_groups": 0}, "norm_num_groups must be positive"),
                                           ({"norm_num_groups": -8}, "norm_num_groups must be positive"),
                                           ({"latent_channels": 0}, "latent_channels must be positive"),
                                           ({"block_out_channels": (0, 32)}, "block_out_channels must all be positive")])
def test_zero_groups_or_channels_are_value_errors(kwargs, words):
    with pytest.raises(ValueError, match=f"VAEConfig: {words}"):  # before: ZeroDivisionError or a broken model
        VAEConfig(**{"block_out_channels": (32, 64), "norm_num_groups": 8, **kwargs})
