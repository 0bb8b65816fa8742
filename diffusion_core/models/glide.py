"""GLIDE's two networks (Nichol et al. 2021), chapter 11: the text-conditional pixel UNet and the
noise-aware CLIP that guides it.

:class:`GLIDETextUNet`, ``eps_theta(x_t, t, y)``: a caption transformer (CLIP's text tower,
trained from scratch with the UNet) reads the caption ``y``; then, as GLIDE Sec. 2.2 and App. A
describe it,

* its token states ``(B, N, d)`` go into *every* attention layer of the UNet: each layer's keys
  and values are those of the image's own positions concatenated with projections of the tokens
  (``SimpleCrossAttn*`` blocks: :class:`~.attention.Attention` with ``added_kv_proj_dim``,
  diffusers' ``AttnAddedKVProcessor``), the padding tokens masked out;
* its *final* token's state ``(B, d)`` (the end-of-text token, the only one that has seen the
  whole caption in a causal transformer) is projected by one linear map and added to the timestep
  embedding, "in place of a class embedding" (``class_embed_type="simple_projection"``);
* every residual block uses scale-shift norm (AdaGN, ``resnet_time_scale_shift="scale_shift"``)
  and the resampling is done by residual blocks (``ResnetDownsampleBlock2D``).

The UNet is :class:`~.unet_cond.UNet2DCondition` with these options (chapter 07's one UNet), not a
new one. With ``inpaint_channels=4`` the UNet also takes GLIDE's inpainting inputs (Sec. 4 / App.):
the known pixels ``x * m`` (3 channels) and the mask ``m`` (1 channel), concatenated to ``x_t``.

:class:`NoisyCLIP` (GLIDE Sec. 2.3): a CLIP whose image tower sees the *noised* image ``x_t`` and
the timestep ``t`` (a small CNN whose every block is modulated by the timestep embedding, AdaGN as
in the UNet), so that ``grad_{x_t} f(x_t, t) . g(c)`` is meaningful along the whole reverse
process; the text tower is chapter 05's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .clip import (
    LOGIT_SCALE_MAX,
    CLIPModel,
    CLIPOutput,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionOutput,
    clip_logits,
)
from .embeddings import TimestepEmbedding, Timesteps
from .text_to_image import coordinate_maps
from .unet_cond import CondUNetConfig, UNet2DCondition


@dataclass
class GLIDEText:
    """The caption as the UNet takes it: ``tokens`` (B, N, d) for the attention layers, ``final``
    (B, d) for the timestep embedding, ``mask`` (B, N) bool, True on the caption's tokens (start,
    words, end) and False on padding."""

    tokens: torch.Tensor
    final: torch.Tensor
    mask: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, "final": self.final, "mask": self.mask}


class GLIDETextUNet(nn.Module):
    """``forward(x_t, t, input_ids)`` or ``forward(x_t, t, tokens=, final=, mask=)`` -> the UNet's
    output ``(B, out_channels, H, W)`` (eps, and with a learned variance the v channels after it).

    ``coord_channels``: the two :func:`~.text_to_image.coordinate_maps` beside ``x_t`` (chapter 04's
    addition, not GLIDE's: a small model learns "top left" much sooner with them).
    ``inpaint_channels`` (0 or 4): GLIDE's inpainting inputs, ``masked_image`` (B, 3, H, W) and
    ``inpaint_mask`` (B, 1, H, W) in {0, 1} (1 = known), required at every call when set."""

    def __init__(self, text_config: CLIPTextConfig, unet_config: CondUNetConfig, coord_channels: bool = False,
                 inpaint_channels: int = 0, pad_id: int = 0):
        super().__init__()
        if inpaint_channels not in (0, 4):
            raise ValueError(f"inpaint_channels must be 0 or 4 (masked RGB image + mask), got {inpaint_channels}")
        want = 3 + (2 if coord_channels else 0) + inpaint_channels
        if unet_config.in_channels != want:
            raise ValueError(f"GLIDETextUNet: the UNet must take {want} input channels (x_t 3"
                             f"{', coordinates 2' if coord_channels else ''}"
                             f"{', inpainting 4' if inpaint_channels else ''}), its config has {unet_config.in_channels}")
        if unet_config.class_embed_type not in ("simple_projection", "projection") or \
                unet_config.projection_class_embeddings_input_dim != text_config.hidden_size:
            raise ValueError("GLIDETextUNet: the final token enters the time embedding: the UNet needs "
                             "class_embed_type='simple_projection' (or 'projection') from the text width "
                             f"{text_config.hidden_size}")
        if unet_config.cross_attention_dim != text_config.hidden_size or not unet_config.uses_added_kv \
                or unet_config.uses_transformers:
            raise ValueError("GLIDETextUNet: every attention layer takes the text tokens as added keys/values: "
                             "SimpleCrossAttn blocks only, cross_attention_dim = the text width "
                             f"{text_config.hidden_size}")
        self.text_encoder = CLIPTextModel(text_config)
        self.unet = UNet2DCondition(unet_config)
        self.coord_channels = coord_channels
        self.inpaint_channels = inpaint_channels
        self.pad_id = pad_id
        coords = coordinate_maps(unet_config.sample_size) if coord_channels else torch.zeros(0)
        self.register_buffer("coords", coords, persistent=False)

    def encode_text(self, input_ids: torch.Tensor) -> GLIDEText:
        """(B, N) token ids -> :class:`GLIDEText` (computed once per caption when sampling)."""
        out = self.text_encoder(input_ids)
        return GLIDEText(out.last_hidden_state, out.pooled, input_ids != self.pad_id)

    def unet_input(self, x: torch.Tensor, masked_image: torch.Tensor | None = None,
                   inpaint_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[x_t, coordinates?, masked_image * mask?, mask?]`` along the channels."""
        parts = [x]
        if self.coord_channels:
            parts.append(self.coords.to(x).expand(x.shape[0], -1, -1, -1))
        if self.inpaint_channels:
            if masked_image is None or inpaint_mask is None:
                raise ValueError("this GLIDE model inpaints: it needs masked_image (B, 3, H, W) and inpaint_mask "
                                 "(B, 1, H, W)")
            if masked_image.shape != x.shape or inpaint_mask.shape != (x.shape[0], 1, *x.shape[2:]):
                raise ValueError(f"masked_image must be {tuple(x.shape)} and inpaint_mask {(x.shape[0], 1, *x.shape[2:])}, "
                                 f"got {tuple(masked_image.shape)} and {tuple(inpaint_mask.shape)}")
            m = inpaint_mask.to(x)
            parts += [masked_image.to(x) * m, m]
        elif masked_image is not None or inpaint_mask is not None:
            raise ValueError("this GLIDE model was not built for inpainting (inpaint_channels=0)")
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor | None = None, *,
                tokens: torch.Tensor | None = None, final: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, masked_image: torch.Tensor | None = None,
                inpaint_mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is None:
            if input_ids is None:
                raise ValueError("GLIDETextUNet needs input_ids (B, N) or the encoded caption (tokens, final, mask)")
            text = self.encode_text(input_ids)
            tokens, final, mask = text.tokens, text.final, text.mask
        elif final is None:
            raise ValueError("GLIDETextUNet: tokens given without final (the final token's state, (B, d))")
        return self.unet(self.unet_input(x, masked_image, inpaint_mask), t, encoder_hidden_states=tokens,
                         class_labels=final.to(x.dtype) if final.is_floating_point() else final,
                         attention_mask=mask)


# ------------------------------------------------------------------------------------------------
# The noise-aware CLIP
# ------------------------------------------------------------------------------------------------

class _TimeBlock(nn.Module):
    """conv 3x3 -> GroupNorm -> scale-shift by the timestep embedding -> GELU."""

    def __init__(self, cin: int, cout: int, temb: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm = nn.GroupNorm(8, cout)
        self.emb = nn.Linear(temb, 2 * cout)
        self.act = nn.GELU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        # AdaGN (Dhariwal & Nichol 2021): GroupNorm(h) (1 + scale(t)) + shift(t)
        return self.act(self.norm(self.conv(h)) * (1 + scale) + shift)


class NoisyImageEncoder(nn.Module):
    """The image tower of a noise-aware CLIP: ``(x_t (B, 3, R, R), t (B,)) ->`` :class:`CLIPVisionOutput`
    (``pooled`` (B, hidden)). Five 3x3 blocks halving twice to R/4 (``width``, 2 ``width``, 4
    ``width`` channels), each modulated by the sinusoidal timestep embedding through an MLP;
    the map is flattened (position survives) and mapped to ``hidden``."""

    def __init__(self, resolution: int, hidden: int, width: int = 16):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"NoisyImageEncoder: resolution must be divisible by 4, got {resolution}")
        w, temb = width, 4 * width
        self.time_proj = Timesteps(w)
        self.time_embedding = TimestepEmbedding(w, temb)
        self.blocks = nn.ModuleList([_TimeBlock(3, w, temb), _TimeBlock(w, 2 * w, temb, 2),
                                     _TimeBlock(2 * w, 2 * w, temb), _TimeBlock(2 * w, 4 * w, temb, 2),
                                     _TimeBlock(4 * w, 4 * w, temb)])
        self.head = nn.Linear(4 * w * (resolution // 4) ** 2, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> CLIPVisionOutput:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"NoisyImageEncoder: t must be a scalar or ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = x
        for block in self.blocks:
            h = block(h, emb)
        h = self.head(h.flatten(1))
        return CLIPVisionOutput(last_hidden_state=h[:, None], pooled=self.norm(h))


class NoisyCLIP(CLIPModel):
    """A CLIP whose image tower takes ``(x_t, t)`` (GLIDE Sec. 2.3). ``encode_image(x_t, t)`` and
    ``encode_text(ids)`` give unnormalised (B, P) features; :meth:`score` is what guidance
    differentiates: ``e^tau cos(f(x_t, t), g(c))``, the logit of the pair."""

    def __init__(self, text_config: CLIPTextConfig, resolution: int, vision_width: int, cnn_width: int):
        vision = CLIPVisionConfig.tiny(image_size=resolution, patch_size=resolution // 4, hidden_size=vision_width,
                                       intermediate_size=vision_width, num_hidden_layers=1, num_attention_heads=1,
                                       projection_dim=text_config.projection_dim)
        super().__init__(text_config, vision)
        self.vision_model = NoisyImageEncoder(resolution, vision_width, cnn_width)

    def encode_image(self, pixel_values: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """(x_t (B, 3, R, R), t (B,) or scalar) -> (B, P) unnormalised image features ``f(x_t, t)``."""
        if t is None:
            raise ValueError("NoisyCLIP.encode_image needs the timestep t of x_t (t = 0 for clean images)")
        return self.visual_projection(self.vision_model(pixel_values, t).pooled)

    def score(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B,) ``e^tau f(x_t, t) . g(c)`` with both embeddings L2-normalised; ``text_embeds`` (B, P)
        (normalised here too) or (1, P)."""
        f = nn.functional.normalize(self.encode_image(x_t, t), dim=-1)
        g = nn.functional.normalize(text_embeds.to(f), dim=-1)
        return self.scale * (f * g).sum(-1)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,  # type: ignore[override]
                t: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> CLIPOutput:
        """``logits_per_image`` (B_img, B_txt) = e^tau cos(f(x_t, t), g(c_j))."""
        I_f = self.encode_image(pixel_values, t)
        T_f = self.encode_text(input_ids, attention_mask)
        logits = clip_logits(I_f, T_f, self.logit_scale.clamp(max=LOGIT_SCALE_MAX))
        return CLIPOutput(logits_per_image=logits, logits_per_text=logits.T,
                          image_embeds=nn.functional.normalize(I_f, dim=-1),
                          text_embeds=nn.functional.normalize(T_f, dim=-1))
