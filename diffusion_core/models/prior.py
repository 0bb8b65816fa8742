"""unCLIP's diffusion prior (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation
with CLIP Latents", section 2.1; chapter 12).

DALL·E 2 makes an image from a caption ``y`` in two stages: a *prior* ``p(z_i | y)`` that produces a
CLIP image embedding ``z_i``, and a decoder ``p(x | z_i, y)`` that inverts it (:mod:`.unclip`). The
diffusion prior is a Gaussian diffusion over the (normalised) embedding vector ``z_i`` itself, and
its network is, in the paper's words, "a decoder-only Transformer with a causal attention mask on a
sequence consisting of, in order: the encoded text, the CLIP text embedding, an embedding for the
diffusion timestep, the noised CLIP image embedding, and a final embedding whose output from the
Transformer is used to predict the unnoised CLIP image embedding". It predicts ``z_i`` directly,
not the noise::

    L_prior = E_{t, z_i^(t)} || f_theta(z_i^(t), t, y) - z_i ||^2          (section 2.1)

The sequence, for ``M`` text tokens ``s_1..s_M`` (the CLIP text encoder's last hidden states), the
CLIP text embedding ``z_t`` and the noised image embedding ``z_i^(t)``, all widths ``D = heads x
head_dim``::

    h_0 = [ W_s s_1 .. W_s s_M ;  W_e z_t ;  MLP(sin(t)) ;  W_in z_i^(t) ;  q ]  +  P     (B, M + 4, D)

with ``q`` the learned query token ("prd" for prediction, as the released code names it) and ``P``
learned positions, one per slot (``num_embeddings + additional_embeddings`` of them: Karlo's 77 text
tokens and 4 more). Then ``L`` pre-norm transformer blocks (self-attention with biases, a GELU MLP),
with attention logits biased by

    bias[q, k] = -10000 * [k > q]   (causal: a slot sees itself and the slots before it)
               + -10000 * [k is a padded text token]

and the output is read at the query token::

    z_hat = W_out LN(h_L[:, -1])                                                       (B, clip_embed_dim)

The prior works on standardised embeddings; ``clip_mean`` and ``clip_std`` (statistics of the CLIP
image embeddings of the training set, stored with the weights) map back:
``z_i = z_hat * clip_std + clip_mean`` (:meth:`PriorTransformer.post_process_latents`).

Parameter names, the config keys and the forward signature are diffusers' ``PriorTransformer``'s, so
kakaobrain/karlo-v1-alpha's ``prior`` folder loads (``interop.load_pretrained``) and the unCLIP
pipeline's call works unchanged::

    prior(hidden_states=z_i_t, timestep=t, proj_embedding=z_t, encoder_hidden_states=s,
          attention_mask=text_mask).predicted_image_embedding

diffusers' other switches, all cheap, are kept for its other priors (Kandinsky 2.x uses Karlo's
layout with other widths; Shap-E's prior uses the rest): ``norm_in_type="layer"`` (a LayerNorm on
``h_0``), ``embedding_proj_norm_type="layer"`` (a LayerNorm on ``z_t`` before ``W_e``),
``encoder_hid_proj_type=None`` (no text tokens), ``added_emb_type=None`` (no query token: the output
is read at the noised tokens, ``(B, N, clip_embed_dim)``), ``time_embed_act_fn="gelu"``,
``time_embed_dim``, ``embedding_proj_dim``, ``clip_embed_dim``.

Two behaviours follow diffusers for parity and are worth knowing: with ``attention_mask=None`` no
mask is applied at all (not even the causal one; the unCLIP pipeline always passes the text mask),
and the mask is an additive -10000, not -inf, so a row with every key masked stays finite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimestepEmbedding, Timesteps
from .transformer import BasicTransformerBlock

# the released code's and diffusers' masking bias: added to a masked logit (exp(-10000) is 0 in float32)
MASK_BIAS = -10000.0

# the values each switch may take here (diffusers' names); anything else is a ValueError naming the key
SUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "time_embed_act_fn": ("silu", "swish", "gelu"),
    "norm_in_type": (None, "layer"),
    "embedding_proj_norm_type": (None, "layer"),
    "encoder_hid_proj_type": ("linear", None),
    "added_emb_type": ("prd", None),
}


@dataclass
class PriorConfig:
    """The prior's shape, in diffusers' ``PriorTransformer`` config keys (Karlo's values by default).

    ``embedding_dim``: the width of the noised image embedding and of the text tokens (CLIP ViT-L/14:
    768); ``num_embeddings``: text tokens (77); ``additional_embeddings``: the other slots (text
    embedding, time, noised embedding, query: 4). ``time_embed_dim``, ``embedding_proj_dim`` (the
    text embedding's width) and ``clip_embed_dim`` (the output's) default to the widths above.
    """

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    def __post_init__(self) -> None:
        for key, allowed in SUPPORTED_OPTIONS.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"PriorTransformer: {key}={getattr(self, key)!r} is not supported; "
                                 f"supported: {', '.join(repr(a) for a in allowed)}")
        for key in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"PriorTransformer: {key} must be positive, got {getattr(self, key)}")
        for key in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"PriorTransformer: {key} must be positive (or None), got {getattr(self, key)}")
        if self.num_embeddings < 0 or self.additional_embeddings < 0:
            raise ValueError("PriorTransformer: num_embeddings and additional_embeddings must not be negative, got "
                             f"{self.num_embeddings} and {self.additional_embeddings}")
        if self.num_embeddings + self.additional_embeddings < 1:
            raise ValueError("PriorTransformer: num_embeddings + additional_embeddings (the positions) must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PriorTransformer: dropout must be in [0, 1), got {self.dropout}")

    @property
    def inner_dim(self) -> int:
        """``D = num_attention_heads * attention_head_dim``, the transformer's width."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def karlo(cls) -> PriorConfig:
        """kakaobrain/karlo-v1-alpha, subfolder ``prior`` (diffusers' defaults): 20 layers of width
        2048 (32 heads of 64) over 77 CLIP ViT-L/14 text tokens and 4 more slots; 768-wide embeddings."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> PriorConfig:
        """A few-thousand-parameter prior for tests: 2 layers, width 16, 5 text tokens of width 12."""
        base = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=5,
                    additional_embeddings=4)
        return cls(**{**base, **overrides})

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | Any) -> PriorConfig:
        """From a diffusers ``PriorTransformer`` config (``model.config`` or a config.json dict); a
        missing key takes diffusers' default, a key diffusers' ``PriorTransformer`` does not have
        (other than ``_class_name``-style metadata) or an unsupported value is a ValueError naming it."""
        c = dict(config)
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in c if k not in names and not k.startswith("_"))
        if unknown:
            raise ValueError(f"PriorTransformer conversion: unsupported diffusers config keys {', '.join(unknown)}")
        return cls(**{k: c[k] for k in names if k in c})


@dataclass
class PriorTransformerOutput:
    """``predicted_image_embedding``: ``(B, clip_embed_dim)`` the predicted (standardised) clean CLIP
    image embedding; ``(B, N, clip_embed_dim)`` without a query token (``added_emb_type=None``)."""

    predicted_image_embedding: torch.Tensor


class PriorTransformer(nn.Module):
    """unCLIP's diffusion prior ``f_theta(z_i^(t), t, z_t, s) -> z_i`` (see the module docstring).

    ``forward(hidden_states, timestep, proj_embedding, encoder_hidden_states=None, attention_mask=None,
    return_dict=True)``:

    * ``hidden_states``: ``(B, embedding_dim)`` the noised image embedding ``z_i^(t)`` (or ``(B, N,
      embedding_dim)``, N noised tokens);
    * ``timestep``: a number, a 0-d tensor, ``(1,)`` or ``(B,)``;
    * ``proj_embedding``: ``(B, embedding_proj_dim)`` the CLIP text embedding ``z_t``;
    * ``encoder_hidden_states``: ``(B, M, embedding_dim)`` the text tokens (required with
      ``encoder_hid_proj_type="linear"``, refused without);
    * ``attention_mask``: ``(B, M)`` over the text tokens, True/1 = a real token, False/0 = padding.

    Returns :class:`PriorTransformerOutput` (``return_dict=False``: a 1-tuple), as diffusers.
    """

    def __init__(self, config: PriorConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = PriorConfig(**kwargs)
        elif kwargs:
            raise TypeError("PriorTransformer takes a PriorConfig or keyword arguments, not both")
        self.config = config
        c = config
        d = c.inner_dim
        time_embed_dim = c.time_embed_dim or d
        self.embedding_proj_dim = c.embedding_proj_dim or c.embedding_dim
        self.clip_embed_dim = c.clip_embed_dim or c.embedding_dim

        # MLP(sin(t)): the sinusoidal embedding of t at width D (cos first), then Linear-act-Linear back to D
        self.time_proj = Timesteps(d, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(d, time_embed_dim, out_dim=d, act_fn=c.time_embed_act_fn)
        # W_in: the noised image embedding z_i^(t) into one token
        self.proj_in = nn.Linear(c.embedding_dim, d)
        # W_e (after an optional LayerNorm): the CLIP text embedding z_t into one token
        self.embedding_proj_norm = nn.LayerNorm(self.embedding_proj_dim) if c.embedding_proj_norm_type else None
        self.embedding_proj = nn.Linear(self.embedding_proj_dim, d)
        # W_s: the text encoder's token states into tokens
        self.encoder_hidden_states_proj = nn.Linear(c.embedding_dim, d) if c.encoder_hid_proj_type else None
        # P: one learned position per slot (small random values: an untrained prior tells the slots apart)
        self.positional_embedding = nn.Parameter(
            0.02 * torch.randn(1, c.num_embeddings + c.additional_embeddings, d))
        # q: the query token whose output is the prediction
        self.prd_embedding = nn.Parameter(0.02 * torch.randn(1, 1, d)) if c.added_emb_type == "prd" else None
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(d, c.num_attention_heads, c.attention_head_dim, dropout=c.dropout,
                                  attention_bias=True, activation_fn="gelu")
            for _ in range(c.num_layers))
        self.norm_in = nn.LayerNorm(d) if c.norm_in_type else None
        self.norm_out = nn.LayerNorm(d)
        # W_out: back to the CLIP embedding's width
        self.proj_to_clip_embeddings = nn.Linear(d, self.clip_embed_dim)
        # the embeddings' statistics (identity until a checkpoint or fit sets them)
        self.clip_mean = nn.Parameter(torch.zeros(1, self.clip_embed_dim))
        self.clip_std = nn.Parameter(torch.ones(1, self.clip_embed_dim))

    # -- standardisation ------------------------------------------------------------------------
    def pre_process_latents(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """``(z_i - clip_mean) / clip_std``: a CLIP image embedding into the prior's space (training targets)."""
        return (image_embeddings - self.clip_mean.to(image_embeddings)) / self.clip_std.to(image_embeddings)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """``z_hat * clip_std + clip_mean``: the prior's output back to a CLIP image embedding (diffusers' name)."""
        return prior_latents * self.clip_std.to(prior_latents) + self.clip_mean.to(prior_latents)

    # -- the input checks -------------------------------------------------------------------------
    def _check(self, name: str, x: Any, width: int, shapes: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or x.shape[-1] != width:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"PriorTransformer: {name} must be {shapes} with width {width}, got {got}")
        return x

    def _timesteps(self, timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"PriorTransformer: timestep must be a number, (1,) or (B,) = ({batch},), "
                             f"got shape {tuple(t.shape)}")
        return t.reshape(-1).to(device).expand(batch)

    def _attention_bias(self, attention_mask: torch.Tensor, batch: int, text_len: int, length: int,
                        dtype: torch.dtype) -> torch.Tensor:
        """The additive bias ``(B, 1, L, L)``: -10000 above the diagonal (causal) plus -10000 on the
        columns of padded text tokens (the slots after the text are never padding)."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, text_len):
            raise ValueError(f"PriorTransformer: attention_mask must be (B, M) = ({batch}, {text_len}), one entry "
                             f"per text token, got {_shape(attention_mask)}")
        padded = (1 - attention_mask.to(dtype)) * MASK_BIAS  # (B, M): 0 for a real token, -10000 for padding
        padded = F.pad(padded, (0, length - text_len), value=0.0)  # (B, L)
        causal = torch.full((length, length), MASK_BIAS, dtype=dtype, device=padded.device).triu(1)  # (L, L)
        return (padded[:, None, :] + causal)[:, None]  # (B, 1, L, L), broadcast over the heads

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PriorTransformerOutput | tuple[torch.Tensor]:
        c = self.config
        x = self._check("hidden_states (the noised image embedding)", hidden_states, c.embedding_dim,
                        "(B, embedding_dim) or (B, N, embedding_dim)")
        b = x.shape[0]
        z_t = self._check("proj_embedding (the CLIP text embedding)", proj_embedding, self.embedding_proj_dim,
                          "(B, embedding_proj_dim)")
        if z_t.shape[0] != b:
            raise ValueError(f"PriorTransformer: proj_embedding has batch {z_t.shape[0]}, hidden_states {b}")
        dtype = self.proj_in.weight.dtype

        tokens = []
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("PriorTransformer (encoder_hid_proj_type='linear') needs encoder_hidden_states "
                                 f"(B, M, {c.embedding_dim}): the text encoder's token states")
            s = encoder_hidden_states
            if s.ndim != 3 or s.shape[0] != b or s.shape[-1] != c.embedding_dim:
                raise ValueError(f"PriorTransformer: encoder_hidden_states must be (B, M, embedding_dim) = ({b}, M, "
                                 f"{c.embedding_dim}), got {tuple(s.shape)}")
            tokens.append(self.encoder_hidden_states_proj(s))  # W_s s_1 .. W_s s_M    (B, M, D)
        elif encoder_hidden_states is not None:
            raise ValueError("PriorTransformer: this prior has no text tokens (encoder_hid_proj_type=None); "
                             "pass encoder_hidden_states=None")
        text_len = tokens[0].shape[1] if tokens else 0
        if attention_mask is not None and not tokens:
            raise ValueError("PriorTransformer: attention_mask covers the text tokens; this call has none")

        if self.embedding_proj_norm is not None:
            z_t = self.embedding_proj_norm(z_t)
        e = self.embedding_proj(z_t)  # W_e z_t
        tokens.append(e[:, None] if e.ndim == 2 else e)  # (B, 1, D)
        t = self._timesteps(timestep, b, x.device)
        tokens.append(self.time_embedding(self.time_proj(t).to(dtype))[:, None])  # MLP(sin(t))    (B, 1, D)
        h_in = self.proj_in(x)  # W_in z_i^(t)
        h_in = h_in[:, None] if h_in.ndim == 2 else h_in  # (B, N, D)
        tokens.append(h_in)
        if self.prd_embedding is not None:
            tokens.append(self.prd_embedding.to(dtype).expand(b, -1, -1))  # q    (B, 1, D)
        h = torch.cat(tokens, dim=1)  # (B, L, D)
        length = h.shape[1]

        # + P: one position per slot; a table that covers only the noised tokens (Shap-E) leaves the rest at 0
        pos = self.positional_embedding.to(dtype)
        n_pos, n_noised = pos.shape[1], h_in.shape[1]
        if n_pos != length:
            if n_pos != n_noised:
                raise ValueError(
                    f"PriorTransformer: the sequence has {length} slots ({text_len} text tokens, "
                    f"{length - text_len - n_noised - (self.prd_embedding is not None)} embedding and time tokens, "
                    f"{n_noised} noised, {int(self.prd_embedding is not None)} query) but the positional embedding "
                    f"has {n_pos} (num_embeddings + additional_embeddings = {c.num_embeddings} + "
                    f"{c.additional_embeddings}); pass {c.num_embeddings} text tokens")
            before = length - n_noised - (1 if self.prd_embedding is not None else 0)
            pos = F.pad(pos, (0, 0, before, length - before - n_pos))
        h = h + pos

        bias = None
        if attention_mask is not None:
            bias = self._attention_bias(attention_mask, b, text_len, length, h.dtype)
        if self.norm_in is not None:
            h = self.norm_in(h)
        for block in self.transformer_blocks:
            h = block(h, attention_mask=bias)
        h = self.norm_out(h)
        # read the query token's output (without one: the noised tokens', the slots after the conditioning)
        h = h[:, -1] if self.prd_embedding is not None else h[:, length - n_noised:]
        z_hat = self.proj_to_clip_embeddings(h)  # W_out LN(h_L)
        if not return_dict:
            return (z_hat,)
        return PriorTransformerOutput(predicted_image_embedding=z_hat)


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


# ----------------------------------------------------------------------------------------------------
# diffusers interop and presets


def prior_from_diffusers_config(config: Mapping[str, Any] | Any) -> PriorTransformer:
    """An (untrained) :class:`PriorTransformer` for a diffusers ``PriorTransformer`` config dict
    (``interop.FROM_CONFIG``; unsupported keys or values are ValueErrors naming them)."""
    return PriorTransformer(PriorConfig.from_diffusers(config))


def from_diffusers_prior_transformer(model: Any) -> PriorTransformer:
    """Convert a diffusers ``PriorTransformer`` into ours with the same weights (strict: every key and
    shape must match)."""
    from ..interop import load_state_dict

    p = next(model.parameters())
    with torch.device(p.device):
        ours = prior_from_diffusers_config(dict(model.config)).to(p.dtype)
    return load_state_dict(ours, model.state_dict(), what="diffusers PriorTransformer")


def karlo_prior() -> PriorTransformer:
    """The diffusion prior of kakaobrain/karlo-v1-alpha (preset ``"karlo-prior"``): 1,022,030,080 parameters."""
    return PriorTransformer(PriorConfig.karlo())

