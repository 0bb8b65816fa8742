"""Timestep embeddings: how a UNet is told the noise level t (chapter 01, DDPM).

DDPM (Ho et al. 2020, appendix B) gives the network "the Transformer sinusoidal position
embedding" of t (Vaswani et al. 2017, section 3.5): a vector of sines and cosines of t at
geometrically spaced frequencies, then a two-layer MLP. The parameter names follow diffusers
(``time_proj``, ``time_embedding.linear_1``, ``time_embedding.linear_2``) so its checkpoints load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000,
) -> torch.Tensor:
    """The sinusoidal embedding of timesteps ``t`` (shape ``(B,)``, integer or fractional).

    With ``half = dim // 2`` and ``i = 0 .. half-1`` the frequencies are

        omega_i = max_period ** (-i / (half - downscale_freq_shift))

    and the embedding is ``[sin(t omega), cos(t omega)]`` (``[cos, sin]`` when
    ``flip_sin_to_cos``); an odd ``dim`` gets one zero column at the end. DDPM's original code
    uses ``downscale_freq_shift=1`` and sin first (the google/ddpm-* checkpoints);
    ``downscale_freq_shift=0`` with cos first is the convention of ADM and Stable Diffusion.

    Computed in float32 whatever the model's dtype (t up to 1000 times the top frequency needs
    the precision; the MLP that follows casts it). Returns ``(B, dim)``.
    """
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be positive, got {dim}")
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    if half == 0:
        return torch.zeros(t.shape[0], dim, device=t.device)
    if half - downscale_freq_shift <= 0:
        raise ValueError(
            f"timestep_embedding: dim={dim} is too small for downscale_freq_shift={downscale_freq_shift}"
        )
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    # omega_i = max_period^(-i / (half - shift))
    omega = torch.exp(-math.log(max_period) * i / (half - downscale_freq_shift))
    angle = t.float()[:, None] * omega[None, :]  # (B, half)
    sin, cos = torch.sin(angle), torch.cos(angle)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """:func:`timestep_embedding` as a module with no parameters: ``(B,) -> (B, num_channels)``."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)

    def extra_repr(self) -> str:
        return (f"num_channels={self.num_channels}, flip_sin_to_cos={self.flip_sin_to_cos}, "
                f"downscale_freq_shift={self.downscale_freq_shift}")


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal embedding: ``linear_2(act(linear_1(x)))`` (SiLU; GELU in DeepFloyd IF).

    ``(B, in_channels) -> (B, out_dim or time_embed_dim)``. In a UNet ``time_embed_dim`` is
    4 x the base width (DDPM: 128 -> 512), and every residual block projects it to its own width.
    """

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None, act_fn: str = "silu"):
        super().__init__()
        acts = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU}
        if act_fn not in acts:
            raise ValueError(f"TimestepEmbedding: act_fn={act_fn!r} is not supported; expected one of {', '.join(acts)}")
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = acts[act_fn]()
        self.linear_2 = nn.Linear(time_embed_dim, out_dim if out_dim is not None else time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        if sample.shape[-1] != self.linear_1.in_features:
            raise ValueError(
                f"TimestepEmbedding expects (B, {self.linear_1.in_features}), got {tuple(sample.shape)}"
            )
        return self.linear_2(self.act(self.linear_1(sample)))


class AttentionPooling(nn.Module):
    """Attention pooling of a token sequence into one vector (CLIP's image tower, Radford et al. 2021;
    Imagen/DeepFloyd IF pool the T5 tokens this way). ``(B, L, D) -> (B, D)``.

    The query is one extra token, the mean of the tokens plus a learned position ``p``; it attends
    over itself and the tokens with ``num_heads`` heads, and the pooled vector is what it reads::

        z = mean_l x_l + p,    X = [z ; x_1 .. x_L]
        out = softmax(z W_q (X W_k)^T / sqrt(d)) X W_v       (per head, d = D / num_heads)

    No mask: padding tokens are pooled too (as in IF). Names as diffusers' ``AttentionPooling``
    (``positional_embedding, k_proj, q_proj, v_proj``).
    """

    def __init__(self, num_heads: int, embed_dim: int):
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"AttentionPooling: embed_dim={embed_dim} is not divisible into num_heads={num_heads} heads")
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, width = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, d)
            return t.view(b, t.shape[1], heads, width // heads).transpose(1, 2)

        z = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, D)
        tokens = torch.cat([z, x], dim=1)  # (B, 1 + L, D)
        q, k, v = split(self.q_proj(z)), split(self.k_proj(tokens)), split(self.v_proj(tokens))
        w = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(width // heads), dim=-1).to(v.dtype)
        return (w @ v).transpose(1, 2).reshape(b, width)  # (B, D)


class TextTimeEmbedding(nn.Module):
    """The text's summary added to the timestep embedding (Imagen, Saharia et al. 2022, section 2.3:
    "a pooled embedding vector ... added to the diffusion timestep embedding"; DeepFloyd IF;
    diffusers' ``addition_embed_type="text"``). ``(B, L, encoder_dim) -> (B, time_embed_dim)``::

        e = LN_2(W AttentionPool(LN_1(tokens)))
    """

    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64):
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))
