"""IP-Adapter (Ye et al. 2023, arXiv:2308.06721): an image prompt for a frozen text-to-image UNet
through decoupled cross-attention (chapter 09; InstantID, chapter 10, reuses it).

An image encoder (CLIP's vision tower) gives an embedding of the prompt image; a small projection
turns it into a few image tokens ``c_i`` of the text tokens' width. Every cross-attention layer of
the UNet keeps its query and its text keys/values, and gets one new key/value pair for the image
tokens (the paper's eq. 5)::

    Z = Attention(Q, K_text, V_text) + lambda * Attention(Q, K'_img, V'_img)
    Q = x W_q,  K_text = c_t W_k,  V_text = c_t W_v,  K'_img = c_i W'_k,  V'_img = c_i W'_v

Only ``W'_k`` (``to_k_ip``) and ``W'_v`` (``to_v_ip``) and the projection are new; the UNet stays
frozen. ``lambda = 0`` is the text-only model exactly.

Here:

* :class:`IPAdapterAttnProcessor`: eq. 5 as an attention processor, installed in every ``attn2``
  through :meth:`.attention.Attention.set_processor`; it holds ``to_k_ip``/``to_v_ip`` as lists with
  one ``Linear`` per loaded adapter and one ``scale`` (lambda) per adapter.
* The image projections: :class:`ImageProjection` (base adapters: a linear map to ``num_tokens``
  tokens and a LayerNorm) and :class:`IPAdapterPlusImageProjection` (the "plus" adapters' and
  InstantID's Resampler, a small perceiver over the image encoder's patch tokens).
  :class:`MultiIPAdapterImageProjection` holds one per loaded adapter as ``unet.encoder_hid_proj``.
* :class:`IPAdapter`: one adapter by itself (projection + added keys/values per cross-attention
  layer), what is trained and saved; :meth:`IPAdapter.from_official` reads the official file layout
  ``{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight", ...}}`` strictly.
* :func:`load_ip_adapter`, :func:`set_ip_adapter_scale`, :func:`unload_ip_adapter` (also in
  :mod:`diffusion_core.interop`).

Parameter names follow diffusers, so a UNet with an adapter loaded has the state dict of a diffusers
``UNet2DConditionModel`` after ``_load_ip_adapter_weights``
(``encoder_hid_proj.image_projection_layers.0.image_embeds.weight``,
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.0.weight``). The official
file names the layers by their position among *all* the UNet's attention processors (self- and
cross-attention) in diffusers' order (down blocks, up blocks, then the middle block), so the
cross-attention layers are 1, 3, 5, ...; :meth:`.unet_cond.UNet2DCondition.attention_layers` gives
that order.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttnProcessor

if TYPE_CHECKING:
    from .unet_cond import UNet2DCondition


def _checkpoint_error(message: str) -> Exception:
    from ..interop import CheckpointMismatchError

    return CheckpointMismatchError(message)


def _scales(scale: float | Sequence[float], n: int, who: str) -> list[float]:
    """``scale`` as one finite float per adapter (a single number is used for every adapter)."""
    values = [scale] * n if isinstance(scale, numbers.Real) else list(scale)
    if len(values) != n:
        raise ValueError(f"{who}: got {len(values)} scales for {n} IP-Adapter(s); give one number or one per adapter")
    out = []
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"{who}: an IP-Adapter scale must be a finite number, got {s!r}")
        out.append(float(s))
    return out


# ---------------------------------------------------------------------------------------------
# Decoupled cross-attention
# ---------------------------------------------------------------------------------------------


class IPAdapterAttnProcessor(nn.Module):
    """Eq. 5 of the paper for one cross-attention layer, with ``num_adapters`` image prompts at once:

        Z = softmax(Q K^T / sqrt(d)) V + sum_j scale_j * softmax(Q K_j'^T / sqrt(d)) V_j'

    ``to_k_ip[j]``, ``to_v_ip[j]``: ``Linear(cross_attention_dim -> hidden_size, bias=False)``, the
    new key/value maps of adapter ``j`` (``hidden_size`` = the layer's ``heads * dim_head``).
    ``scale``: one float per adapter; an adapter at scale 0 is skipped, so every scale at 0 computes
    exactly what :class:`~.attention.AttnProcessor` computes.

    Called as ``processor(attn, hidden_states, encoder_hidden_states, attention_mask=None,
    ip_hidden_states=[...])`` with one ``(B, T_j, cross_attention_dim)`` (or ``(B, num_images, T_j,
    cross_attention_dim)``, the images' tokens then side by side) tensor of image tokens per
    adapter; :class:`~.unet_cond.UNet2DCondition` passes them when called with
    ``added_cond_kwargs={"image_embeds": [...]}``. The text attention takes ``attention_mask``, the
    image attention none (as in diffusers).
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_adapters: int = 1,
                 scale: float | Sequence[float] = 1.0):
        super().__init__()
        if hidden_size < 1 or cross_attention_dim < 1 or num_adapters < 1:
            raise ValueError(f"IPAdapterAttnProcessor: hidden_size ({hidden_size}), cross_attention_dim "
                             f"({cross_attention_dim}) and num_adapters ({num_adapters}) must be positive")
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_attention_dim, hidden_size, bias=False)
                                     for _ in range(num_adapters))
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_attention_dim, hidden_size, bias=False)
                                     for _ in range(num_adapters))
        self.scale: list[float] = _scales(scale, num_adapters, "IPAdapterAttnProcessor")

    @property
    def num_adapters(self) -> int:
        return len(self.to_k_ip)

    def set_scale(self, scale: float | Sequence[float]) -> None:
        """One number for every adapter, or one per adapter."""
        self.scale = _scales(scale, self.num_adapters, "IPAdapterAttnProcessor.set_scale")

    def _image_tokens(self, ip_hidden_states: Any, batch: int) -> list[torch.Tensor]:
        if ip_hidden_states is None:
            raise ValueError("IPAdapterAttnProcessor needs the image tokens (ip_hidden_states): call the UNet with "
                             "added_cond_kwargs={'image_embeds': [...]}, one tensor per IP-Adapter")
        if isinstance(ip_hidden_states, torch.Tensor) or len(ip_hidden_states) != self.num_adapters:
            got = "a tensor" if isinstance(ip_hidden_states, torch.Tensor) else f"{len(ip_hidden_states)} tensors"
            raise ValueError(f"IPAdapterAttnProcessor: ip_hidden_states must be a list with one tensor per "
                             f"adapter ({self.num_adapters}), got {got}")
        tokens = []
        for j, c in enumerate(ip_hidden_states):
            if not isinstance(c, torch.Tensor) or c.ndim not in (3, 4) or c.shape[0] != batch \
                    or c.shape[-1] != self.cross_attention_dim:
                shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"IPAdapterAttnProcessor: ip_hidden_states[{j}] must be ({batch}, T, "
                                 f"{self.cross_attention_dim}) or ({batch}, num_images, T, "
                                 f"{self.cross_attention_dim}), got {shape}")
            tokens.append(c.flatten(1, 2) if c.ndim == 4 else c)  # several images: their tokens side by side
        return tokens

    def forward(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, ip_hidden_states: Sequence[torch.Tensor] | None = None,
                **kwargs: Any) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"IPAdapterAttnProcessor got unexpected arguments: {', '.join(sorted(kwargs))}")
        residual = hidden_states
        x, spatial = attn.to_tokens(hidden_states)  # (B, N, C)
        image_tokens = self._image_tokens(ip_hidden_states, x.shape[0])
        q, k, v = attn.project_qkv(x, encoder_hidden_states)
        q, k, v = attn.heads_to_batch(q), attn.heads_to_batch(k), attn.heads_to_batch(v)  # (B, heads, ., d)
        # Attention(Q, K_text, V_text)
        out = attn.attend(q, k, v, attention_mask)  # (B, heads, N, d)
        # + scale_j * Attention(Q, K'_j, V'_j), the same queries against adapter j's image tokens
        for c, scale, to_k, to_v in zip(image_tokens, self.scale, self.to_k_ip, self.to_v_ip):
            if scale == 0:
                continue
            k_ip, v_ip = attn.heads_to_batch(to_k(c)), attn.heads_to_batch(to_v(c))  # (B, heads, T, d)
            out = out + scale * attn.attend(q, k_ip, v_ip)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_heads(out)))
        return attn.from_tokens(out, residual, spatial)

    def extra_repr(self) -> str:
        return f"adapters={self.num_adapters}, scale={self.scale}"


# ---------------------------------------------------------------------------------------------
# Image projections: image-encoder output -> image tokens of the text tokens' width
# ---------------------------------------------------------------------------------------------


class ImageProjection(nn.Module):
    """The base adapter's projection: ``(N, image_embed_dim)`` pooled image embeddings (CLIP's
    ``image_embeds``) -> ``(N, num_tokens, cross_attention_dim)`` tokens, a linear map and a LayerNorm.

    ``image_embeds`` is the ``Linear`` (diffusers' name; the official file calls it ``proj``),
    ``norm`` the LayerNorm. SD 1.5's adapter: 1024 (ViT-H/14) -> 4 x 768.
    """

    def __init__(self, image_embed_dim: int = 1024, cross_attention_dim: int = 768, num_tokens: int = 4):
        super().__init__()
        self.image_embed_dim, self.cross_attention_dim, self.num_tokens = image_embed_dim, cross_attention_dim, num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def input_shape(self) -> str:
        return f"(B, num_images, {self.image_embed_dim})"

    def accepts(self, e: torch.Tensor) -> bool:
        """Whether ``e`` is ``(B, num_images, image_embed_dim)``."""
        return e.ndim == 3 and e.shape[-1] == self.image_embed_dim

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        n = image_embeds.shape[0]
        return self.norm(self.image_embeds(image_embeds).reshape(n, self.num_tokens, self.cross_attention_dim))

    # the official file: {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    @staticmethod
    def official_name(key: str) -> str:
        return key.replace("image_embeds.", "proj.", 1) if key.startswith("image_embeds.") else key

    @classmethod
    def from_official(cls, state_dict: Mapping[str, torch.Tensor]) -> ImageProjection:
        """Built with the sizes the official ``image_proj`` weights have (not loaded)."""
        proj, norm = _need(state_dict, "proj.weight", 2), _need(state_dict, "norm.weight", 1)
        width = norm.shape[0]
        if proj.shape[0] % width:
            raise _checkpoint_error(f"IP-Adapter image_proj: proj.weight has {proj.shape[0]} rows, not a multiple of "
                                    f"the token width {width} (norm.weight)")
        return cls(proj.shape[1], width, proj.shape[0] // width)


class _GELU(nn.Module):
    """``GELU(x W + b)`` (diffusers' ``GELU`` activation module: the weights are ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    """``W_2 GELU(W_1 x)`` without biases, diffusers' ``FeedForward(activation_fn="gelu")`` layout
    (``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GELU(dim, inner_dim, bias=False), nn.Dropout(0.0), nn.Linear(inner_dim, dim, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class PerceiverBlock(nn.Module):
    """One layer of the Resampler (Alayrac et al. 2022, Flamingo's perceiver resampler): the latent
    queries attend to the image features and to themselves, then a feed-forward; both residual.

        kv = [LN0(x); LN1(l)],   l <- l + Attention(LN1(l), kv, kv),   l <- l + FF(LN(l))

    ``x (N, S, dim)`` image features, ``l (N, Q, dim)`` latents -> ``(N, Q, dim)``. Names as in
    diffusers (``ln0, ln1, attn.{to_q, to_k, to_v, to_out.0}, ff.0, ff.1.net.{0.proj, 2}``).
    """

    def __init__(self, dim: int, heads: int, dim_head: int = 64, ff_inner_dim: int | None = None):
        super().__init__()
        self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, cross_attention_dim=dim, heads=heads, dim_head=dim_head, bias=False, out_bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), _FeedForward(dim, ff_inner_dim or 4 * dim))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        q_in = self.ln1(latents)
        latents = self.attn(q_in, torch.cat([self.ln0(x), q_in], dim=1)) + latents
        return self.ff(latents) + latents


class IPAdapterPlusImageProjection(nn.Module):
    """The Resampler of the "plus" adapters (and InstantID): ``(N, S, embed_dims)`` image-encoder
    tokens (CLIP's penultimate hidden states, or a face embedding) -> ``(N, num_queries,
    output_dims)`` tokens, through ``depth`` :class:`PerceiverBlock` layers over ``num_queries``
    learned latents of width ``hidden_dims``:

        l = latents;  x = proj_in(x);  l <- block(x, l) for each layer;  out = norm_out(proj_out(l))

    SD 1.5's ip-adapter-plus: 1280 -> 16 x 768 with ``hidden_dims=768, depth=4, heads=12``.
    Attention heads are ``dim_head=64`` wide, as in the official code (the files do not store it).
    """

    def __init__(self, embed_dims: int = 768, output_dims: int = 1024, hidden_dims: int = 1280, depth: int = 4,
                 dim_head: int = 64, heads: int = 16, num_queries: int = 8, ffn_ratio: float = 4,
                 ff_inner_dim: int | None = None):
        """``ff_inner_dim`` (default ``int(hidden_dims * ffn_ratio)``): the feed-forward's hidden width."""
        super().__init__()
        self.embed_dims, self.output_dims, self.num_tokens = embed_dims, output_dims, num_queries
        self.latents = nn.Parameter(torch.randn(1, num_queries, hidden_dims) / hidden_dims**0.5)
        self.proj_in = nn.Linear(embed_dims, hidden_dims)
        self.proj_out = nn.Linear(hidden_dims, output_dims)
        self.norm_out = nn.LayerNorm(output_dims)
        inner = ff_inner_dim if ff_inner_dim is not None else int(hidden_dims * ffn_ratio)
        self.layers = nn.ModuleList(PerceiverBlock(hidden_dims, heads, dim_head, inner) for _ in range(depth))

    @property
    def cross_attention_dim(self) -> int:
        return self.output_dims

    def input_shape(self) -> str:
        return f"(B, num_images, S, {self.embed_dims})"

    def accepts(self, e: torch.Tensor) -> bool:
        """Whether ``e`` is ``(B, num_images, S, embed_dims)``."""
        return e.ndim == 4 and e.shape[-1] == self.embed_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))

    # the official Resampler: layers.i = [PerceiverAttention(norm1, norm2, to_q, to_kv, to_out),
    # FeedForward = Sequential(LayerNorm, Linear, GELU, Linear)]; to_kv holds K's rows, then V's
    _OFFICIAL = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_k": "0.to_kv",
                 "attn.to_v": "0.to_kv", "attn.to_out.0": "0.to_out", "ff.0": "1.0", "ff.1.net.0.proj": "1.1",
                 "ff.1.net.2": "1.3"}

    @classmethod
    def official_name(cls, key: str) -> str:
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None or m.group(2) not in cls._OFFICIAL:
            return key
        return f"layers.{m.group(1)}.{cls._OFFICIAL[m.group(2)]}.{m.group(3)}"

    @classmethod
    def from_official(cls, state_dict: Mapping[str, torch.Tensor]) -> IPAdapterPlusImageProjection:
        """Built with the sizes the official Resampler weights have (not loaded)."""
        latents = _need(state_dict, "latents", 3)
        proj_in, proj_out = _need(state_dict, "proj_in.weight", 2), _need(state_dict, "proj_out.weight", 2)
        to_q, ff_in = _need(state_dict, "layers.0.0.to_q.weight", 2), _need(state_dict, "layers.0.1.1.weight", 2)
        if to_q.shape[0] % 64:
            raise _checkpoint_error(f"IP-Adapter image_proj: layers.0.0.to_q.weight has {to_q.shape[0]} rows, not a "
                                    "multiple of the Resampler's 64-wide heads")
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k)))
        hidden = latents.shape[2]
        return cls(embed_dims=proj_in.shape[1], output_dims=proj_out.shape[0], hidden_dims=hidden, depth=depth,
                   dim_head=64, heads=to_q.shape[0] // 64, num_queries=latents.shape[1],
                   ff_inner_dim=ff_in.shape[0])


def _need(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state_dict:
        raise _checkpoint_error(f"IP-Adapter image_proj: missing key {key!r} (have {sorted(state_dict)[:8]})")
    t = state_dict[key]
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise _checkpoint_error(f"IP-Adapter image_proj: {key} must have {ndim} dimensions, got {got}")
    return t


def official_image_proj_state_dict(proj: nn.Module) -> dict[str, torch.Tensor]:
    """``proj``'s weights under the official file's names (the Resampler's ``to_k``/``to_v`` fused
    into ``to_kv``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in proj.state_dict().items():
        name = proj.official_name(key)
        out[name] = torch.cat([out[name], value]) if name in out else value  # to_k first, then to_v
    return out


def load_official_image_proj(proj: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load official ``image_proj`` weights into ``proj`` strictly: a missing, unexpected or
    wrongly shaped key is a ``CheckpointMismatchError`` naming it (in the file's names)."""
    from ..interop import load_state_dict

    own = proj.state_dict()
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in own.items():
        name = proj.official_name(key)
        shape = tuple(value.shape)
        shapes[name] = (shapes[name][0] + shape[0], *shape[1:]) if name in shapes else shape
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} in the file, {shapes[k]} expected" for k in shapes
             if k in state_dict and tuple(state_dict[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {label}: {', '.join(v[:10])}" for label, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if v]
        raise _checkpoint_error(f"IP-Adapter image_proj does not match {type(proj).__name__}: " + "; ".join(parts))
    converted = {}
    for key in own:
        name = proj.official_name(key)
        value = state_dict[name]
        if name != key and name.endswith("to_kv.weight"):
            value = value.chunk(2, dim=0)[0 if ".attn.to_k." in key else 1]
        converted[key] = value
    return load_state_dict(proj, converted, what="IP-Adapter image_proj")


def image_projection_from_official(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The projection an official ``image_proj`` dict describes, with its weights (strict)."""
    if not isinstance(state_dict, Mapping):
        raise _checkpoint_error(f"IP-Adapter image_proj must be a dict of tensors, got {type(state_dict).__name__}")
    if "proj.weight" in state_dict:
        proj: nn.Module = ImageProjection.from_official(state_dict)
    elif any(k == "latents" or k.startswith(("proj_in.", "proj_out.", "norm_out.", "layers.")) for k in state_dict):
        proj = IPAdapterPlusImageProjection.from_official(state_dict)
    else:
        kind = ("Full Face" if "proj.3.weight" in state_dict else
                "FaceID Plus" if "perceiver_resampler.proj_in.weight" in state_dict else
                "FaceID" if "norm.weight" in state_dict else "unknown")
        raise _checkpoint_error(f"IP-Adapter image_proj of an unsupported kind ({kind}; keys {sorted(state_dict)[:6]}): "
                                "this package loads the base layout (proj, norm) and the plus layout "
                                "(the Resampler: latents, proj_in, layers, proj_out, norm_out)")
    return load_official_image_proj(proj, state_dict)


class MultiIPAdapterImageProjection(nn.Module):
    """The loaded adapters' projections (``image_projection_layers``), as ``unet.encoder_hid_proj``.

    ``forward(image_embeds)``: a list with one tensor per adapter, ``(B, num_images, D)`` for
    :class:`ImageProjection`, ``(B, num_images, S, D)`` for the Resampler -> a list of
    ``(B, num_images, T, cross_attention_dim)`` image tokens.
    """

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.image_projection_layers = nn.ModuleList(layers)

    @property
    def num_ip_adapters(self) -> int:
        return len(self.image_projection_layers)

    def check(self, image_embeds: Any, batch: int, who: str = "UNet2DCondition") -> None:
        """Raise a ``ValueError`` naming the problem unless ``image_embeds`` fits the adapters."""
        layers = self.image_projection_layers
        want = ", ".join(p.input_shape().replace("B,", f"{batch},") for p in layers)
        if not isinstance(image_embeds, (list, tuple)):
            raise ValueError(f"{who}: added_cond_kwargs['image_embeds'] must be a list with one tensor per IP-Adapter "
                             f"([{want}]), got {type(image_embeds).__name__}")
        if len(image_embeds) != len(layers):
            raise ValueError(f"{who}: got {len(image_embeds)} image_embeds but {len(layers)} IP-Adapter(s) are "
                             f"loaded; give one tensor per adapter: [{want}]")
        for i, (e, p) in enumerate(zip(image_embeds, layers)):
            if not isinstance(e, torch.Tensor) or not p.accepts(e) or e.shape[0] != batch:
                got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise ValueError(f"{who}: image_embeds[{i}] has shape {got}; IP-Adapter {i} ({type(p).__name__}) "
                                 f"takes {p.input_shape().replace('B,', f'{batch},')} (one image per prompt: "
                                 "num_images = 1, e.g. emb[:, None])")

    def forward(self, image_embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for e, proj in zip(image_embeds, self.image_projection_layers):
            b, n = e.shape[:2]
            w = next(proj.parameters())
            tokens = proj(e.flatten(0, 1).to(w.dtype))  # every image of every prompt: (B * n, T, C)
            out.append(tokens.reshape(b, n, *tokens.shape[1:]))
        return out


# ---------------------------------------------------------------------------------------------
# One adapter by itself, the official layout, loading into a UNet
# ---------------------------------------------------------------------------------------------


class AddedKeyValue(nn.Module):
    """One cross-attention layer's new maps ``to_k_ip``, ``to_v_ip``: ``Linear(cross_attention_dim ->
    hidden_size, bias=False)`` (the official file's ``"<i>.to_k_ip.weight"``)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


def cross_attention_slots(unet: UNet2DCondition) -> list[tuple[int, str, Attention]]:
    """``(number, name, attn2)`` for every cross-attention layer, in diffusers' order; ``number`` is
    the layer's position among all attention layers (``attn1`` and ``attn2``), the official file's
    key prefix (1, 3, 5, ... when every block has both)."""
    return [(i, name, attn) for i, (name, attn) in enumerate(unet.attention_layers()) if name.endswith(".attn2")]


class IPAdapter(nn.Module):
    """One IP-Adapter: ``image_proj`` (an :class:`ImageProjection` or a Resampler) and
    ``ip_adapter``, the added keys/values of every cross-attention layer of the UNet it is made for,
    keyed by the official file's layer numbers (``ip_adapter["1"].to_k_ip``, ...): its
    ``ip_adapter.state_dict()`` is the file's ``"ip_adapter"`` dict.

    Build one fresh for a UNet with :meth:`for_unet` (to train it), read the official layout with
    :meth:`from_official`, write it with :meth:`official_state_dict`; :func:`attach_ip_adapters`
    (or :func:`load_ip_adapter`) installs it in the UNet.
    """

    def __init__(self, image_proj: nn.Module, layers: Sequence[tuple[int, int]], cross_attention_dim: int):
        """``layers``: ``(number, hidden_size)`` per cross-attention layer, in diffusers' order."""
        super().__init__()
        if getattr(image_proj, "cross_attention_dim", cross_attention_dim) != cross_attention_dim:
            raise ValueError(f"IPAdapter: the image projection makes tokens of width {image_proj.cross_attention_dim}, "
                             f"the UNet's cross-attention takes {cross_attention_dim}")
        self.cross_attention_dim = cross_attention_dim
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict({str(i): AddedKeyValue(h, cross_attention_dim) for i, h in layers})

    @classmethod
    def for_unet(cls, unet: UNet2DCondition, image_proj: nn.Module) -> IPAdapter:
        """A fresh adapter sized for ``unet`` (created on the device and in the dtype of ``image_proj``'s
        parameters, as PyTorch's default device allows)."""
        cross = unet.config.cross_attention_dim
        if cross is None:
            raise ValueError("IPAdapter: the UNet has no cross-attention (cross_attention_dim=None)")
        return cls(image_proj, [(i, attn.inner_dim) for i, _, attn in cross_attention_slots(unet)], cross)

    @classmethod
    def from_official(cls, state_dict: Mapping[str, Any], unet: UNet2DCondition) -> IPAdapter:
        """Read ``{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight", ...}}`` for ``unet``,
        strictly: a missing, unexpected or wrongly shaped key is a ``CheckpointMismatchError`` naming it.
        The adapter is created on the UNet's device, in its dtype."""
        from ..interop import load_state_dict

        if not isinstance(state_dict, Mapping):
            raise _checkpoint_error(f"an IP-Adapter state dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("image_proj", "ip_adapter") if k not in state_dict]
        unexpected = [k for k in state_dict if k not in ("image_proj", "ip_adapter")]
        if missing or unexpected:
            raise _checkpoint_error(f"an IP-Adapter state dict has two parts, 'image_proj' and 'ip_adapter': missing "
                                    f"{missing}, unexpected {unexpected[:10]}")
        cross = unet.config.cross_attention_dim
        if cross is None:
            raise ValueError("load_ip_adapter: the UNet has no cross-attention (cross_attention_dim=None)")
        p = next(unet.parameters())
        with torch.device(p.device):
            proj = image_projection_from_official(state_dict["image_proj"])
            if proj.cross_attention_dim != cross:
                key = "proj.weight" if isinstance(proj, ImageProjection) else "proj_out.weight"
                raise _checkpoint_error(f"IP-Adapter image_proj: {key} makes tokens of width {proj.cross_attention_dim}, "
                                        f"but the UNet's cross_attention_dim is {cross}: an adapter for another UNet")
            adapter = cls.for_unet(unet, proj).to(p.dtype)
        load_state_dict(adapter.ip_adapter, state_dict["ip_adapter"], what="IP-Adapter 'ip_adapter' weights")
        return adapter

    def official_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The official file's layout (what ``torch.save``/safetensors of the reference code holds)."""
        return {"image_proj": official_image_proj_state_dict(self.image_proj), "ip_adapter": self.ip_adapter.state_dict()}


def _nested(state_dict: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    """A state dict in the official layout; a flat one (``"image_proj.proj.weight"``, as in the
    official ``.safetensors`` files) or the path of such a file is split into the two parts."""
    if isinstance(state_dict, (str, Path)):
        from safetensors.torch import load_file

        path = Path(state_dict)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path.name}: only .safetensors files are loaded (pickled .bin files never are)")
        state_dict = load_file(str(path))
    if isinstance(state_dict, Mapping) and state_dict and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in state_dict.items():
            part, _, rest = k.partition(".")
            nested.setdefault(part, {})[rest] = v
        return nested
    return state_dict


def attach_ip_adapters(unet: UNet2DCondition, adapters: Sequence[IPAdapter],
                       scale: float | Sequence[float] = 1.0) -> UNet2DCondition:
    """Install ``adapters`` in ``unet`` (replacing any loaded before): one
    :class:`IPAdapterAttnProcessor` per cross-attention layer sharing the adapters' ``to_k_ip``/
    ``to_v_ip`` modules (training the UNet's copy trains the adapter), and their projections as
    ``unet.encoder_hid_proj``. The adapters are moved to the UNet's device and dtype."""
    from .unet_cond import UNet2DCondition

    if not isinstance(unet, UNet2DCondition):
        raise TypeError(f"an IP-Adapter attaches to a UNet2DCondition, got {type(unet).__name__}")
    if unet.config.encoder_hid_dim_type is not None:
        raise ValueError(f"attach_ip_adapters: this UNet's encoder_hid_proj is its text projection "
                         f"(encoder_hid_dim_type={unet.config.encoder_hid_dim_type!r}, DeepFloyd IF); IP-Adapters "
                         "on such a UNet are not supported")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("attach_ip_adapters: no adapters given (unload_ip_adapter removes them)")
    slots = cross_attention_slots(unet)
    scales = _scales(scale, len(adapters), "attach_ip_adapters")
    for j, a in enumerate(adapters):
        want = [str(i) for i, _, _ in slots]
        if list(a.ip_adapter) != want or a.cross_attention_dim != unet.config.cross_attention_dim or any(
                a.ip_adapter[str(i)].to_k_ip.out_features != attn.inner_dim for i, _, attn in slots):
            raise ValueError(f"attach_ip_adapters: adapter {j} was made for another UNet (layers {list(a.ip_adapter)[:6]}, "
                             f"this UNet's cross-attention layers are {want[:6]}...)")
    p = next(unet.parameters())
    for a in adapters:
        a.to(device=p.device, dtype=p.dtype)
    for i, _, attn in slots:
        with torch.device("meta"):  # its own maps are replaced by the adapters' right away
            proc = IPAdapterAttnProcessor(attn.inner_dim, attn.cross_attention_dim, len(adapters), scales)
        proc.to_k_ip = nn.ModuleList(a.ip_adapter[str(i)].to_k_ip for a in adapters)
        proc.to_v_ip = nn.ModuleList(a.ip_adapter[str(i)].to_v_ip for a in adapters)
        attn.set_processor(proc)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([a.image_proj for a in adapters])
    return unet


def load_ip_adapter(unet: UNet2DCondition,
                    state_dict: Mapping[str, Any] | str | Path | Sequence[Mapping[str, Any] | str | Path],
                    scale: float | Sequence[float] = 1.0) -> UNet2DCondition:
    """Load one IP-Adapter (a state dict in the official layout, or the path of an official
    ``.safetensors`` file) or several at once (a list) into ``unet``, replacing any loaded before.

    Strict (:meth:`IPAdapter.from_official`); base (``proj``, ``norm``) and plus (Resampler) layouts.
    Afterwards ``unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [e_0,
    ...]})`` takes one image embedding tensor per adapter; :func:`set_ip_adapter_scale` sets lambda.
    """
    many = isinstance(state_dict, Sequence) and not isinstance(state_dict, (str, Path))
    parts = [_nested(s) for s in (state_dict if many else [state_dict])]
    if not parts:
        raise ValueError("load_ip_adapter: no state dicts given")
    adapters = []
    for j, sd in enumerate(parts):
        try:
            adapters.append(IPAdapter.from_official(sd, unet))
        except ValueError as e:
            if len(parts) == 1:
                raise
            raise type(e)(f"IP-Adapter {j}: {e}") from None
    return attach_ip_adapters(unet, adapters, scale)


def ip_adapter_processors(unet: UNet2DCondition) -> list[IPAdapterAttnProcessor]:
    return [a.processor for _, a in unet.cross_attentions() if isinstance(a.processor, IPAdapterAttnProcessor)]


def set_ip_adapter_scale(unet: UNet2DCondition, scale: float | Sequence[float]) -> None:
    """lambda of eq. 5: one number for every loaded adapter, or one per adapter (in load order).
    0 gives the text-only UNet exactly."""
    procs = ip_adapter_processors(unet)
    if not procs or unet.encoder_hid_proj is None:
        raise ValueError("set_ip_adapter_scale: the UNet has no IP-Adapter loaded (load_ip_adapter)")
    for proc in procs:
        proc.set_scale(scale)


def unload_ip_adapter(unet: UNet2DCondition) -> UNet2DCondition:
    """Remove the IP-Adapter(s): the default processor back in every layer that had one, no
    ``encoder_hid_proj``. The UNet is then the text-only model it was before loading."""
    for _, attn in unet.cross_attentions():
        if isinstance(attn.processor, IPAdapterAttnProcessor):
            attn.set_processor(AttnProcessor())
    unet.encoder_hid_proj = None
    return unet


def ip_adapter_parameters(unet: UNet2DCondition) -> list[nn.Parameter]:
    """The loaded adapters' parameters (projections and added keys/values): what IP-Adapter trains."""
    if unet.encoder_hid_proj is None:
        return []
    params = list(unet.encoder_hid_proj.parameters())
    for proc in ip_adapter_processors(unet):
        params += list(proc.parameters())
    return params


def attach_like_diffusers(unet: UNet2DCondition, model: Any) -> UNet2DCondition:
    """Give ``unet`` the structure of the IP-Adapters loaded in the diffusers ``UNet2DConditionModel``
    ``model`` (fresh weights, the same shapes and scales), so that ``model.state_dict()`` loads into
    it strictly: the IP-Adapter part of :func:`~diffusion_core.interop.from_diffusers`."""
    projections = []
    for j, layer in enumerate(model.encoder_hid_proj.image_projection_layers):
        kind = type(layer).__name__
        if kind == "ImageProjection":
            proj: nn.Module = ImageProjection(layer.image_embeds.in_features, layer.norm.normalized_shape[0],
                                              layer.num_image_text_embeds)
        elif kind == "IPAdapterPlusImageProjection":
            attn = layer.layers[0].attn
            proj = IPAdapterPlusImageProjection(
                embed_dims=layer.proj_in.in_features, output_dims=layer.proj_out.out_features,
                hidden_dims=layer.proj_in.out_features, depth=len(layer.layers),
                dim_head=attn.to_q.out_features // attn.heads, heads=attn.heads, num_queries=layer.latents.shape[1],
                ff_inner_dim=layer.layers[0].ff[1].net[0].proj.out_features)
        else:
            raise ValueError(f"from_diffusers: IP-Adapter {j} has a {kind} image projection; this package has the "
                             "base (ImageProjection) and plus (IPAdapterPlusImageProjection) ones")
        projections.append(proj)
    scales = next((list(p.scale) for p in model.attn_processors.values() if hasattr(p, "to_k_ip")), 1.0)
    if not all(isinstance(s, (int, float)) for s in scales):
        raise ValueError(f"from_diffusers: IP-Adapter scales {scales} per image or per block are not supported")
    return attach_ip_adapters(unet, [IPAdapter.for_unet(unet, p) for p in projections], scales)


def ip_adapter_sd15() -> IPAdapter:
    """The SD 1.5 IP-Adapter (``h94/IP-Adapter``, ``models/ip-adapter_sd15``; preset
    ``"ip-adapter-sd15"``): an :class:`ImageProjection` from OpenCLIP ViT-H/14's 1024-d image
    embedding to 4 tokens of 768, and keys/values for the 16 cross-attention layers of SD 1.5's
    UNet: 3,150,336 + 19,169,280 = 22,319,616 parameters."""
    from .unet_cond import CondUNetConfig, UNet2DCondition

    with torch.device("meta"):  # only to list its layers
        unet = UNet2DCondition(CondUNetConfig.sd15())
    return IPAdapter.for_unet(unet, ImageProjection(1024, 768, 4))
