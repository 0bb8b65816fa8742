"""The residual block and the resamplers of the DDPM/ADM UNet (chapters 01-02), also used by the VAE.

Parameter names follow diffusers (``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``;
``Downsample2D.conv``, ``Upsample2D.conv``) so that its checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TIME_EMBEDDING_NORMS = ("default", "scale_shift")
# the activations of diffusers' configs (``act_fn``); "swish" is SiLU's other name, GELU is the exact (erf) one
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu}


def activation(name: str, who: str = "act_fn"):
    """The function named by a diffusers ``act_fn`` string; an unknown name is a ValueError naming ``who``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{who}={name!r} is not supported; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _check_groups(name: str, channels: int, groups: int) -> None:
    if groups < 1:
        raise ValueError(f"{name}: the number of GroupNorm groups must be positive, got {groups}")
    if channels % groups != 0:
        raise ValueError(f"{name}: {channels} channels are not divisible into {groups} groups for GroupNorm")


def check_block_channels(who: str, block_out_channels: tuple[int, ...], norm_num_groups: int) -> None:
    """A UNet's or autoencoder's block widths: all positive, and each divisible by ``norm_num_groups``
    (every block's GroupNorm splits its channels into that many groups); a ValueError naming ``who``."""
    if any(int(c) < 1 for c in block_out_channels):
        raise ValueError(f"{who}: block_out_channels must all be positive, got {block_out_channels}")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"{who}: block_out_channels {block_out_channels} are not all divisible by "
                         f"norm_num_groups={norm_num_groups} ({bad[0]} is not)")


def _check_input(name: str, x: torch.Tensor, channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} expects (B, {channels}, H, W), got {tuple(x.shape)}")


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block conditioned on the time embedding.

    ``forward(x (B, in_channels, H, W), temb (B, temb_channels)) -> (B, out_channels, H', W')``::

        h = conv1(act(norm1(x)))
        default     (DDPM):  h = act(norm2(h + W act(temb)))
        scale_shift (ADM):   h = act(norm2(h) * (1 + s) + b),   [s, b] = W act(temb)
        out = (shortcut(x) + conv2(dropout(h))) / output_scale_factor

    ``scale_shift`` is the adaptive group normalisation of Dhariwal & Nichol (2021, section 3),
    ``AdaGN(h, y) = y_s GroupNorm(h) + y_b`` with ``y_s`` written as ``1 + s`` so that a zero
    projection is the identity. ``act`` is ``act_fn`` (SiLU; GELU in DeepFloyd IF); with
    ``skip_time_act`` the time embedding goes into ``W`` (``time_emb_proj``) without it (IF's
    embedding already ends in one). ``temb_channels=None`` builds a block with no time input (the VAE).
    The shortcut is a 1x1 conv when the widths differ (or ``use_in_shortcut=True``).
    ``down=True`` / ``up=True`` resample inside the block (ADM's "BigGAN" resampling: average
    pooling / nearest x2, applied to both paths after ``norm1``), so H' = H/2 or 2H: the resampler
    of diffusers' ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D`` (GLIDE, unCLIP, IF).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        up: bool = False,
        down: bool = False,
        act_fn: str = "silu",
        skip_time_act: bool = False,
    ):
        super().__init__()
        self.act = activation(act_fn, "ResnetBlock2D: act_fn")
        self.skip_time_act = skip_time_act
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        if time_embedding_norm not in TIME_EMBEDDING_NORMS:
            raise ValueError(
                f"ResnetBlock2D: unknown time_embedding_norm {time_embedding_norm!r}; "
                f"expected one of {', '.join(TIME_EMBEDDING_NORMS)}"
            )
        if time_embedding_norm == "scale_shift" and temb_channels is None:
            raise ValueError("ResnetBlock2D: time_embedding_norm='scale_shift' needs temb_channels")
        if up and down:
            raise ValueError("ResnetBlock2D: up and down cannot both be set")
        _check_groups("ResnetBlock2D.norm1", in_channels, groups)
        _check_groups("ResnetBlock2D.norm2", out_channels, groups_out)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.up, self.down = up, down

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        self.norm2 = nn.GroupNorm(groups_out, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, bias=conv_shortcut_bias) if use_in_shortcut else None
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        _check_input("ResnetBlock2D", x, self.in_channels)
        n1, n2 = self.norm1, self.norm2
        act = self.act
        h = act(F.group_norm(x, n1.num_groups, n1.weight, n1.bias, n1.eps))
        if self.up or self.down:
            x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)

        if self.time_emb_proj is None:
            if temb is not None:
                raise ValueError("ResnetBlock2D was built with temb_channels=None but got a temb")
            h = F.group_norm(h, n2.num_groups, n2.weight, n2.bias, n2.eps)
        else:
            if temb is None:
                raise ValueError(
                    f"ResnetBlock2D needs temb of shape (B, {self.time_emb_proj.in_features}); got None"
                )
            if temb.ndim != 2 or temb.shape[0] != x.shape[0] or temb.shape[1] != self.time_emb_proj.in_features:
                raise ValueError(
                    f"ResnetBlock2D: temb must be (B={x.shape[0]}, {self.time_emb_proj.in_features}), "
                    f"got {tuple(temb.shape)}"
                )
            emb = self.time_emb_proj(temb if self.skip_time_act else act(temb))[:, :, None, None]
            if self.time_embedding_norm == "scale_shift":
                # AdaGN: GroupNorm(h) * (1 + s) + b
                scale, shift = emb.chunk(2, dim=1)
                h = F.group_norm(h, n2.num_groups, n2.weight, n2.bias, n2.eps)
                h = torch.addcmul(shift, h, 1 + scale)
            else:
                # h is conv1's fresh output (not saved for backward): add in place
                h = F.group_norm(h.add_(emb), n2.num_groups, n2.weight, n2.bias, n2.eps)
        h = act(h)
        if self.dropout.p > 0:
            h = self.dropout(h)
        h = self.conv2(h)

        # h is conv2's fresh output (not saved for backward): residual sum in place
        out = h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))
        if self.output_scale_factor != 1.0:
            out = out.div_(self.output_scale_factor)
        return out


class Downsample2D(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (``use_conv``) or 2x2 average pooling.

    ``(B, channels, H, W) -> (B, out_channels, H/2, W/2)`` for even H, W. ``padding=1`` pads
    symmetrically (odd H gives ceil(H/2)); ``padding=0`` pads one zero row/column at the
    bottom/right only, as TensorFlow's "SAME" did in the original DDPM code and as the Stable
    Diffusion VAE does (odd H gives floor(H/2)).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.channels, self.out_channels = channels, out_channels
        self.use_conv, self.padding = use_conv, padding
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        else:
            if out_channels != channels:
                raise ValueError(
                    f"Downsample2D: average pooling keeps the width; out_channels={out_channels} "
                    f"!= channels={channels} needs use_conv=True"
                )
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("Downsample2D", x, self.channels)
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (``use_conv``).

    ``(B, channels, H, W) -> (B, out_channels, 2H, 2W)``, or ``output_size`` (a (H, W) pair)
    when given, which a UNet uses to match an odd-sized skip connection.
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.channels, self.out_channels, self.use_conv = channels, out_channels, use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            if out_channels != channels:
                raise ValueError(
                    f"Upsample2D: out_channels={out_channels} != channels={channels} needs use_conv=True"
                )
            self.conv = None

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        _check_input("Upsample2D", x, self.channels)
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return x if self.conv is None else self.conv(x)
