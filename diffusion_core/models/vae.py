"""The KL-regularised autoencoder of Latent Diffusion (Rombach et al. 2022, Sec. 3.1 and App. G).
Chapter 04 defines it.

An encoder ``E`` maps an image ``x`` of shape ``(B, 3, H, W)`` in ``[-1, 1]`` to the parameters of a
diagonal Gaussian over latents of shape ``(B, c, H/f, W/f)``; a decoder ``D`` maps a latent back to
an image. The downsampling factor is ``f = 2^(len(block_out_channels) - 1)``. Training (the
chapter's job) minimises a reconstruction loss plus a small KL term towards ``N(0, I)``:

    z = mu + sigma * eps,  eps ~ N(0, I)                              (the reparameterisation)
    KL(q(z|x) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)

The diffusion model then works on ``scaling_factor * z``: the paper rescales latents to unit
variance by ``1 / std(z)`` measured on data (:func:`compute_latent_scale`; 0.18215 for SD).

Parameter names follow diffusers' ``AutoencoderKL`` (``encoder.down_blocks.i.resnets.j``,
``quant_conv``, ``decoder.up_blocks.i.upsamplers.0.conv``, ...) so its checkpoints load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import batch_randn
from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D, check_block_channels


@dataclass
class VAEConfig:
    """The autoencoder's shape. ``f = 2^(len(block_out_channels) - 1)``."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    # z fed to the diffusion model is scaling_factor * z (LDM Sec. 4.3.2 / App. D.1)
    scaling_factor: float = 0.18215

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers_config(self) -> dict:
        """The keyword arguments of the equivalent diffusers ``AutoencoderKL``."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
            sample_size=self.sample_size, scaling_factor=self.scaling_factor,
        )

    @classmethod
    def sd15(cls) -> VAEConfig:
        """Stable Diffusion 1.x's KL-f8 autoencoder (``stabilityai/sd-vae-ft-mse``, 83,653,863 params)."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   norm_num_groups=32, sample_size=512, scaling_factor=0.18215)

    @classmethod
    def tiny(cls, f: int = 4, latent_channels: int = 4, sample_size: int = 32) -> VAEConfig:
        """A small autoencoder for the CPU chapters, with downsampling factor ``f`` in {1, 2, 4, 8}."""
        if f not in (1, 2, 4, 8):
            raise ValueError(f"VAEConfig.tiny: f must be one of 1, 2, 4, 8, got {f}")
        n = int(math.log2(f)) + 1
        return cls(block_out_channels=(32, 64, 64, 64)[:n], layers_per_block=1,
                   latent_channels=latent_channels, norm_num_groups=8, sample_size=sample_size,
                   scaling_factor=1.0)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if len(self.block_out_channels) < 1:
            raise ValueError("VAEConfig: block_out_channels needs at least one entry")
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig: {name} must be positive, got {getattr(self, name)}")
        check_block_channels("VAEConfig", self.block_out_channels, self.norm_num_groups)
        if self.layers_per_block < 1:
            raise ValueError(f"VAEConfig: layers_per_block must be >= 1, got {self.layers_per_block}")


class DiagonalGaussian:
    """``q(z | x) = N(mean, diag(exp(logvar)))``, from the encoder's ``(B, 2c, h, w)`` output.

    ``logvar`` is clamped to ``[-30, 20]`` (as in the LDM code) so that ``exp`` stays finite.
    ``mean``, ``logvar``, ``std``, ``var``: ``(B, c, h, w)``.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The reparameterisation ``z = mean + std * eps``, ``eps ~ N(0, I)``: differentiable in
        mean and std. ``generator`` may live on another device (e.g. a CPU generator)."""
        device = generator.device if generator is not None else self.mean.device
        eps = batch_randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, I)) = 1/2 sum_{c,h,w} (mean^2 + var - 1 - logvar)``, shape ``(B,)`` in nats."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def mode(self) -> torch.Tensor:
        """The most likely latent, ``mean``."""
        return self.mean


class DownEncoderBlock2D(nn.Module):
    """``layers`` residual blocks (no time input), then a stride-2 conv with asymmetric padding."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=1e-6)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=0)])
            if add_downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``layers`` residual blocks (no time input), then nearest x2 upsampling and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=1e-6)
            for i in range(num_layers)
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class VAEMidBlock(nn.Module):
    """resnet -> single-head self-attention over all h*w positions (residual) -> resnet.

    Names as diffusers' ``UNetMidBlock2D``: ``resnets.0, attentions.0, resnets.1``.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=1e-6) for _ in range(2)
        )
        self.attentions = nn.ModuleList([
            Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=1e-6,
                      residual_connection=True)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)`` (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, add_downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """``(B, latent_channels, h, w) -> (B, out_channels, f h, f w)``; each up block has one more
    residual block than the encoder's down blocks."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        rev = tuple(reversed(ch))
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], g)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, add_upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.conv_in(z)
        z = self.mid_block(z)
        for block in self.up_blocks:
            z = block(z)
        return self.conv_out(F.silu(self.conv_norm_out(z)))


class AutoencoderKL(nn.Module):
    """The KL autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``.

    ``x``: ``(B, in_channels, H, W)`` in ``[-1, 1]`` with H and W divisible by ``f``;
    ``z``: ``(B, latent_channels, H/f, W/f)`` (unscaled; multiply by ``scaling_factor`` before
    diffusion and divide after).
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else VAEConfig()
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``(B, in_channels, H, W) -> q(z | x)`` over ``(B, latent_channels, H/f, W/f)``."""
        c, f = self.config.in_channels, self.downsampling_factor
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"AutoencoderKL.encode expects images (B, {c}, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"AutoencoderKL.encode: image size {tuple(x.shape[2:])} is not divisible by the "
                f"downsampling factor f={f}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, latent_channels, h, w) -> (B, out_channels, f h, f w)``."""
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"AutoencoderKL.decode expects latents (B, {c}, h, w), got shape {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruct ``x``: decode a sample of ``q(z | x)`` (``sample_posterior``) or its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)


@torch.no_grad()
def compute_latent_scale(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None, batch_size: int = 64
) -> float:
    """``1 / std(z)`` over sampled latents of ``images`` ``(N, C, H, W)`` in ``[-1, 1]``.

    The LDM paper (Sec. 4.3.2, App. D.1) rescales latents to unit variance before diffusion, with
    the factor estimated from a batch of data: this is that estimate (SD's 0.18215 came from it).
    """
    zs = [vae.encode(images[i:i + batch_size]).sample(generator) for i in range(0, images.shape[0], batch_size)]
    std = torch.cat(zs).float().std().item()
    if not math.isfinite(std) or std == 0.0:
        raise ValueError(f"compute_latent_scale: latents have std {std}; cannot rescale")
    return 1.0 / std


def sd15_vae() -> AutoencoderKL:
    """The Stable Diffusion 1.5 autoencoder (preset ``"sd15-vae"``)."""
    return AutoencoderKL(VAEConfig.sd15())


# AutoencoderKL's own defaults, for keys a config.json leaves out (diffusers 0.2x-0.4x)
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215,
)


def vae_config_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
    """Our :class:`VAEConfig` from a diffusers ``AutoencoderKL`` config (``model.config`` or a
    config.json dict; missing keys take diffusers' defaults). SD-style autoencoders only
    (DownEncoderBlock2D / UpDecoderBlock2D, SiLU, quant convs, mid-block attention): anything else
    is a ValueError naming it."""
    c = {**_DIFFUSERS_DEFAULTS, **dict(config)}
    unsupported = []
    if any(t != "DownEncoderBlock2D" for t in c["down_block_types"]):
        unsupported.append(f"down_block_types={tuple(c['down_block_types'])}")
    if any(t != "UpDecoderBlock2D" for t in c["up_block_types"]):
        unsupported.append(f"up_block_types={tuple(c['up_block_types'])}")
    if c["act_fn"] not in ("silu", "swish"):
        unsupported.append(f"act_fn={c['act_fn']!r}")
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not c.get(name, True):
            unsupported.append(f"{name}=False")
    if c.get("shift_factor") is not None:
        unsupported.append(f"shift_factor={c['shift_factor']}")
    if unsupported:
        raise ValueError("AutoencoderKL conversion: unsupported diffusers config " + ", ".join(unsupported))
    size = c["sample_size"]
    return VAEConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"], block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c["layers_per_block"], latent_channels=c["latent_channels"],
        norm_num_groups=c["norm_num_groups"], sample_size=size if isinstance(size, int) else size[0],
        scaling_factor=c["scaling_factor"] if c["scaling_factor"] is not None else 0.18215,
    )


def autoencoder_kl_from_diffusers_config(config: Mapping[str, Any]) -> AutoencoderKL:
    """An (untrained) :class:`AutoencoderKL` for a diffusers ``AutoencoderKL`` config dict."""
    return AutoencoderKL(vae_config_from_diffusers(config))


def from_diffusers_autoencoder_kl(model) -> AutoencoderKL:
    """Convert a diffusers ``AutoencoderKL`` (SD-style, see :func:`vae_config_from_diffusers`) into
    ours with the same weights, loaded strictly."""
    from ..interop import load_state_dict

    cfg = vae_config_from_diffusers(model.config)
    p = next(model.parameters())
    with torch.device(p.device):
        ours = AutoencoderKL(cfg).to(p.dtype)
    return load_state_dict(ours, model.state_dict(), what="diffusers AutoencoderKL")
