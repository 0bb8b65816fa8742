"""The one block family of every UNet in the book: down, middle and up blocks, with diffusers' names.

The pixel UNet of DDPM/ADM (:mod:`.unet`, chapters 01-03), the conditional UNet of Latent
Diffusion (:mod:`.unet_cond`, chapter 04 on) and the ControlNet encoder (:mod:`.controlnet`,
chapter 07) are all built from the three blocks below. A block differs from another only by what it
is given:

* ``resnet(in_channels, out_channels, scale=1.0)``: a factory for its residual blocks (the UNet
  closes over the time-embedding width, GroupNorm groups, ``eps``, dropout and
  ``time_embedding_norm``: "default" for DDPM/LDM, "scale_shift" for ADM's AdaGN);
* ``attention(channels)``: a factory for the layer after each residual block, or ``None``: a
  pixel self-attention (:class:`.attention.Attention`, diffusers' ``AttnDownBlock2D``) or a
  spatial transformer with cross-attention (:class:`.transformer.Transformer2DModel`,
  ``CrossAttnDownBlock2D``), or an attention whose keys and values also take the projected text
  tokens (:class:`.attention.Attention` with ``added_kv_proj_dim``, GLIDE / unCLIP / IF, diffusers'
  ``SimpleCrossAttnDownBlock2D``). ``cross_attention=True`` says it takes the context tokens.
* ``resnet_resample=True``: the block resamples with one more residual block (``resnet(c, c,
  down=True)`` / ``up=True``, ADM's "BigGAN" resampling, diffusers' ``ResnetDownsampleBlock2D``,
  ``ResnetUpsampleBlock2D`` and the ``SimpleCrossAttn*`` blocks) instead of a strided / nearest conv.

The skip protocol, the same everywhere::

    down block:  h, skips = block(h, temb, ctx, kwargs, additional_residual)
                 one skip per residual layer, and one after the downsampler
    middle:      h = block(h, temb, ctx, kwargs)
    up block:    h = block(h, skips, temb, ctx, kwargs)      consumes len(block.resnets) skips,
                                                             last one first

``additional_residual`` is the T2I-Adapter's feature for this level (Mou et al. 2023): a block with
attention adds it after its last (resnet, attention) pair, before downsampling; a block without adds
it to its output after downsampling. Either way the block's last skip carries it (diffusers'
``UNet2DConditionModel`` semantics).

Imagen's Efficient U-Net (Saharia et al. 2022, App. B.1, Figs. A.28-A.30) is two options of these
blocks (chapter 13), both off by default, so every diffusers checkpoint builds as before:

* ``DownBlock2D(downsample_first=True)``: the block resamples *before* its residual blocks (the
  paper's DBlock: strided conv, then the residual blocks), so they run at half the block's input
  resolution, a quarter of the pixels, and the downsampler (not the first residual block) changes the
  width ``in_channels -> out_channels``. Its skips: the downsampler's output first, then one per
  residual layer (the same count as the standard block's). The UNet's up blocks then mirror it: each
  runs its residual blocks at the low resolution and upsamples *after* them (the paper's UBlock),
  which our up blocks, like diffusers', already do; what changes there is that the last up block
  upsamples too (see :func:`.unet_cond.build_up_blocks`).
* ``UpBlock2D(skip_scale=s)``: every skip connection is multiplied by ``s`` before it is concatenated
  (the paper's "scale skip connections by 1/sqrt(2)"). Not ``resnet_out_scale_factor`` /
  ``output_scale_factor``, which divides the *residual* sum ``(shortcut(x) + F(x)) / s`` inside each
  residual block (NCSN++'s ``skip_rescale``; diffusers' option for GLIDE-family blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

ResnetFactory = Callable[..., ResnetBlock2D]      # (in_channels, out_channels, scale=None, **resample) -> block
AttentionFactory = Callable[[int], nn.Module]     # channels -> attention layer


def check_efficient_options(who: str, skip_scale: float, downsample_first: bool) -> None:
    """The Efficient U-Net options of a UNet config (``UpBlock2D(skip_scale)``,
    ``DownBlock2D(downsample_first)``): a positive finite number and a bool; a ValueError naming ``who``."""
    if isinstance(skip_scale, bool) or not isinstance(skip_scale, (int, float)) \
            or not math.isfinite(skip_scale) or skip_scale <= 0:
        raise ValueError(f"{who}: skip_scale must be a positive number (Imagen: 1/sqrt(2) = "
                         f"{2 ** -0.5:.4f}), got {skip_scale!r}")
    if not isinstance(downsample_first, bool):
        raise ValueError(f"{who}: downsample_first must be a bool, got {downsample_first!r}")


def _attend(attn: nn.Module, h: torch.Tensor, cross: bool, ctx: torch.Tensor | None,
            kwargs: dict[str, Any] | None) -> torch.Tensor:
    if not cross:
        return attn(h)
    if isinstance(attn, Attention):  # added-K/V attention: the kwargs (e.g. attention_mask) reach its processor
        return attn(h, ctx, **(kwargs or {}))
    return attn(h, ctx, kwargs)  # spatial transformer: the kwargs reach its attn2 processors


class DownBlock2D(nn.Module):
    """One encoder level: ``num_layers`` x (residual block [+ attention]), then a stride-2 conv
    (unless ``add_downsample=False``, the last level). ``(B, in, H, W) -> (B, out, H/2, W/2)``.

    diffusers' ``DownBlock2D``, ``AttnDownBlock2D`` and ``CrossAttnDownBlock2D``; with
    ``resnet_resample`` its ``ResnetDownsampleBlock2D`` and ``SimpleCrossAttnDownBlock2D``.

    ``downsample_first`` (Imagen's DBlock, Saharia et al. 2022, App. B.1): the downsampler, ``in ->
    out`` channels, runs first and the ``num_layers`` x (residual block [+ attention]) after it, at
    ``H/2``; skips: the downsampler's output, then one per layer. Without ``add_downsample`` it does
    nothing.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, resnet: ResnetFactory,
                 attention: AttentionFactory | None = None, cross_attention: bool = False,
                 add_downsample: bool = True, downsample_padding: int = 1, resnet_resample: bool = False,
                 downsample_first: bool = False):
        super().__init__()
        self.has_cross_attention = attention is not None and cross_attention
        self.resnet_resample = resnet_resample
        # Imagen's DBlock (App. B.1): downsample first, so the residual blocks see H/2 x W/2
        self.downsample_first = downsample_first and add_downsample
        first_in = out_channels if self.downsample_first else in_channels   # the first residual block's input
        down_in = in_channels if self.downsample_first else out_channels    # the downsampler's input
        self.resnets = nn.ModuleList(resnet(first_in if i == 0 else out_channels, out_channels)
                                     for i in range(num_layers))
        self.attentions = (nn.ModuleList(attention(out_channels) for _ in range(num_layers))
                           if attention is not None else None)
        if not add_downsample:
            self.downsamplers = None
        elif resnet_resample:  # a residual block that average-pools both its paths
            self.downsamplers = nn.ModuleList([resnet(down_in, out_channels, down=True)])
        else:
            self.downsamplers = nn.ModuleList([Downsample2D(down_in, use_conv=True, out_channels=out_channels,
                                                            padding=downsample_padding)])

    @property
    def out_channels(self) -> int:
        return self.resnets[-1].out_channels

    def forward(self, h: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                additional_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        if self.downsample_first:  # Efficient U-Net: strided conv, then the residual blocks at H/2
            h = self._downsample(h, temb)
            skips.append(h)
        last = len(self.resnets) - 1
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = _attend(self.attentions[i], h, self.has_cross_attention, encoder_hidden_states,
                            cross_attention_kwargs)
                if i == last and additional_residual is not None:
                    h = h + additional_residual  # T2I-Adapter, before downsampling
            skips.append(h)
        if self.downsamplers is not None and not self.downsample_first:
            h = self._downsample(h, temb)
            skips.append(h)
        if self.attentions is None and additional_residual is not None:
            h = h + additional_residual  # T2I-Adapter, on the block's output
            skips[-1] = h
        return h, skips

    def _downsample(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.downsamplers[0](h, temb) if self.resnet_resample else self.downsamplers[0](h)


class UNetMidBlock2D(nn.Module):
    """The bottleneck at the lowest resolution: a residual block, then ``num_layers`` x
    (attention, residual block). Shape-preserving.

    ``num_layers=1`` with self-attention is DDPM's middle; with a spatial transformer it is
    diffusers' ``UNetMidBlock2DCrossAttn``; ``num_layers=0`` is the single residual block that
    ``UNet2DConditionModel`` builds for ``mid_block_type="UNetMidBlock2D"``. ``attention=None`` with
    ``num_layers=1`` is two residual blocks (DDPM's middle with ``add_attention=False``).
    """

    def __init__(self, channels: int, *, num_layers: int, resnet: ResnetFactory,
                 attention: AttentionFactory | None = None, cross_attention: bool = False, scale: float = 1.0):
        super().__init__()
        self.has_cross_attention = attention is not None and cross_attention
        self.resnets = nn.ModuleList(resnet(channels, channels, scale) for _ in range(num_layers + 1))
        self.attentions = (nn.ModuleList(attention(channels) for _ in range(num_layers))
                           if attention is not None else None)

    @property
    def out_channels(self) -> int:
        return self.resnets[-1].out_channels

    def forward(self, h: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                h = _attend(self.attentions[i], h, self.has_cross_attention, encoder_hidden_states,
                            cross_attention_kwargs)
            h = resnet(h, temb)
        return h


class UpBlock2D(nn.Module):
    """One decoder level: ``num_layers`` x (concatenate a skip, residual block [+ attention]), then
    nearest x2 and a 3x3 conv (unless ``add_upsample=False``). ``(B, prev, H, W) -> (B, out, 2H, 2W)``.

    The first layer reads ``prev_output_channel`` (the level below) and every other layer
    ``out_channels``; the last layer's skip has ``in_channels`` (the width of the matching down
    block's input), the others ``out_channels``. diffusers' ``UpBlock2D``, ``AttnUpBlock2D`` and
    ``CrossAttnUpBlock2D``; with ``resnet_resample`` its ``ResnetUpsampleBlock2D`` and
    ``SimpleCrossAttnUpBlock2D``.

    ``skip_scale``: each skip is multiplied by it before the concatenation, ``cat([h, s * skip])``
    (Imagen's Efficient U-Net, Saharia et al. 2022, App. B.1: ``1/sqrt(2)``); 1.0 (diffusers) skips
    the multiplication.
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, *, num_layers: int,
                 resnet: ResnetFactory, attention: AttentionFactory | None = None, cross_attention: bool = False,
                 add_upsample: bool = True, resnet_resample: bool = False, skip_scale: float = 1.0):
        super().__init__()
        self.has_cross_attention = attention is not None and cross_attention
        self.resnet_resample = resnet_resample
        self.skip_scale = float(skip_scale)
        self.resnets = nn.ModuleList(
            resnet((prev_output_channel if i == 0 else out_channels)
                   + (in_channels if i == num_layers - 1 else out_channels), out_channels)
            for i in range(num_layers)
        )
        self.attentions = (nn.ModuleList(attention(out_channels) for _ in range(num_layers))
                           if attention is not None else None)
        if not add_upsample:
            self.upsamplers = None
        elif resnet_resample:  # a residual block that doubles both its paths (nearest)
            self.upsamplers = nn.ModuleList([resnet(out_channels, out_channels, up=True)])
        else:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, h: torch.Tensor, skips: Sequence[torch.Tensor], temb: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        if len(skips) != len(self.resnets):
            raise ValueError(f"UpBlock2D: got {len(skips)} skip connections for {len(self.resnets)} residual layers")
        for i, resnet in enumerate(self.resnets):
            skip = skips[-1 - i]
            if self.skip_scale != 1.0:
                skip = skip * self.skip_scale  # Efficient U-Net (App. B.1): skip / sqrt(2) before concatenating
            h = resnet(torch.cat([h, skip], dim=1), temb)
            if self.attentions is not None:
                h = _attend(self.attentions[i], h, self.has_cross_attention, encoder_hidden_states,
                            cross_attention_kwargs)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, temb) if self.resnet_resample else self.upsamplers[0](h)
        return h


def run_up_path(up_blocks: nn.ModuleList, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """The decoder half: each up block takes the last ``len(block.resnets)`` skips."""
    end = len(skips)
    for block in up_blocks:
        k = len(block.resnets)
        h = block(h, skips[end - k:end], temb, encoder_hidden_states, cross_attention_kwargs)
        end -= k
    return h
