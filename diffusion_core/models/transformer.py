"""The spatial transformer of Latent Diffusion (Rombach et al. 2022, Sec. 3.3): cross-attention
from image features to a conditioning sequence. Chapter 04 defines it; chapters 07-09 build on it.

A feature map ``h`` of shape ``(B, C, H, W)`` is normalised, projected to ``inner_dim`` channels and
flattened to ``H*W`` tokens. Each :class:`BasicTransformerBlock` then applies, with pre-LayerNorm
and a residual connection around each step,

1. self-attention among the image tokens (``attn1``),
2. cross-attention (``attn2``): queries from the image, keys and values from the conditioning
   ``y`` (text tokens from a text encoder, shape ``(B, N, cross_attention_dim)``),

   ``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V``,  ``Q = W_Q h``, ``K = W_K y``, ``V = W_V y``,

3. a feed-forward network with a GEGLU gate (Shazeer 2020): ``W_2 (a * GELU(g))``, ``[a, g] = W_1 x``.

The tokens are projected back to ``C`` channels and added to the input (a residual around the whole
transformer). Parameter names follow diffusers' ``Transformer2DModel`` so its checkpoints load:
``norm, proj_in, transformer_blocks.i.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj,
ff.net.2}, proj_out``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention


class GEGLU(nn.Module):
    """Gated GELU: ``[a, g] = W x + b``; returns ``a * GELU(g)``. ``(..., dim_in) -> (..., dim_out)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)


class GELU(nn.Module):
    """``GELU(W x + b)`` (exact GELU, no gate): diffusers' ``activation_fn="gelu"`` layer, as in
    unCLIP's prior. ``(..., dim_in) -> (..., dim_out)``."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu": GELU}


class FeedForward(nn.Module):
    """``net = [act(dim -> mult*dim), Dropout, Linear(mult*dim -> dim)]``; ``(B, N, dim) -> (B, N, dim)``.

    ``activation_fn``: ``"geglu"`` (Latent Diffusion's gated GELU, the default) or ``"gelu"``
    (a plain ``GELU(W_1 x)``: unCLIP's prior).
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, activation_fn: str = "geglu") -> None:
        super().__init__()
        if activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"FeedForward: activation_fn={activation_fn!r} is not supported; expected one of "
                             f"{', '.join(FEED_FORWARD_ACTIVATIONS)}")
        inner = dim * mult
        act = FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner)
        self.net = nn.ModuleList([act, nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; each pre-normed and residual.

    ``x``: ``(B, N, dim)`` image tokens; ``context``: ``(B, M, cross_attention_dim)`` or ``None``.
    With ``cross_attention_dim=None`` the block has no ``attn2``/``norm2`` (self-attention only).
    ``attention_bias`` gives Q, K, V projections biases (unCLIP's prior); ``activation_fn`` picks
    the feed-forward's (``"geglu"`` or ``"gelu"``); ``dropout`` applies after each attention's output
    projection and inside the feed-forward (as diffusers). ``forward(..., attention_mask=)`` masks
    the self-attention: a boolean or additive tensor broadcastable to ``(B, heads, N, N)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, bias=attention_bias, dropout=dropout)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            # K and V are computed from the conditioning y (cross_attention_dim), Q from the image.
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                                   bias=attention_bias, dropout=dropout)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x <- x + SelfAttn(LN(x))   (masked where attention_mask says so)
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        x = self.attn1(self.norm1(x), **mask) + x
        if self.attn2 is not None:
            # x <- x + softmax(Q K^T / sqrt(d)) V,  Q = W_Q LN(x),  K = W_K y,  V = W_V y
            x = self.attn2(self.norm2(x), encoder_hidden_states=context, **(cross_attention_kwargs or {})) + x
        # x <- x + W_2 GEGLU(LN(x))   (or W_2 GELU(W_1 LN(x)))
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """The spatial transformer: ``(B, C, H, W)`` features, ``(B, M, cross_attention_dim)`` context
    -> ``(B, C, H, W)``.

    ``inner_dim = heads * dim_head``. ``use_linear_projection`` picks ``proj_in``/``proj_out``:
    ``nn.Linear`` on tokens (SD 2.x) or a 1x1 ``nn.Conv2d`` on the map (SD 1.x); both compute the
    same function, their weights differ only in shape.
    """

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("heads", heads), ("dim_head", dim_head), ("in_channels", in_channels),
                            ("num_layers", num_layers), ("norm_num_groups", norm_num_groups)):
            if value < 1:
                raise ValueError(f"Transformer2DModel: {name} must be positive, got {value}")
        if in_channels % norm_num_groups:
            raise ValueError(
                f"Transformer2DModel: in_channels={in_channels} is not divisible by norm_num_groups={norm_num_groups}"
            )
        self.in_channels = in_channels
        self.cross_attention_dim = cross_attention_dim
        self.use_linear_projection = use_linear_projection
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
            self.proj_out: nn.Module = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, cross_attention_dim, dropout=dropout)
            for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Transformer2DModel expects (B, {self.in_channels}, H, W) features, got shape {tuple(x.shape)}"
            )
        if self.cross_attention_dim is not None:
            check_context(encoder_hidden_states, x.shape[0], self.cross_attention_dim, "Transformer2DModel")
        b, c, h, w = x.shape
        residual = x
        # (B, C, H, W) -> (B, H*W, C): one token per pixel
        x = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        # a 1x1 conv is the same linear map applied at every pixel: run both kinds on the tokens
        x = F.linear(x, self.proj_in.weight.flatten(1), self.proj_in.bias)  # (B, H*W, inner_dim)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states, cross_attention_kwargs)
        x = F.linear(x, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, H*W, C)
        # (B, H*W, C) -> (B, C, H, W), plus the residual around the whole transformer
        return residual + x.reshape(b, h, w, c).permute(0, 3, 1, 2)


def check_context(context: torch.Tensor | None, batch: int, dim: int, who: str) -> None:
    """Raise a ``ValueError`` naming the problem unless ``context`` has shape ``(batch, M, dim)``."""
    if context is None:
        raise ValueError(
            f"{who} has cross-attention (cross_attention_dim={dim}) and needs encoder_hidden_states "
            f"of shape (B, M, {dim}); got None"
        )
    if context.ndim != 3:
        raise ValueError(
            f"{who}: encoder_hidden_states must be (B, M, {dim}), got shape {tuple(context.shape)}"
        )
    if context.shape[-1] != dim:
        raise ValueError(
            f"{who}: encoder_hidden_states has context dim {context.shape[-1]}, but the model's "
            f"cross_attention_dim is {dim}"
        )
    if context.shape[0] != batch:
        raise ValueError(
            f"{who}: encoder_hidden_states has batch {context.shape[0]}, but the input has batch {batch}"
        )
