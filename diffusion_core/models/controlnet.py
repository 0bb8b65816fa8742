"""ControlNet (Zhang, Rao & Agrawala 2023): spatial control for a locked diffusion model (chapter 07).

The paper's construction, section 3.1-3.2. A network block ``F(x; Theta)`` is locked (its weights
frozen), a trainable copy ``F(x; Theta_c)`` is made, and the two are joined by zero convolutions
``Z`` (1x1 convolutions whose weight and bias start at zero):

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)                      (eq. 2)

For Stable Diffusion the copy is the UNet's *encoder* (conv_in, the time embedding, the 12 down
block outputs and the middle block), so here a :class:`ControlNet` *is* a
:class:`~.unet_cond.UNetEncoder` built from the same block family, plus

* ``controlnet_cond_embedding``: a small conv net ``E`` mapping the condition image ``c_i`` (e.g.
  512x512 edges) to the latent grid, ``c_f = E(c_i)`` (eq. 4); its last conv is a zero conv, so
  it is ``Z(c; Theta_z1)`` above. Each stage after the first halves the resolution: 8x with
  diffusers' default channels ``(16, 32, 96, 256)`` (SD's 8x latents), 4x with three stages;
* ``controlnet_down_blocks``: one zero 1x1 conv per skip connection of the encoder, and
  ``controlnet_mid_block``: one for the middle block. Their outputs are the residuals the locked
  UNet adds to its skips and middle (:meth:`~.unet_cond.UNet2DCondition.forward`'s
  ``down_block_additional_residuals`` / ``mid_block_additional_residual``).

Because every zero conv outputs zero at initialisation, base + fresh ControlNet = base, bit for
bit: "no harmful noise" reaches the locked model before training starts. And a zero conv is not
stuck at zero: for ``y = W x + b`` with ``W = 0``, ``dL/dW = dL/dy x^T`` is non-zero whenever
the input ``x`` is, so the first gradient step makes ``W`` non-zero and the features flow (the
chapter checks this numerically).

Parameter names are diffusers' ``ControlNetModel``'s, so its checkpoints load; ``MultiControlNet``
is diffusers' ``MultiControlNetModel`` (``nets``): several ControlNets, one condition and one
scale each, their residuals summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .unet_cond import CondUNetConfig, UNetEncoder, _per_block

DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)   # diffusers' default: 8x down, for SD's 8x latents


class ControlNetOutput(NamedTuple):
    """What a ControlNet returns: the residuals for the UNet's skips (``conv_in``'s first) and middle."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor


@dataclass
class ControlNetConfig:
    """A ControlNet: the encoder of ``unet`` (a :class:`CondUNetConfig`) plus the condition embedding.

    ``conditioning_channels``: channels of the condition image (3 for an RGB edge map, 1 for depth).
    ``conditioning_embedding_out_channels``: widths of the condition embedding's stages; it
    downsamples by ``2 ** (len - 1)``, which must be the pixel-to-latent factor (8 for SD, 4 for
    the book's f=4 model). ``controlnet_conditioning_channel_order``: "rgb" or "bgr" (flipped).
    ``global_pool_conditions``: average every residual over space (the "shuffle" ControlNets).
    """

    unet: CondUNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = DEFAULT_EMBEDDING_CHANNELS
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        self.conditioning_embedding_out_channels = tuple(int(c) for c in self.conditioning_embedding_out_channels)
        if not isinstance(self.unet, CondUNetConfig):
            raise ValueError(f"ControlNetConfig: unet must be a CondUNetConfig, got {type(self.unet).__name__}")
        if int(self.conditioning_channels) < 1:
            raise ValueError(f"ControlNetConfig: conditioning_channels must be positive, got {self.conditioning_channels}")
        if not self.conditioning_embedding_out_channels or min(self.conditioning_embedding_out_channels) < 1:
            raise ValueError("ControlNetConfig: conditioning_embedding_out_channels must be a non-empty list of "
                             f"positive widths, got {self.conditioning_embedding_out_channels}")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("ControlNetConfig: controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                             f"{self.controlnet_conditioning_channel_order!r}")

    @property
    def embedding_downscale(self) -> int:
        """The condition image is this many times larger than the latent (per side)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def sd15(cls) -> ControlNetConfig:
        """The public SD 1.5 ControlNets (lllyasviel/control_v11p_sd15_*): 361,279,120 parameters."""
        return cls(CondUNetConfig.sd15())


class ControlNetConditioningEmbedding(nn.Module):
    """``E``: condition image ``(B, conditioning_channels, H, W)`` -> ``(B, C0, H/k, W/k)``,
    ``k = 2 ** (len(block_out_channels) - 1)``. conv 3x3 + SiLU, then per stage a 3x3 conv and a
    stride-2 3x3 conv (each + SiLU), then a zero-initialised 3x3 conv ``conv_out``. (The paper's
    version has four 4x4 stride-2 convs with ReLU; this layout is the released code's.)"""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: Sequence[int] = DEFAULT_EMBEDDING_CHANNELS):
        super().__init__()
        ch = tuple(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(ch[:-1], ch[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = zero_module(nn.Conv2d(ch[-1], conditioning_embedding_channels, 3, padding=1))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (a "zero convolution") and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def _zero_conv(channels: int) -> nn.Conv2d:
    return zero_module(nn.Conv2d(channels, channels, 1))


class ControlNet(UNetEncoder):
    """The trainable copy of a conditional UNet's encoder, joined to it by zero convolutions.

    ``controlnet(sample, timestep, encoder_hidden_states=ctx, controlnet_cond=cond,
    conditioning_scale=1.0)`` -> :class:`ControlNetOutput` ``(down_block_res_samples,
    mid_block_res_sample)``: pass them to the UNet as ``down_block_additional_residuals=`` and
    ``mid_block_additional_residual=``. ``sample`` is the UNet's own input ``(B, in_channels, h, w)``;
    ``cond`` is ``(B, conditioning_channels, h * k, w * k)`` with ``k = config.embedding_downscale``.
    """

    def __init__(self, config: ControlNetConfig):
        if not isinstance(config, ControlNetConfig):
            raise ValueError(f"ControlNet needs a ControlNetConfig, got {type(config).__name__}")
        super().__init__(config.unet)
        self.controlnet_config = config
        ch = config.unet.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], config.conditioning_channels, config.conditioning_embedding_out_channels)
        # one zero conv per skip connection: conv_in's output, then each block's layers and downsampler
        # (with the Efficient U-Net's downsample_first: no conv_in, each block's downsampler first)
        widths = [] if config.unet.downsample_first else [ch[0]]
        for block in self.down_blocks:
            widths += [block.out_channels] * (len(block.resnets) + (block.downsamplers is not None))
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(w) for w in widths)
        self.controlnet_mid_block = _zero_conv(ch[-1])

    @classmethod
    def from_unet(cls, unet: UNetEncoder, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: Sequence[int] = DEFAULT_EMBEDDING_CHANNELS,
                  load_weights_from_unet: bool = True, **options: Any) -> ControlNet:
        """A ControlNet for ``unet``: its encoder's weights copied (the trainable copy), zero convs at
        zero. Fresh, base + ControlNet gives exactly the base's output (the paper's eq. 2 at init)."""
        if not isinstance(unet, UNetEncoder):
            raise ValueError(f"ControlNet.from_unet needs a UNet2DCondition, got {type(unet).__name__}")
        p = next(unet.parameters())
        with torch.device(p.device):
            net = cls(ControlNetConfig(unet.config, conditioning_channels, tuple(conditioning_embedding_out_channels),
                                       **options)).to(p.dtype)
        if load_weights_from_unet:
            names = ("conv_in", "time_proj", "time_embedding", "class_embedding", "down_blocks", "mid_block")
            for name in names:
                src = getattr(unet, name)
                if src is not None:  # an IP-Adapter's added keys/values (attn2.processor.*) stay with the UNet
                    getattr(net, name).load_state_dict({k: v for k, v in src.state_dict().items()
                                                        if ".processor." not in k})
        return net

    def check_fits(self, unet: UNetEncoder) -> None:
        """Raise ``ValueError`` naming the difference if this ControlNet was built for another UNet."""
        if not isinstance(unet, UNetEncoder):
            raise ValueError(f"ControlNet.check_fits needs a UNet2DCondition, got {type(unet).__name__}")
        mine, theirs = self.config, unet.config
        for f in ("in_channels", "block_out_channels", "down_block_types", "mid_block_type", "layers_per_block",
                  "cross_attention_dim", "num_class_embeds", "downsample_first"):
            n = len(mine.block_out_channels)
            a, b = getattr(mine, f), getattr(theirs, f)
            if f == "layers_per_block":
                a, b = _per_block(a, n, f), _per_block(b, len(theirs.block_out_channels), f)
            if a != b:
                raise ValueError(f"this ControlNet was built for another UNet: its {f} is {a!r}, the UNet's {b!r}")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        controlnet_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the locked UNet, each multiplied by ``conditioning_scale``.

        ``guess_mode`` scales them from 0.1 (``conv_in``'s skip) to 1.0 (the middle) on a log scale,
        as the released code does when the prompt is left out.
        """
        cfg = self.controlnet_config
        self._check_inputs(sample, encoder_hidden_states, class_labels)
        self._check_cond(sample, controlnet_cond)
        scale = _check_scale(conditioning_scale, "conditioning_scale")
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = self.time_embed(sample, timestep, class_labels)
        # x + Z(c): the condition's features join conv_in's output (eq. 2's inner sum)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(self.dtype))
        h, skips = self.encode(h, emb, encoder_hidden_states, cross_attention_kwargs)
        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not cfg.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=h.device) * scale
            down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
        else:
            down, mid = [d * scale for d in down], mid * scale
        if cfg.global_pool_conditions:
            down, mid = [d.mean(dim=(2, 3), keepdim=True) for d in down], mid.mean(dim=(2, 3), keepdim=True)
        out = ControlNetOutput(down, mid)
        return out if return_dict else tuple(out)

    def _check_cond(self, sample: torch.Tensor, cond: torch.Tensor | None) -> None:
        cfg = self.controlnet_config
        k = cfg.embedding_downscale
        want = (sample.shape[0], cfg.conditioning_channels, sample.shape[2] * k, sample.shape[3] * k)
        if not isinstance(cond, torch.Tensor):
            raise ValueError(f"ControlNet: controlnet_cond must be a tensor of shape {want}, got "
                             f"{type(cond).__name__}")
        if tuple(cond.shape) != want:
            raise ValueError(
                f"ControlNet: controlnet_cond has shape {tuple(cond.shape)}; expected {want} "
                f"({cfg.conditioning_channels} condition channels at {k}x the latent's {tuple(sample.shape[2:])}, "
                f"since the condition embedding downsamples by {k})")
        if not torch.isfinite(cond).all():
            raise ValueError("ControlNet: controlnet_cond contains NaN or infinite values")


def _check_scale(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


class MultiControlNet(nn.Module):
    """Several ControlNets on one UNet (diffusers' ``MultiControlNetModel``): one condition image and
    one scale each; their residuals add, skip by skip and at the middle. The ControlNets may take
    conditions of different channel counts, but must all fit the same UNet."""

    def __init__(self, controlnets: Sequence[ControlNet]):
        super().__init__()
        nets = list(controlnets)
        if not nets:
            raise ValueError("MultiControlNet needs at least one ControlNet")
        for i, n in enumerate(nets):
            if not isinstance(n, ControlNet):
                raise ValueError(f"MultiControlNet: controlnets[{i}] is a {type(n).__name__}, not a ControlNet")
        self.nets = nn.ModuleList(nets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        controlnet_cond: Sequence[torch.Tensor] = (),
        conditioning_scale: Sequence[float] | float = 1.0,
        class_labels: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        k = len(self.nets)
        conds = list(controlnet_cond) if isinstance(controlnet_cond, (list, tuple)) else None
        if conds is None or len(conds) != k:
            got = len(conds) if conds is not None else type(controlnet_cond).__name__
            raise ValueError(f"MultiControlNet: controlnet_cond must be a list of {k} condition images, one per "
                             f"ControlNet, got {got}")
        scales = [conditioning_scale] * k if not isinstance(conditioning_scale, (list, tuple)) else list(conditioning_scale)
        if len(scales) != k:
            raise ValueError(f"MultiControlNet: conditioning_scale has {len(scales)} entries for {k} ControlNets")
        down, mid = None, None
        for i, (net, cond, s) in enumerate(zip(self.nets, conds, scales)):
            try:
                d, m = net(sample, timestep, encoder_hidden_states, cond, s, class_labels, cross_attention_kwargs,
                           guess_mode)
            except ValueError as e:
                raise ValueError(f"MultiControlNet: ControlNet {i}: {e}") from None
            if down is None:
                down, mid = d, m
            else:
                if len(d) != len(down) or any(a.shape != b.shape for a, b in zip(d, down)):
                    raise ValueError(f"MultiControlNet: ControlNet {i} gives residuals of other shapes than "
                                     "ControlNet 0: they were built for different UNets")
                down, mid = [a + b for a, b in zip(down, d)], mid + m
        out = ControlNetOutput(down, mid)
        return out if return_dict else tuple(out)


def controlnet_sd15() -> ControlNet:
    """Preset ``"controlnet-sd15"``: the SD 1.5 ControlNet (361,279,120 parameters)."""
    return ControlNet(ControlNetConfig.sd15())


# -- diffusers interop -------------------------------------------------------------------------------
_CONTROLNET_ONLY = {"conditioning_channels", "controlnet_conditioning_channel_order",
                    "conditioning_embedding_out_channels", "global_pool_conditions"}


def controlnet_config_from_diffusers(config: Mapping[str, Any]) -> ControlNetConfig:
    """Our :class:`ControlNetConfig` from a diffusers ``ControlNetModel`` config (``model.config`` or a
    config.json dict): the UNet part as :func:`~diffusion_core.models.unet_cond.unet_config_from_diffusers`
    reads it, plus the condition embedding's keys."""
    from .unet_cond import unet_config_from_diffusers

    c = dict(config)
    unet_keys = {k: v for k, v in c.items() if k not in _CONTROLNET_ONLY}
    unet_cfg = unet_config_from_diffusers(unet_keys, what="ControlNetModel", out_channels=c.get("in_channels", 4))
    emb = c.get("conditioning_embedding_out_channels") or DEFAULT_EMBEDDING_CHANNELS
    return ControlNetConfig(unet_cfg, c.get("conditioning_channels", 3), tuple(emb),
                            c.get("controlnet_conditioning_channel_order", "rgb"), c.get("global_pool_conditions", False))


def controlnet_from_diffusers_config(config: Mapping[str, Any]) -> ControlNet:
    """An (untrained) :class:`ControlNet` for a diffusers ``ControlNetModel`` config dict."""
    return ControlNet(controlnet_config_from_diffusers(config))


def from_diffusers_controlnet(model) -> ControlNet:
    """Convert a diffusers ``ControlNetModel`` (SD 1.x/2.x family) into a :class:`ControlNet` with the same
    weights, loaded strictly."""
    from ..interop import load_state_dict

    cfg = controlnet_config_from_diffusers(model.config)
    p = next(model.parameters())
    with torch.device(p.device):
        ours = ControlNet(cfg).to(p.dtype)
    return load_state_dict(ours, model.state_dict(), what="diffusers ControlNetModel")


def from_diffusers_multi_controlnet(model) -> MultiControlNet:
    """Convert a diffusers ``MultiControlNetModel`` (its ``nets``) into a :class:`MultiControlNet`."""
    return MultiControlNet([from_diffusers_controlnet(n) for n in model.nets])


__all__ = [
    "ControlNet", "ControlNetConfig", "ControlNetOutput", "ControlNetConditioningEmbedding", "MultiControlNet",
    "zero_module", "controlnet_sd15", "from_diffusers_controlnet", "from_diffusers_multi_controlnet",
    "controlnet_config_from_diffusers", "controlnet_from_diffusers_config",
]
