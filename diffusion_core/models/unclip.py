"""unCLIP's text projection for its decoder (Ramesh et al. 2022, section 2.1; chapter 12).

The decoder is GLIDE's text-conditional pixel UNet (:class:`.unet_cond.UNet2DCondition` with
``SimpleCrossAttn`` blocks) conditioned on the CLIP image embedding ``z_i`` as well as on the
caption. In the paper's words, it does so "by projecting and adding CLIP embeddings to the existing
timestep embedding, and by projecting CLIP embeddings into four extra tokens of context that are
concatenated to the sequence of outputs from the GLIDE text encoder". This module makes both:

    time addition  a = W_i z_i + W_t z_t                     (B, time_embed_dim)
    extra tokens   [c_1 .. c_k] = W_c z_i                    (B, k, cross_attention_dim)
    context        [c_1 .. c_k ; LN(W_s s_1) .. LN(W_s s_M)] (B, k + M, cross_attention_dim)

with ``z_t`` the caption's CLIP text embedding (its final token, projected) and ``s`` the text
encoder's token states. The decoder takes ``a`` as ``class_labels`` (``class_embed_type="identity"``)
and the context as ``encoder_hidden_states``; the caption's attention mask is padded with k ones in
front for the extra tokens. For classifier-free guidance a learned null image embedding is put in
front of the batch. Names as diffusers' ``UnCLIPTextProjModel`` so its checkpoints load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class UnCLIPTextProjModel(nn.Module):
    """``forward(image_embeddings=, prompt_embeds=, text_encoder_hidden_states=,
    do_classifier_free_guidance=) -> (context (B, k + M, cross_attention_dim), time addition (B, time_embed_dim))``.

    ``image_embeddings``: ``(B_i, clip_embeddings_dim)`` CLIP image embeddings (with
    ``do_classifier_free_guidance`` the learned null embedding is prepended, so B = 2 B_i);
    ``prompt_embeds``: ``(B, clip_embeddings_dim)`` CLIP text embeddings; ``text_encoder_hidden_states``:
    ``(B, M, clip_embeddings_dim)`` the text encoder's token states.
    """

    def __init__(self, *, clip_extra_context_tokens: int = 4, clip_embeddings_dim: int = 768,
                 time_embed_dim: int, cross_attention_dim: int):
        super().__init__()
        for name, value in (("clip_extra_context_tokens", clip_extra_context_tokens),
                            ("clip_embeddings_dim", clip_embeddings_dim), ("time_embed_dim", time_embed_dim),
                            ("cross_attention_dim", cross_attention_dim)):
            if value < 1:
                raise ValueError(f"UnCLIPTextProjModel: {name} must be positive, got {value}")
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.clip_embeddings_dim, self.time_embed_dim = clip_embeddings_dim, time_embed_dim
        self.cross_attention_dim = cross_attention_dim
        # the null image embedding of classifier-free guidance
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_embeddings_dim))
        # W_t, W_i: the text and image embeddings into the time embedding
        self.embedding_proj = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_embeddings_dim, time_embed_dim)
        # W_c: the image embedding into k context tokens
        self.clip_extra_context_tokens_proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        # W_s and LN: the text tokens into the decoder's context width
        self.encoder_hidden_states_proj = nn.Linear(clip_embeddings_dim, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)

    @property
    def config(self) -> dict[str, int]:
        return dict(clip_extra_context_tokens=self.clip_extra_context_tokens,
                    clip_embeddings_dim=self.clip_embeddings_dim, time_embed_dim=self.time_embed_dim,
                    cross_attention_dim=self.cross_attention_dim)

    def forward(self, *, image_embeddings: torch.Tensor, prompt_embeds: torch.Tensor,
                text_encoder_hidden_states: torch.Tensor, do_classifier_free_guidance: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.clip_embeddings_dim
        for name, t, nd in (("image_embeddings", image_embeddings, 2), ("prompt_embeds", prompt_embeds, 2),
                            ("text_encoder_hidden_states", text_encoder_hidden_states, 3)):
            if not isinstance(t, torch.Tensor) or t.ndim != nd or t.shape[-1] != d:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                want = f"(B, M, {d})" if nd == 3 else f"(B, {d})"
                raise ValueError(f"UnCLIPTextProjModel: {name} must be {want}, got {got}")
        if do_classifier_free_guidance:  # the null image embedding in front: [null; z_i]
            null = self.learned_classifier_free_guidance_embeddings.to(image_embeddings.dtype)
            image_embeddings = torch.cat([null.expand(image_embeddings.shape[0], -1), image_embeddings])
        b = prompt_embeds.shape[0]
        if image_embeddings.shape[0] != b or text_encoder_hidden_states.shape[0] != b:
            raise ValueError(f"UnCLIPTextProjModel: {image_embeddings.shape[0]} image embeddings (after classifier-free "
                             f"guidance's null ones), {b} prompt embeddings and {text_encoder_hidden_states.shape[0]} "
                             "token sequences: they must match")
        # a = W_i z_i + W_t z_t: added to the decoder's timestep embedding
        time_addition = (self.clip_image_embeddings_project_to_time_embeddings(image_embeddings)
                         + self.embedding_proj(prompt_embeds))
        # W_c z_i -> k tokens; the output's channel index is (feature, token), token fastest
        extra = self.clip_extra_context_tokens_proj(image_embeddings)
        extra = extra.reshape(b, self.cross_attention_dim, self.clip_extra_context_tokens).transpose(1, 2)
        tokens = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encoder_hidden_states))
        return torch.cat([extra, tokens], dim=1), time_addition


def unclip_text_proj_from_diffusers_config(c: Any) -> UnCLIPTextProjModel:
    """A fresh ``UnCLIPTextProjModel`` of a diffusers config (``model.config`` or a config.json dict)."""
    def get(key: str) -> Any:
        value = c.get(key) if isinstance(c, dict) else getattr(c, key, None)
        if value is None:
            raise ValueError(f"UnCLIPTextProjModel config: {key} is missing")
        return value

    return UnCLIPTextProjModel(clip_extra_context_tokens=get("clip_extra_context_tokens"),
                               clip_embeddings_dim=get("clip_embeddings_dim"), time_embed_dim=get("time_embed_dim"),
                               cross_attention_dim=get("cross_attention_dim"))


def from_diffusers_unclip_text_proj(model: Any) -> UnCLIPTextProjModel:
    """Convert a diffusers ``UnCLIPTextProjModel`` into ours with the same weights (strict)."""
    from ..interop import load_state_dict

    p = next(model.parameters())
    with torch.device(p.device):
        ours = unclip_text_proj_from_diffusers_config(dict(model.config)).to(p.dtype)
    return load_state_dict(ours, model.state_dict(), what="diffusers UnCLIPTextProjModel")


def karlo_text_proj() -> UnCLIPTextProjModel:
    """The text projection of kakaobrain/karlo-v1-alpha's decoder (ViT-L/14 CLIP, 768-wide embeddings)."""
    return UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=4 * 320,
                               cross_attention_dim=1536)


class UnCLIPDecoder(nn.Module):
    """unCLIP's decoder ``eps_theta(x_t, t, z_i, y)`` (Ramesh et al. 2022, section 2.1; chapter 12): the
    GLIDE-family pixel UNet (:class:`.unet_cond.UNet2DCondition` with ``SimpleCrossAttn`` blocks and
    ``class_embed_type="identity"``) fed by :class:`UnCLIPTextProjModel`.

    ``forward(x_t, t, image_embeddings, prompt_embeds, text_hidden_states, text_mask)``:

    * ``image_embeddings`` ``(B, P)``: the CLIP image embedding ``z_i`` to invert (or the learned null
      embedding, :meth:`null_image_embedding`, for classifier-free guidance);
    * ``prompt_embeds`` ``(B, P)`` and ``text_hidden_states`` ``(B, M, P)``: the caption read by the
      *frozen* CLIP text tower (its embedding ``z_t`` and its token states), as Karlo's decoder reads
      its caption; ``text_mask`` ``(B, M)``, 1 on the caption's tokens, 0 on padding.

    ``a = W_i z_i + W_t z_t`` is added to the timestep embedding; ``W_c z_i`` gives ``k`` context tokens
    put in front of the caption's tokens in every attention layer (the mask gets ``k`` ones in front).
    ``coord_channels``: chapter 04's two coordinate maps beside ``x_t`` (not the paper's: a small model
    learns *where* much sooner with them). ``embedding_scale``: both embeddings are multiplied by it
    before the projections (a unit P-dimensional embedding has coordinates of size ``P**-0.5``;
    ``sqrt(P)`` gives them unit size, as the LayerNormed token states have, so that Adam moves the
    projections' outputs as fast as the rest of the network's).
    """

    def __init__(self, unet_config: Any, clip_embeddings_dim: int, clip_extra_context_tokens: int = 4,
                 coord_channels: bool = True, embedding_scale: float = 1.0):
        super().__init__()
        from .text_to_image import coordinate_maps
        from .unet_cond import UNet2DCondition

        want = 3 + (2 if coord_channels else 0)
        if unet_config.in_channels != want:
            raise ValueError(f"UnCLIPDecoder: the UNet must take {want} input channels (x_t 3"
                             f"{', coordinates 2' if coord_channels else ''}), its config has {unet_config.in_channels}")
        if unet_config.class_embed_type != "identity":
            raise ValueError("UnCLIPDecoder: the projected embeddings are added to the time embedding as they are: "
                             f"the UNet needs class_embed_type='identity', got {unet_config.class_embed_type!r}")
        if not unet_config.uses_added_kv or unet_config.uses_transformers or not unet_config.cross_attention_dim:
            raise ValueError("UnCLIPDecoder: the context tokens are added keys/values: SimpleCrossAttn blocks only, "
                             "with a cross_attention_dim")
        self.text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=clip_extra_context_tokens,
                                             clip_embeddings_dim=clip_embeddings_dim,
                                             time_embed_dim=unet_config.time_embed_dim,
                                             cross_attention_dim=unet_config.cross_attention_dim)
        self.unet = UNet2DCondition(unet_config)
        self.coord_channels = coord_channels
        if not embedding_scale > 0:
            raise ValueError(f"UnCLIPDecoder: embedding_scale must be positive, got {embedding_scale}")
        self.embedding_scale = float(embedding_scale)
        coords = coordinate_maps(unet_config.sample_size) if coord_channels else torch.zeros(0)
        self.register_buffer("coords", coords, persistent=False)

    def null_image_embedding(self) -> torch.Tensor:
        """(1, P): the learned null image embedding of classifier-free guidance (in the unit
        embeddings' scale: :meth:`forward` multiplies it by ``embedding_scale`` like any ``z_i``)."""
        return self.text_proj.learned_classifier_free_guidance_embeddings[None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, image_embeddings: torch.Tensor, prompt_embeds: torch.Tensor,
                text_hidden_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if not isinstance(text_mask, torch.Tensor) or text_mask.shape != text_hidden_states.shape[:2]:
            raise ValueError(f"UnCLIPDecoder: text_mask must be (B, M) = {tuple(text_hidden_states.shape[:2])}, got "
                             f"{tuple(text_mask.shape) if isinstance(text_mask, torch.Tensor) else type(text_mask).__name__}")
        dtype = self.text_proj.embedding_proj.weight.dtype
        context, time_addition = self.text_proj(
            image_embeddings=self.embedding_scale * image_embeddings.to(dtype),
            prompt_embeds=self.embedding_scale * prompt_embeds.to(dtype),
            text_encoder_hidden_states=text_hidden_states.to(dtype), do_classifier_free_guidance=False)
        if context.shape[0] != b:
            raise ValueError(f"UnCLIPDecoder: {context.shape[0]} conditions for {b} images")
        k = self.text_proj.clip_extra_context_tokens
        mask = torch.cat([torch.ones(b, k, dtype=torch.bool, device=x.device), text_mask.to(x.device) != 0], dim=1)
        h = torch.cat([x, self.coords.to(x).expand(b, -1, -1, -1)], dim=1) if self.coord_channels else x
        return self.unet(h, t, encoder_hidden_states=context.to(x.dtype) if x.is_floating_point() else context,
                         class_labels=time_addition, attention_mask=mask)
