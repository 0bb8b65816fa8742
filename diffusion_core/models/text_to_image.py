"""The book's own text-to-image model (chapter 04), with every seam of its UNet passed through.

Chapters 06-09 reuse it: classifier-free guidance (06) calls it with and without the caption,
ControlNet (07) adds residuals to its skips, T2I-Adapter (08) adds features inside its encoder,
IP-Adapter (09) swaps its cross-attention processors. ``forward(z_t, t, input_ids=None,
context=None, **unet_kwargs)`` hands ``unet_kwargs`` (``down_block_additional_residuals``,
``mid_block_additional_residual``, ``down_intrablock_additional_residuals``,
``cross_attention_kwargs``, ``added_cond_kwargs={"image_embeds": [...]}``) to
:class:`~.unet_cond.UNet2DCondition` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .clip import CLIPTextConfig, CLIPTextModel
from .unet_cond import CondUNetConfig, UNet2DCondition


def coordinate_maps(size: int) -> torch.Tensor:
    """(2, size, size): the x and y coordinate of every position, from -1 to 1 (x left to right,
    y top to bottom), as extra input channels (CoordConv, Liu et al. 2018)."""
    r = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([x, y])


class TextToImageUNet(nn.Module):
    """``eps_theta(z_t, t, tau_theta(y))`` (LDM eq. 3): a caption transformer ``tau_theta`` (CLIP's
    text tower, from scratch) whose token states ``(B, N, d)`` are the keys and values of the
    UNet's cross-attention layers. ``forward(z_t, t, input_ids) -> eps``.

    With ``coord_channels`` the UNet also sees the two :func:`coordinate_maps` beside ``z_t``
    (its ``in_channels`` = latent channels + 2): convolutions are translation-equivariant, so
    without them "top left" has to be inferred from the zero padding at the borders, and a small
    model trained briefly learns what a caption names long before it learns where."""

    def __init__(self, text_config: CLIPTextConfig, unet_config: CondUNetConfig, coord_channels: bool = False):
        super().__init__()
        self.text_encoder = CLIPTextModel(text_config)
        self.unet = UNet2DCondition(unet_config)
        self.coord_channels = coord_channels
        coords = coordinate_maps(unet_config.sample_size) if coord_channels else torch.zeros(0)
        self.register_buffer("coords", coords, persistent=False)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids -> (B, N, d) the states the UNet attends to."""
        return self.text_encoder(input_ids).last_hidden_state

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        """``z_t`` as the UNet sees it: with the coordinate channels appended (when the model has
        them). A ControlNet copied from ``self.unet`` takes this, not ``z_t``."""
        if not self.coord_channels:
            return x
        return torch.cat([x, self.coords.to(x).expand(x.shape[0], -1, -1, -1)], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor | None = None,
                context: torch.Tensor | None = None, **unet_kwargs: Any) -> torch.Tensor:
        if context is None:
            if input_ids is None:
                raise ValueError("TextToImageUNet needs input_ids (B, N) or context (B, N, d)")
            context = self.encode_text(input_ids)
        return self.unet(self.unet_input(x), t, encoder_hidden_states=context, **unet_kwargs)
