"""Multi-head attention with a seam for changing how it attends (chapters 01, 04, 09).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V          (Vaswani et al. 2017, eq. 1)

with ``Q = x W_q``, ``K = c W_k``, ``V = c W_v`` over ``heads`` heads of width ``d = dim_head``,
and ``c = x`` (self-attention, the DDPM UNet at 16x16) or ``c`` = other tokens (cross-attention,
text tokens in Latent Diffusion). The parameter names follow diffusers (``to_q, to_k, to_v,
to_out.0, group_norm``) so its checkpoints load.

The seam: the computation itself lives in ``attn.processor``, a callable
``processor(attn, hidden_states, encoder_hidden_states=None, **kwargs) -> hidden_states``.
The default :class:`AttnProcessor` is a few lines built from the module's reusable pieces
(:meth:`Attention.to_tokens`, :meth:`Attention.heads_to_batch`, :meth:`Attention.attend`,
:meth:`Attention.batch_to_heads`, :meth:`Attention.from_tokens`). IP-Adapter (chapter 09) adds a
second key/value path over image tokens by installing another processor with
:meth:`Attention.set_processor`, without touching the UNet; a processor that is an ``nn.Module``
is registered as the submodule ``processor``, so its weights save and load with the model
(``...attn2.processor.to_k_ip.0.weight``, as in diffusers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class AttnProcessor:
    """The default processor: (group norm) -> Q, K, V -> softmax(QK^T/sqrt(d))V -> out projection
    (-> + residual) (-> / rescale_output_factor).

    ``attention_mask`` (optional) is a 4-d tensor that broadcasts to ``(B, heads, N_q, N_kv)``,
    e.g. ``(B, 1, 1, N_kv)``: a boolean mask (True = attend) or an additive float bias.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"AttnProcessor got unexpected arguments: {', '.join(sorted(kwargs))}")
        residual = hidden_states
        x, spatial = attn.to_tokens(hidden_states)  # (B, N, C)
        q, k, v = attn.project_qkv(x, encoder_hidden_states)  # (B, N, inner), (B, M, inner) x 2
        q, k, v = attn.heads_to_batch(q), attn.heads_to_batch(k), attn.heads_to_batch(v)  # (B, heads, ., d)
        out = attn.batch_to_heads(attn.attend(q, k, v, attention_mask))  # (B, N, heads*d)
        out = attn.to_out[1](attn.to_out[0](out))
        return attn.from_tokens(out, residual, spatial)


class AttnAddedKVProcessor:
    """GLIDE's attention (Nichol et al. 2021, appendix A; unCLIP's decoder and DeepFloyd IF keep it):
    every attention layer of the UNet also sees the text. The text tokens ``c`` are projected to
    keys and values of their own and put *before* the image's::

        x = GroupNorm(h) as tokens,   c <- norm_cross(c)  (GroupNorm over channels, or nothing)
        Q = x W_q,   K = [c W_k' ; x W_k],   V = [c W_v' ; x W_v]      (W_k', W_v': add_k_proj, add_v_proj)
        h <- h + W_o softmax(Q K^T / sqrt(d)) V

    With ``only_cross_attention`` the image keys are left out (``K = c W_k'``). ``attention_mask``
    covers the text tokens only, ``(B, M)``-like and broadcastable to ``(B, heads, N, M)`` (boolean,
    True = attend, or an additive bias); the image tokens are always attended. diffusers'
    ``AttnAddedKVProcessor``.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"AttnAddedKVProcessor got unexpected arguments: {', '.join(sorted(kwargs))}")
        if attn.add_k_proj is None:
            raise ValueError("AttnAddedKVProcessor needs an Attention built with added_kv_proj_dim")
        if encoder_hidden_states is None:
            raise ValueError(f"Attention with added_kv_proj_dim={attn.added_kv_proj_dim} needs encoder_hidden_states "
                             f"(B, M, {attn.added_kv_proj_dim}): the text tokens its keys and values also take")
        residual = hidden_states
        x, spatial = attn.to_tokens(hidden_states)  # (B, N, C), group-normed
        c = attn.norm_context(attn.check_added_context(encoder_hidden_states))  # (B, M, added_kv_proj_dim)
        q = attn.heads_to_batch(attn.to_q(x))
        k = attn.heads_to_batch(attn.add_k_proj(c))  # (B, heads, M, d): the text's keys first
        v = attn.heads_to_batch(attn.add_v_proj(c))
        mask = attention_mask
        if not attn.only_cross_attention:
            k = torch.cat([k, attn.heads_to_batch(attn.to_k(x))], dim=2)  # (B, heads, M + N, d)
            v = torch.cat([v, attn.heads_to_batch(attn.to_v(x))], dim=2)
            if mask is not None:  # the image's own tokens are always attended
                keep = True if mask.dtype == torch.bool else 0.0
                mask = F.pad(mask, (0, x.shape[1]), value=keep)
        out = attn.batch_to_heads(attn.attend(q, k, v, mask))  # (B, N, heads*d)
        out = attn.to_out[1](attn.to_out[0](out))
        out = attn.from_tokens(out, residual, spatial)
        return out if attn.residual_connection else out + residual


CROSS_ATTENTION_NORMS = (None, "group_norm", "layer_norm")


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention over tokens or over the pixels of a feature map.

    ``forward(hidden_states, encoder_hidden_states=None, **kwargs)``:

    * ``hidden_states`` ``(B, C, H, W)`` with ``C = query_dim``: every pixel is a token
      (N = H*W); the result has the same shape. This is the DDPM/ADM attention block.
    * ``hidden_states`` ``(B, N, query_dim)``: tokens; the result is ``(B, N, out_dim)``.
    * ``encoder_hidden_states`` ``(B, M, cross_attention_dim)``: keys and values come from it
      (cross-attention); ``None`` means self-attention.

    ``norm_num_groups`` adds a GroupNorm (``group_norm``) on the queries' input;
    ``residual_connection`` adds the input back; the result is divided by
    ``rescale_output_factor``. ``to_out`` is ``[Linear, Dropout]`` (diffusers' layout).

    ``added_kv_proj_dim`` (GLIDE, unCLIP's decoder, DeepFloyd IF) adds ``add_k_proj``/``add_v_proj``:
    the text tokens ``(B, M, added_kv_proj_dim)`` become keys and values placed before the image's
    own, and the default processor is :class:`AttnAddedKVProcessor`; ``only_cross_attention`` drops
    the image's keys and values (no ``to_k``/``to_v``); ``cross_attention_norm`` ("group_norm" with
    ``cross_attention_norm_num_groups`` groups, or "layer_norm") normalises the text tokens first
    (``norm_cross``).
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        out_dim: int | None = None,
        processor: Callable[..., torch.Tensor] | None = None,
        added_kv_proj_dim: int | None = None,
        only_cross_attention: bool = False,
        cross_attention_norm: str | None = None,
        cross_attention_norm_num_groups: int = 32,
    ):
        super().__init__()
        if added_kv_proj_dim is None and only_cross_attention:
            raise ValueError("Attention: only_cross_attention=True needs added_kv_proj_dim (the text's keys/values)")
        if cross_attention_norm not in CROSS_ATTENTION_NORMS:
            raise ValueError(f"Attention: unknown cross_attention_norm {cross_attention_norm!r}; expected one of "
                             f"{CROSS_ATTENTION_NORMS}")
        if heads < 1 or dim_head < 1:
            raise ValueError(f"Attention: heads ({heads}) and dim_head ({dim_head}) must be positive")
        if norm_num_groups is not None and norm_num_groups < 1:
            raise ValueError(f"Attention: norm_num_groups must be positive (or None for no GroupNorm), got {norm_num_groups}")
        if norm_num_groups is not None and query_dim % norm_num_groups != 0:
            raise ValueError(
                f"Attention: query_dim={query_dim} is not divisible into {norm_num_groups} groups for GroupNorm"
            )
        self.query_dim = query_dim
        self.cross_attention_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.is_cross_attention = cross_attention_dim is not None
        self.heads, self.dim_head = heads, dim_head
        self.inner_dim = heads * dim_head
        self.out_dim = query_dim if out_dim is None else out_dim
        self.scale = dim_head**-0.5
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        if residual_connection and self.out_dim != query_dim:
            raise ValueError("Attention: residual_connection needs out_dim == query_dim")

        self.group_norm = (
            nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups is not None else None
        )
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        # with only_cross_attention the image gives no keys/values (diffusers leaves to_k/to_v out)
        self.to_k = None if only_cross_attention else nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_v = None if only_cross_attention else nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        # GLIDE's added keys/values: the text tokens (B, M, added_kv_proj_dim) projected to K and V of their own
        self.added_kv_proj_dim = added_kv_proj_dim
        self.only_cross_attention = only_cross_attention
        if added_kv_proj_dim is not None:
            self.add_k_proj: nn.Linear | None = nn.Linear(added_kv_proj_dim, self.inner_dim, bias=True)
            self.add_v_proj: nn.Linear | None = nn.Linear(added_kv_proj_dim, self.inner_dim, bias=True)
        else:
            self.add_k_proj = self.add_v_proj = None
        # a norm on the text tokens before their projection (IF: GroupNorm over their channels)
        norm_dim = added_kv_proj_dim if added_kv_proj_dim is not None else self.cross_attention_dim
        if cross_attention_norm == "group_norm":
            if norm_dim % cross_attention_norm_num_groups:
                raise ValueError(f"Attention: cross_attention_norm='group_norm' needs the text width {norm_dim} "
                                 f"divisible by cross_attention_norm_num_groups={cross_attention_norm_num_groups}")
            self.norm_cross: nn.Module | None = nn.GroupNorm(cross_attention_norm_num_groups, norm_dim, eps=1e-5)
        elif cross_attention_norm == "layer_norm":  # over cross_attention_dim, as diffusers
            self.norm_cross = nn.LayerNorm(self.cross_attention_dim)
        else:
            self.norm_cross = None
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.out_dim, bias=out_bias), nn.Dropout(dropout)])
        self.processor: Callable[..., torch.Tensor]
        if processor is None:
            processor = AttnAddedKVProcessor() if added_kv_proj_dim is not None else AttnProcessor()
        self.set_processor(processor)

    # -- the seam ------------------------------------------------------------------------------
    def set_processor(self, processor: Callable[..., torch.Tensor]) -> None:
        """Install ``processor(attn, hidden_states, encoder_hidden_states=None, **kwargs)``.
        An ``nn.Module`` processor becomes the submodule ``processor`` (its weights are saved)."""
        if not callable(processor):
            raise TypeError(f"Attention.set_processor needs a callable, got {type(processor).__name__}")
        if "processor" in self._modules:
            del self._modules["processor"]
        elif "processor" in self.__dict__:
            del self.__dict__["processor"]
        if isinstance(processor, nn.Module):
            self.add_module("processor", processor)
        else:
            object.__setattr__(self, "processor", processor)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, **kwargs)

    # -- the reusable pieces -------------------------------------------------------------------
    def to_tokens(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Apply ``group_norm`` (if any) and flatten a feature map to tokens.

        ``(B, C, H, W) -> ((B, H*W, C), (H, W))``; ``(B, N, C) -> ((B, N, C), None)``.
        """
        if hidden_states.ndim not in (3, 4) or hidden_states.shape[1 if hidden_states.ndim == 4 else 2] != self.query_dim:
            raise ValueError(
                f"Attention expects (B, {self.query_dim}, H, W) or (B, N, {self.query_dim}), "
                f"got {tuple(hidden_states.shape)}"
            )
        gn = self.group_norm
        if hidden_states.ndim == 4:
            h, w = hidden_states.shape[-2:]
            x = hidden_states
            if gn is not None:
                x = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
            return x.flatten(2).transpose(1, 2), (h, w)
        x = hidden_states
        if gn is not None:
            x = F.group_norm(x.transpose(1, 2), gn.num_groups, gn.weight, gn.bias, gn.eps).transpose(1, 2)
        return x, None

    def check_context(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Check that the key/value tokens are ``(B, M, cross_attention_dim)``."""
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"Attention: encoder_hidden_states must be (B, M, {self.cross_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        return encoder_hidden_states

    def check_added_context(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Check that the text tokens of the added keys/values are ``(B, M, added_kv_proj_dim)``."""
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.added_kv_proj_dim:
            raise ValueError(
                f"Attention: encoder_hidden_states must be (B, M, added_kv_proj_dim={self.added_kv_proj_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        return encoder_hidden_states

    def norm_context(self, c: torch.Tensor) -> torch.Tensor:
        """``norm_cross`` on the tokens ``(B, M, D)``: a GroupNorm over their D channels, a LayerNorm, or nothing."""
        norm = self.norm_cross
        if norm is None:
            return c
        if isinstance(norm, nn.GroupNorm):
            return norm(c.transpose(1, 2)).transpose(1, 2)
        return norm(c)

    def project_qkv(
        self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Q = x W_q``, ``K = c W_k``, ``V = c W_v`` with ``c = encoder_hidden_states`` (or ``x``).

        ``x (B, N, query_dim)``, ``c (B, M, cross_attention_dim)`` -> ``(B, N, inner), (B, M, inner) x 2``.
        For self-attention the three projections run as one matrix product with the weights
        stacked (the same numbers, one pass over ``x`` instead of three).
        """
        if encoder_hidden_states is not None:
            c = self.check_context(encoder_hidden_states)
            return self.to_q(x), self.to_k(c), self.to_v(c)
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        bias = None
        if self.to_q.bias is not None:
            bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        return F.linear(x, weight, bias).chunk(3, dim=-1)

    def heads_to_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Split the heads off the channels: ``(B, N, heads*d) -> (B, heads, N, d)`` (a view)."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def batch_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Put the heads back into the channels: ``(B, heads, N, d) -> (B, N, heads*d)``."""
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d) [+ mask]) v`` for ``q (B, heads, N, d)``, ``k, v (B, heads, M, d)``
        -> ``(B, heads, N, d)``, through ``scaled_dot_product_attention`` (a fused kernel)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def from_tokens(
        self, out: torch.Tensor, residual: torch.Tensor, spatial: tuple[int, int] | None
    ) -> torch.Tensor:
        """Undo :meth:`to_tokens`, add the residual if configured, divide by the rescale factor.

        ``out (B, H*W, C)`` with ``spatial = (H, W)`` -> ``(B, C, H, W)`` in the memory layout of
        the residual, else contiguous (a bare transpose would leave it channels-last, where the
        GroupNorm that follows in a UNet is several times slower on CPU); tokens stay ``(B, N, C)``.
        """
        if spatial is not None:
            b = out.shape[0]
            out = out.transpose(1, 2).reshape(b, self.out_dim, *spatial)
            if not self.residual_connection:
                out = out.contiguous()
        if self.residual_connection:
            out = residual + out  # the result takes the residual's layout
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    def extra_repr(self) -> str:
        kind = "cross" if self.is_cross_attention else "self"
        return f"{kind}-attention, heads={self.heads}, dim_head={self.dim_head}, processor={type(self.processor).__name__}"
