"""Imagen's two networks in miniature (Saharia et al. 2022), chapter 13: the text-to-image base
model and the super-resolution model of the cascade, both :class:`~.unet_cond.UNet2DCondition`
(chapter 07's one UNet) with the options of the pixel text-conditional family (chapter 11).

:class:`ImagenTextUNet`, ``eps_theta(x_t, t, c)``, conditioned as Imagen (Sec. 2.1-2.2) and
DeepFloyd IF condition: the caption's *token states* ``(B, L, D)`` of a text encoder (a frozen
language model, a frozen CLIP text tower, or a transformer trained with the model) are

* projected to the attention width (``encoder_hid_dim`` -> ``cross_attention_dim``,
  ``encoder_hid_proj``) and appended to the keys and values of every attention layer
  (``SimpleCrossAttn*`` blocks), the padding tokens masked out;
* attention-pooled into one vector added to the timestep embedding (``addition_embed_type="text"``,
  :class:`~.embeddings.TextTimeEmbedding`: Imagen's "pooled embedding vector").

The padding positions of the token states are set to zero before both, so that what the pooling
sees does not depend on which encoder padded how. With ``text_config`` the model owns a text
transformer (chapter 05's CLIP text tower, trained from scratch with the UNet) and also takes
``input_ids``; without it, the token states come from outside (a frozen encoder, computed once per
caption by the recipe).

:class:`ImagenSRUNet`, ``eps_theta(x_t, t, z, a)`` (Sec. 2.4): a super-resolution model whose input
is ``x_t`` concatenated with the low-resolution image ``z`` upsampled to the output size (and noised
by the cascade's *noise conditioning augmentation*), told the augmentation level ``a`` in [0, 1]
through the class embedding (``class_embed_type="timestep"``: ``1000 a`` embedded like a timestep
and added to the time embedding, as DeepFloyd IF stage II is told its ``noise_level``).
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import CLIPTextConfig, CLIPTextModel
from .text_to_image import coordinate_maps
from .unet_cond import CondUNetConfig, UNet2DCondition

AUG_SCALE = 1000.0  # the augmentation level a in [0, 1] is embedded as the "timestep" 1000 a


class ImagenTextUNet(nn.Module):
    """``forward(x_t, t, tokens=, mask=)`` (token states of a frozen encoder) or ``forward(x_t, t,
    input_ids)`` (with its own text transformer) -> eps ``(B, out_channels, H, W)``.

    ``tokens`` (B, L, D) with D = ``unet_config.encoder_hid_dim``; ``mask`` (B, L) bool or 0/1,
    True on the caption's tokens. ``coord_channels``: chapter 04's two coordinate maps beside
    ``x_t`` (not Imagen's; a small model learns positions much sooner with them)."""

    def __init__(self, unet_config: CondUNetConfig, coord_channels: bool = True,
                 text_config: CLIPTextConfig | None = None, pad_id: int = 0):
        super().__init__()
        want = 3 + (2 if coord_channels else 0)
        if unet_config.in_channels != want:
            raise ValueError(f"ImagenTextUNet: the UNet must take {want} input channels, its config has "
                             f"{unet_config.in_channels}")
        if unet_config.encoder_hid_dim is None or unet_config.addition_embed_type != "text" \
                or not unet_config.uses_added_kv or unet_config.uses_transformers:
            raise ValueError("ImagenTextUNet: the text tokens enter through encoder_hid_dim (text_proj) into "
                             "SimpleCrossAttn blocks, and pooled into the time embedding (addition_embed_type='text')")
        if text_config is not None and text_config.hidden_size != unet_config.encoder_hid_dim:
            raise ValueError(f"ImagenTextUNet: the text transformer's width {text_config.hidden_size} must be the "
                             f"UNet's encoder_hid_dim {unet_config.encoder_hid_dim}")
        self.text_encoder = CLIPTextModel(text_config) if text_config is not None else None
        self.unet = UNet2DCondition(unet_config)
        self.coord_channels = coord_channels
        self.pad_id = pad_id
        self.register_buffer("coords", coordinate_maps(unet_config.sample_size) if coord_channels else torch.zeros(0),
                             persistent=False)

    @property
    def text_dim(self) -> int:
        return self.unet.config.encoder_hid_dim

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> (token states (B, L, D), mask (B, L) bool) of the model's own text transformer."""
        if self.text_encoder is None:
            raise ValueError("this ImagenTextUNet has no text transformer of its own: pass the token states of its "
                             "frozen encoder (tokens=, mask=)")
        return self.text_encoder(input_ids).last_hidden_state, input_ids != self.pad_id

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor | None = None, *,
                tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is None:
            if input_ids is None:
                raise ValueError("ImagenTextUNet needs input_ids (B, L) or the token states tokens= (B, L, D) and mask=")
            tokens, mask = self.encode_text(input_ids)
        if mask is None or tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"ImagenTextUNet: mask must be (B, L) = {tuple(tokens.shape[:2])} over the tokens, got "
                             f"{None if mask is None else tuple(mask.shape)}")
        mask = mask.to(device=x.device, dtype=torch.bool)
        tokens = tokens.to(x.dtype) * mask[..., None]  # padding states -> 0
        h = torch.cat([x, self.coords.to(x).expand(x.shape[0], -1, -1, -1)], 1) if self.coord_channels else x
        return self.unet(h, t, encoder_hidden_states=tokens, attention_mask=mask)


class ImagenSRUNet(nn.Module):
    """``forward(x_t, t, low_res, aug_level)`` -> eps ``(B, 3, R, R)``: ``low_res`` (B, 3, R, R) is the
    low-resolution image already upsampled to R (and augmented), ``aug_level`` (B,) or a number in
    [0, 1], the level it was noised to (0: clean)."""

    def __init__(self, unet_config: CondUNetConfig):
        super().__init__()
        if unet_config.in_channels != 6 or unet_config.class_embed_type != "timestep":
            raise ValueError("ImagenSRUNet: the UNet takes x_t and the upsampled low-resolution image (6 channels) "
                             "and the augmentation level as class_embed_type='timestep'")
        self.unet = UNet2DCondition(unet_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor,
                aug_level: torch.Tensor | float) -> torch.Tensor:
        if not torch.is_tensor(low_res) or low_res.shape != x.shape:
            raise ValueError(f"ImagenSRUNet: low_res must be upsampled to x's shape {tuple(x.shape)}, got "
                             f"{tuple(low_res.shape) if torch.is_tensor(low_res) else type(low_res).__name__}")
        a = torch.as_tensor(aug_level, device=x.device, dtype=torch.float32)
        if a.ndim == 0:
            a = a.expand(x.shape[0])
        if a.shape != (x.shape[0],):
            raise ValueError(f"ImagenSRUNet: aug_level must be a number or ({x.shape[0]},), got {tuple(a.shape)}")
        return self.unet(torch.cat([x, low_res.to(x)], 1), t, class_labels=a * AUG_SCALE)
