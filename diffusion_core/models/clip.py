r"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Defined in chapter 05 (CLIP); its text encoder is the conditioning of chapter 04 (Latent Diffusion /
Stable Diffusion), and its image encoder feeds the image adapters of chapters 09-10.

Two transformers map a caption and an image into one embedding space:

* the **text encoder** is a causal (GPT-style) pre-LayerNorm transformer over byte-pair tokens; its
  output at the end-of-text token, after a final LayerNorm, is the caption's feature;
* the **image encoder** is a Vision Transformer: non-overlapping ``patch x patch`` patches are linearly
  embedded, a learned class token is prepended, a LayerNorm is applied *before* the transformer
  (``pre_layrnorm``, sic, the name the public checkpoints use) and the class token's output, after
  ``post_layernorm``, is the image's feature;
* two bias-free linear projections ``W_t``, ``W_i`` map both features to a shared space.

Training is contrastive. With L2-normalised embeddings, a batch of B pairs gives the B x B matrix of
scaled cosine similarities

.. math:: \ell_{ij} = e^{t}\, \frac{I_i \cdot T_j}{\lVert I_i\rVert\,\lVert T_j\rVert},
   \qquad e^{\kappa} = 1/\tau,

and the loss is the symmetric cross-entropy (InfoNCE) that picks the matching pair in each row and each
column. The temperature tau is learned as ``logit_scale = kappa = log(1/tau)`` (``t`` in the paper's pseudocode; the book keeps t for the timestep), initialised at
``log(1/0.07)`` and clipped so that ``e^t <= 100`` (the paper, section 2.5).

Every module here keeps the parameter names of the public checkpoints (the layout of ``transformers``),
so a state dict such as Stable Diffusion 1.5's ``text_encoder`` loads without renaming::

    text_model.embeddings.{token_embedding, position_embedding}
    text_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.{fc1, fc2}, layer_norm2}
    text_model.final_layer_norm                          text_projection   (no bias)
    vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}
    vision_model.pre_layrnorm   vision_model.encoder.layers.{i}...   vision_model.post_layernorm
    visual_projection (no bias)                          logit_scale

The position ids that ``transformers`` keeps as a (non-persistent) buffer are not stored here; positions
are simply ``0..N-1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLIPTextConfig",
    "CLIPVisionConfig",
    "CLIPAttention",
    "CLIPMLP",
    "CLIPEncoderLayer",
    "CLIPEncoder",
    "CLIPTextTransformer",
    "CLIPVisionTransformer",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "CLIPTextOutput",
    "CLIPVisionOutput",
    "CLIPOutput",
    "clip_loss",
    "clip_logits",
    "load_clip_state_dict",
    "text_config_from_transformers",
    "vision_config_from_transformers",
    "LOGIT_SCALE_INIT",
    "LOGIT_SCALE_MAX",
]

# kappa = log(1/tau) with tau = 0.07 at initialisation (paper, section 2.5)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
# e^t is clipped at 100, i.e. t <= log(100)
LOGIT_SCALE_MAX = math.log(100.0)

Activation = Literal["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"]
_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def _check_positive(cfg: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")


def _check_common(cfg: CLIPTextConfig | CLIPVisionConfig) -> None:
    _check_positive(cfg, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"{type(cfg).__name__}: hidden_size ({cfg.hidden_size}) must be divisible by "
            f"num_attention_heads ({cfg.num_attention_heads})"
        )
    if cfg.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"{type(cfg).__name__}.hidden_act={cfg.hidden_act!r} is not supported; use one of {_ACTIVATIONS}"
        )
    if cfg.projection_dim is not None:
        _check_positive(cfg, ("projection_dim",))


@dataclass
class CLIPTextConfig:
    """The text transformer.

    ``pooling`` says where the caption's feature is read from ``last_hidden_state`` (B, N, D):

    * ``"eos"``: the first position whose id equals ``eos_token_id`` (each row must contain one);
    * ``"argmax"``: the position of the largest id in the row. This is the original CLIP rule, which
      works because the end-of-text token 49407 is the largest id of the BPE vocabulary. ``transformers``
      uses it for every checkpoint whose config still carries the old ``eos_token_id == 2`` (such as
      ``openai/clip-vit-large-patch14``, the Stable Diffusion 1.5 text encoder), and the first-``eos``
      rule otherwise; :func:`diffusion_core.interop.from_transformers` translates that rule into this
      field. Tokens added after the vocabulary (textual inversion) have larger ids, so ``"argmax"`` then
      reads the wrong position; that is the checkpoint's behaviour and is reproduced, not fixed.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # the context length
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pooling: Literal["eos", "argmax"] = "eos"
    projection_dim: int | None = 512  # size of text_projection's output (used by the *WithProjection models)

    def __post_init__(self) -> None:
        _check_common(self)
        _check_positive(self, ("vocab_size", "max_position_embeddings"))
        if self.pooling not in ("eos", "argmax"):
            raise ValueError(f"CLIPTextConfig.pooling must be 'eos' or 'argmax', got {self.pooling!r}")
        if self.pooling == "eos" and not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"CLIPTextConfig.eos_token_id={self.eos_token_id} is outside the vocabulary (size {self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def vit_l14(cls) -> CLIPTextConfig:
        """The text encoder of openai/clip-vit-large-patch14 (Stable Diffusion 1.5's text encoder):
        width 768, 12 layers, 12 heads, context 77, quick-GELU; its public config has the legacy
        ``eos_token_id == 2``, hence ``pooling="argmax"``."""
        return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2,
                   pooling="argmax", projection_dim=768)

    @classmethod
    def tiny(cls, **overrides: object) -> CLIPTextConfig:
        """A small text encoder for tests and the shapes-world chapter. Override any field, e.g.
        ``vocab_size=tokenizer.vocab_size``; ``eos_token_id=2`` is :class:`WordTokenizer`'s ``<end>``
        (pooling is by ``"eos"`` here, not the legacy argmax rule)."""
        base = cls(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2, pooling="eos",
                   projection_dim=32)
        return replace(base, **overrides)


@dataclass
class CLIPVisionConfig:
    """The Vision Transformer: ``(image_size / patch_size)^2`` patches plus one class token."""

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512  # size of visual_projection's output

    def __post_init__(self) -> None:
        _check_common(self)
        _check_positive(self, ("image_size", "patch_size", "num_channels"))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig: image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # + the class token

    @classmethod
    def vit_l14(cls) -> CLIPVisionConfig:
        """The image encoder of openai/clip-vit-large-patch14: 224 px, 14 px patches (16 x 16 = 256 of
        them), width 1024, 24 layers, 16 heads, projected to 768."""
        return cls(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, hidden_act="quick_gelu", projection_dim=768)

    @classmethod
    def tiny(cls, **overrides: object) -> CLIPVisionConfig:
        """A small ViT for tests and the shapes-world chapter: 32 px images, 4 px patches (64 tokens)."""
        base = cls(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32)
        return replace(base, **overrides)


# ----------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class CLIPTextOutput:
    """``last_hidden_state`` (B, N, D) after ``final_layer_norm``; ``pooled`` (B, D) its row at the
    end-of-text token; ``hidden_states``: the embeddings and the output of every layer, each (B, N, D),
    before the final LayerNorm (``num_hidden_layers + 1`` tensors), when asked for; ``text_embeds``
    (B, P): ``text_projection(pooled)``, for the models with a projection."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    text_embeds: torch.Tensor | None = None

    @property
    def pooler_output(self) -> torch.Tensor:  # the transformers name
        return self.pooled


@dataclass
class CLIPVisionOutput:
    """``last_hidden_state`` (B, 1 + P, D) out of the last layer (no LayerNorm after it; row 0 is the
    class token); ``pooled`` (B, D) = ``post_layernorm(last_hidden_state[:, 0])``; ``hidden_states``: the
    (pre-LayerNormed) embeddings and every layer's output, when asked for; ``image_embeds`` (B, P):
    ``visual_projection(pooled)``, for the models with a projection."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    image_embeds: torch.Tensor | None = None

    @property
    def pooler_output(self) -> torch.Tensor:
        return self.pooled


@dataclass
class CLIPOutput:
    """``logits_per_image`` (B_img, B_txt) = e^t cos(I_i, T_j); ``logits_per_text`` its transpose;
    ``image_embeds`` (B_img, P) and ``text_embeds`` (B_txt, P) L2-normalised; ``loss`` (scalar) when
    asked for."""

    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    loss: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------
# The transformer shared by both towers


def _activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "quick_gelu":
        # the original CLIP's sigmoid approximation: x * sigma(1.702 x)
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)  # exact: x * Phi(x)
    return F.gelu(x, approximate="tanh")  # gelu_new / gelu_pytorch_tanh


class CLIPAttention(nn.Module):
    """Multi-head self-attention, ``softmax(Q K^T / sqrt(d_head) + mask) V``, computed with
    ``scaled_dot_product_attention``. ``x``: (B, N, D) -> (B, N, D)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """``mask``: boolean (B, 1, N, N), True where a query may attend to a key (it then already
        contains the causal part); ``causal`` without a mask: query i attends to keys j <= i."""
        B, N, D = x.shape
        H = self.num_heads
        # (B, N, D) -> (B, H, N, D/H)
        q, k, v = (
            proj(x).view(B, N, H, D // H).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden width ``intermediate_size``. (B, N, D) -> (B, N, D)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.hidden_act = hidden_act
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_activation(self.fc1(x), self.hidden_act))


class CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm residual block:
    ``x = x + Attn(LN1(x))``, then ``x = x + MLP(LN2(x))``. (B, N, D) -> (B, N, D)."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` :class:`CLIPEncoderLayer` in sequence. Returns the list
    ``[x, layer_1(x), ..., layer_L(...)]`` when ``keep_all`` else ``[final]``."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False, keep_all: bool = False
    ) -> list[torch.Tensor]:
        states = [x]
        for layer in self.layers:
            x = layer(x, mask=mask, causal=causal)
            if keep_all:
                states.append(x)
        return states if keep_all else [x]


def _init_encoder(encoder: CLIPEncoder, width: int) -> None:
    """The initialisation of the original CLIP code: attention inputs and fc2 with std
    ``D^-1/2 (2L)^-1/2`` (the residual branches shrink with depth), out_proj ``D^-1/2``, fc1
    ``(2D)^-1/2``, biases zero. Loading a checkpoint overwrites all of it."""
    L = max(len(encoder.layers), 1)
    attn_std = width**-0.5 * (2 * L) ** -0.5
    for layer in encoder.layers:
        a, m = layer.self_attn, layer.mlp
        for lin, std in (
            (a.q_proj, attn_std),
            (a.k_proj, attn_std),
            (a.v_proj, attn_std),
            (a.out_proj, width**-0.5),
            (m.fc1, (2 * width) ** -0.5),
            (m.fc2, attn_std),
        ):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)


# ----------------------------------------------------------------------------------------------------
# Text tower


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(0..N-1)``: (B, N) ids -> (B, N, D)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    """The text tower (stored as ``text_model``): causal transformer, final LayerNorm, pooling."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        _init_encoder(self.encoder, cfg.hidden_size)

    def _check_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = (
                tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            )
            raise ValueError(f"input_ids must be a (B, N) integer tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens but the context length "
                f"(max_position_embeddings) is {cfg.max_position_embeddings}"
            )
        if input_ids.numel() and not input_ids.device.type == "meta":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), found values in [{lo}, {hi}]")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )

    def pool_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The index (B,) of the end-of-text token in each row, by the config's ``pooling`` rule."""
        if self.config.pooling == "argmax":
            return input_ids.argmax(dim=-1)  # torch returns the first maximal index
        is_eos = input_ids == self.config.eos_token_id
        if input_ids.device.type != "meta" and not bool(is_eos.any(dim=-1).all()):
            rows = (~is_eos.any(dim=-1)).nonzero().flatten().tolist()
            raise ValueError(
                f"rows {rows} of input_ids contain no end-of-text token (id {self.config.eos_token_id}); "
                "the pooled output is read there (was the caption truncated without its end token?)"
            )
        return is_eos.int().argmax(dim=-1)  # first position of eos

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """``input_ids`` (B, N) with N <= ``max_position_embeddings``; ``attention_mask`` (B, N), 1 for
        tokens and 0 for padding (optional: Stable Diffusion passes none and lets the causal mask alone
        hide what follows the end token)."""
        self._check_ids(input_ids, attention_mask)
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            N = input_ids.shape[1]
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()  # key j <= query i
            # (B, 1, N, N): causal and the key is not padding
            mask = causal[None, None] & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        states = self.encoder(x, mask=mask, causal=True, keep_all=output_hidden_states)
        last = self.final_layer_norm(states[-1])
        pooled = last[
            torch.arange(last.shape[0], device=last.device), self.pool_positions(input_ids).to(last.device)
        ]
        return CLIPTextOutput(
            last_hidden_state=last,
            pooled=pooled,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class _WithProjection:
    """What a ``*WithProjection`` model adds to its tower's model (:class:`CLIPTextModel`,
    :class:`CLIPVisionModel`): the bias-free projection D -> P named ``_proj_attr`` (the checkpoints'
    ``text_projection`` / ``visual_projection``), initialised with std ``D^-1/2`` after the tower, and its
    output ``W pooled`` in the output field ``_embeds_attr`` (``text_embeds`` / ``image_embeds``)."""

    _proj_attr: str
    _embeds_attr: str

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        if config.projection_dim is None:  # before the tower is built
            raise ValueError(f"{type(self).__name__} needs {type(config).__name__}.projection_dim")
        super().__init__(config)
        proj = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        nn.init.normal_(proj.weight, std=config.hidden_size**-0.5)
        setattr(self, self._proj_attr, proj)

    def _project(self, out: CLIPTextOutput | CLIPVisionOutput) -> CLIPTextOutput | CLIPVisionOutput:
        setattr(out, self._embeds_attr, getattr(self, self._proj_attr)(out.pooled))
        return out


class CLIPTextModel(nn.Module):
    """The text encoder alone (Stable Diffusion's ``text_encoder``). (B, N) ids -> :class:`CLIPTextOutput`
    with ``last_hidden_state`` (B, N, D) and ``pooled`` (B, D)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        return self._project(out)

    def _project(self, out: CLIPTextOutput) -> CLIPTextOutput:
        return out  # no projection (CLIPTextModelWithProjection adds text_embeds)

    def conditioning(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """The (B, N, D) states a diffusion UNet cross-attends to. ``clip_skip=0``: ``last_hidden_state``;
        ``clip_skip=k``: the output of layer ``L - k`` passed through ``final_layer_norm`` (the diffusers
        convention; ``k=1`` is the "penultimate layer" of NovelAI / Stable Diffusion 2)."""
        L = self.config.num_hidden_layers
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < L:
            raise ValueError(f"clip_skip must be an integer in [0, {L - 1}], got {clip_skip!r}")
        if clip_skip == 0:
            return self(input_ids).last_hidden_state
        out = self(input_ids, output_hidden_states=True)
        return self.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


class CLIPTextModelWithProjection(_WithProjection, CLIPTextModel):
    """The text encoder and ``text_projection`` (D -> P, no bias): ``text_embeds`` (B, P) =
    ``W_t pooled``."""

    _proj_attr, _embeds_attr = "text_projection", "text_embeds"


# ----------------------------------------------------------------------------------------------------
# Vision tower


class CLIPVisionEmbeddings(nn.Module):
    """Patchify and embed: (B, C, H, W) -> (B, 1 + (H/p)(W/p), D), class token first, plus learned
    positions. ``patch_embedding`` is a bias-free p x p convolution with stride p, i.e. a linear map of
    each flattened patch."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * cfg.hidden_size**-0.5)
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}"
            )
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """The image tower (stored as ``vision_model``): embeddings, ``pre_layrnorm``, transformer
    (bidirectional), ``post_layernorm`` on the class token."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint name
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=cfg.hidden_size**-0.5)
        _init_encoder(self.encoder, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """``pixel_values`` (B, C, image_size, image_size), normalised as the checkpoint expects
        (CLIP's per-channel mean/std for the public weights)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = self.encoder(x, keep_all=output_hidden_states)
        last = states[-1]
        return CLIPVisionOutput(
            last_hidden_state=last,
            pooled=self.post_layernorm(last[:, 0]),
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class CLIPVisionModel(nn.Module):
    """The image encoder alone: (B, C, H, W) -> :class:`CLIPVisionOutput`."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLIPVisionOutput:
        return self._project(self.vision_model(pixel_values, output_hidden_states=output_hidden_states))

    def _project(self, out: CLIPVisionOutput) -> CLIPVisionOutput:
        return out  # no projection (CLIPVisionModelWithProjection adds image_embeds)


class CLIPVisionModelWithProjection(_WithProjection, CLIPVisionModel):
    """The image encoder and ``visual_projection`` (D -> P, no bias): ``image_embeds`` (B, P) =
    ``W_i pooled`` (IP-Adapter's image prompt)."""

    _proj_attr, _embeds_attr = "visual_projection", "image_embeds"


# ----------------------------------------------------------------------------------------------------
# The contrastive model and its loss


def _as_scale(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(logit_scale, dtype=like.dtype, device=like.device)


def clip_logits(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    r"""The (B_img, B_txt) matrix :math:`\ell_{ij} = e^{t} \cos(I_i, T_j)`.

    ``image_embeds`` (B_img, P), ``text_embeds`` (B_txt, P), any norm (they are L2-normalised here);
    ``logit_scale`` is :math:`\kappa = \log(1/\tau)`, a scalar (not clamped here: :class:`CLIPModel` clamps
    its own parameter)."""
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must be (B, P) matrices, got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"image_embeds has {image_embeds.shape[1]} features but text_embeds has {text_embeds.shape[1]}"
        )
    kappa = _as_scale(logit_scale, image_embeds)
    if kappa.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(kappa.shape)}")
    I_e = F.normalize(image_embeds, dim=-1)
    T_e = F.normalize(text_embeds, dim=-1)
    return kappa.exp() * I_e @ T_e.T  # e^kappa * <I_i, T_j>


def clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    r"""The symmetric InfoNCE loss of CLIP for B aligned pairs (row i of each is one pair).

    With :math:`\ell = ` :func:`clip_logits` (B, B),

    .. math:: \mathcal L = \tfrac12 \Big[ \tfrac1B \sum_i -\log \frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ij}}}
              \;+\; \tfrac1B \sum_j -\log \frac{e^{\ell_{jj}}}{\sum_i e^{\ell_{ij}}} \Big],

    the mean of the image->text cross-entropy (rows) and the text->image one (columns), both with the
    diagonal as the label. ``image_embeds``, ``text_embeds``: (B, P); returns a scalar. For
    orthonormal, perfectly aligned embeddings it equals ``log(1 + (B-1) e^{-e^t})``, which tends to 0
    as the scale grows.
    """
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            f"clip_loss needs as many images as captions (pairs), got {image_embeds.shape[0]} images "
            f"and {text_embeds.shape[0]} captions"
        )
    return _symmetric_cross_entropy(clip_logits(image_embeds, text_embeds, logit_scale))


def _symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, B) logits with the matching pairs on the diagonal -> scalar loss."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss_i = F.cross_entropy(logits, labels)  # each image picks its caption (rows)
    loss_t = F.cross_entropy(logits.T, labels)  # each caption picks its image (columns)
    return (loss_i + loss_t) / 2


class CLIPModel(nn.Module):
    """Both towers, both projections and the learned temperature ``logit_scale`` (kappa = log 1/tau).

    ``forward(input_ids, pixel_values)`` -> :class:`CLIPOutput` with ``logits_per_image`` (B_img, B_txt)
    = ``min(e^kappa, 100) * cos(I_i, T_j)``. The clamp is applied where the scale is used, so the effective
    scale never exceeds 100 whatever the optimiser does to the parameter. (Trained checkpoints end at
    the clip, t ~ log 100 = 4.6052; transformers' CLIPModel does not clamp, so logits would differ only
    for a stored t above log 100.)
    """

    def __init__(
        self,
        text_config: CLIPTextConfig,
        vision_config: CLIPVisionConfig,
        logit_scale_init: float = LOGIT_SCALE_INIT,
    ):
        super().__init__()
        if text_config.projection_dim is None or text_config.projection_dim != vision_config.projection_dim:
            raise ValueError(
                "CLIPModel needs one shared embedding size: text projection_dim "
                f"{text_config.projection_dim} vs vision projection_dim {vision_config.projection_dim}"
            )
        self.text_config = text_config
        self.vision_config = vision_config
        self.text_model = CLIPTextTransformer(text_config)
        self.vision_model = CLIPVisionTransformer(vision_config)
        self.visual_projection = nn.Linear(
            vision_config.hidden_size, vision_config.projection_dim, bias=False
        )
        self.text_projection = nn.Linear(text_config.hidden_size, text_config.projection_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=vision_config.hidden_size**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text_config.hidden_size**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    @property
    def scale(self) -> torch.Tensor:
        """The effective scale ``e^kappa = 1/tau``, clamped at 100."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N) ids -> (B, P) projected, unnormalised text features ``W_t pooled``."""
        return self.text_projection(self.text_model(input_ids, attention_mask=attention_mask).pooled)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, P) projected, unnormalised image features ``W_i pooled``."""
        return self.visual_projection(self.vision_model(pixel_values).pooled)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
    ) -> CLIPOutput:
        I_f = self.encode_image(pixel_values)
        T_f = self.encode_text(input_ids, attention_mask)
        t = self.logit_scale.clamp(max=LOGIT_SCALE_MAX)
        logits = clip_logits(I_f, T_f, t)  # (B_img, B_txt)
        if return_loss and logits.shape[0] != logits.shape[1]:
            raise ValueError(
                f"return_loss needs as many images as captions (pairs), got {logits.shape[0]} and {logits.shape[1]}"
            )
        loss = _symmetric_cross_entropy(logits) if return_loss else None
        return CLIPOutput(
            logits_per_image=logits,
            logits_per_text=logits.T,
            image_embeds=F.normalize(I_f, dim=-1),
            text_embeds=F.normalize(T_f, dim=-1),
            loss=loss,
        )


# ----------------------------------------------------------------------------------------------------
# Loading checkpoints in the transformers layout


def load_clip_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "checkpoint"
) -> nn.Module:
    """Load a CLIP state dict in the ``transformers`` layout strictly (see
    :func:`diffusion_core.interop.load_state_dict`). Two harmless differences are absorbed: the
    ``position_ids`` buffers that older files store are dropped, and the ``text_model.`` /
    ``vision_model.`` prefix is added when the file is a bare tower (``transformers`` 5 saves
    ``CLIPTextModel`` without it)."""
    from ..interop import load_state_dict

    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    for prefix in ("text_model.", "vision_model."):
        own = [k for k in model.state_dict() if k.startswith(prefix)]
        if own and len(own) == len(model.state_dict()) and not any(k.startswith(prefix) for k in sd):
            sd = {prefix + k: v for k, v in sd.items()}
    return load_state_dict(model, sd, what=what)


# ----------------------------------------------------------------------------------------------------
# Presets (registered in diffusion_core.presets) and transformers conversion (diffusion_core.interop)


def clip_vit_l14_text() -> CLIPTextModel:
    """openai/clip-vit-large-patch14's CLIPTextModel, Stable Diffusion 1.5's text encoder (123,060,480)."""
    return CLIPTextModel(CLIPTextConfig.vit_l14())


def clip_vit_l14_vision() -> CLIPVisionModelWithProjection:
    """openai/clip-vit-large-patch14's CLIPVisionModelWithProjection (303,966,208 parameters)."""
    return CLIPVisionModelWithProjection(CLIPVisionConfig.vit_l14())


def clip_vit_l14() -> CLIPModel:
    """openai/clip-vit-large-patch14, both towers (427,616,513 parameters)."""
    return CLIPModel(CLIPTextConfig.vit_l14(), CLIPVisionConfig.vit_l14())


_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")
_VISION_KEYS = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "hidden_act", "layer_norm_eps")


def _sub_config(c: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A CLIPModel config's ``text_config`` / ``vision_config`` (older files: ``*_config_dict``)."""
    sub = c.get(name) or c.get(f"{name}_dict") or {}
    return dict(sub)


def _config_kwargs(c: Mapping[str, Any], keys: tuple[str, ...], projection_dim: int | None) -> dict[str, Any]:
    """The fields ``keys`` a transformers config dict sets (a missing or None key keeps our default,
    which is transformers' default) and ``projection_dim`` (given, else the dict's own, else 512)."""
    kw = {k: c[k] for k in keys if c.get(k) is not None}
    kw["projection_dim"] = projection_dim if projection_dim is not None else c.get("projection_dim", 512)
    return kw


def text_config_from_transformers(c: Mapping[str, Any], projection_dim: int | None = None) -> CLIPTextConfig:
    """Our :class:`CLIPTextConfig` from a transformers ``CLIPTextConfig`` as a dict (``config.to_dict()``
    or a ``config.json``). A key the file leaves out takes transformers' default, which is this
    dataclass's default. ``projection_dim``: the CLIPModel's shared size (default: the dict's own)."""
    kw = _config_kwargs(c, _TEXT_KEYS, projection_dim)
    # transformers' rule: the legacy eos_token_id == 2 means "argmax of the ids"
    eos = int(kw.get("eos_token_id", CLIPTextConfig.eos_token_id))
    return CLIPTextConfig(**kw, pooling="argmax" if eos == 2 else "eos")


def vision_config_from_transformers(c: Mapping[str, Any], projection_dim: int | None = None) -> CLIPVisionConfig:
    """Our :class:`CLIPVisionConfig` from a transformers ``CLIPVisionConfig`` as a dict (defaults as above)."""
    return CLIPVisionConfig(**_config_kwargs(c, _VISION_KEYS, projection_dim))


def _tower_from_config(model_class: type[nn.Module], config_from: Callable[[Mapping[str, Any]], Any], name: str
                       ) -> Callable[[Mapping[str, Any]], nn.Module]:
    """``name(c)``: an (untrained) ``model_class`` for a transformers config dict of the class of that name."""

    def from_config(c: Mapping[str, Any]) -> nn.Module:
        return model_class(config_from(c))

    from_config.__name__ = from_config.__qualname__ = name
    from_config.__doc__ = (f"An (untrained) :class:`{model_class.__name__}` for a transformers "
                           f"``{model_class.__name__}`` config dict.")
    return from_config


def _from_transformers(from_config: Callable[[Mapping[str, Any]], nn.Module], transformers_class: str
                       ) -> Callable[[nn.Module], nn.Module]:
    """The converter ``from_config`` minus ``_config``: transformers ``transformers_class`` -> our model
    (``from_config`` of its config) with the same weights, dtype, device and train/eval mode."""

    def convert(obj: nn.Module) -> nn.Module:
        ours = from_config(obj.config.to_dict())
        load_clip_state_dict(ours, obj.state_dict(), what=f"transformers {type(obj).__name__}")
        param = next(obj.parameters(), None)
        if param is not None:
            ours.to(dtype=param.dtype, device=param.device)
        return ours.train(obj.training)

    convert.__name__ = convert.__qualname__ = from_config.__name__.removesuffix("_config")
    convert.__doc__ = f"transformers ``{transformers_class}`` -> :class:`{transformers_class}` with the same weights."
    return convert


# transformers config dict -> our untrained model (interop.FROM_CONFIG), one per class
text_model_from_transformers_config = _tower_from_config(
    CLIPTextModel, text_config_from_transformers, "text_model_from_transformers_config")
text_model_with_projection_from_transformers_config = _tower_from_config(
    CLIPTextModelWithProjection, text_config_from_transformers, "text_model_with_projection_from_transformers_config")
vision_model_from_transformers_config = _tower_from_config(
    CLIPVisionModel, vision_config_from_transformers, "vision_model_from_transformers_config")
vision_model_with_projection_from_transformers_config = _tower_from_config(
    CLIPVisionModelWithProjection, vision_config_from_transformers,
    "vision_model_with_projection_from_transformers_config")


def clip_model_from_transformers_config(c: Mapping[str, Any]) -> CLIPModel:
    """An (untrained) :class:`CLIPModel` for a transformers ``CLIPModel`` config dict: both towers
    take the top-level ``projection_dim`` (default 512)."""
    P = c.get("projection_dim", 512)
    return CLIPModel(text_config_from_transformers(_sub_config(c, "text_config"), P),
                     vision_config_from_transformers(_sub_config(c, "vision_config"), P))


# a transformers object -> our model with its weights (interop.TRANSFORMERS), one per class
text_model_from_transformers = _from_transformers(text_model_from_transformers_config, "CLIPTextModel")
text_model_with_projection_from_transformers = _from_transformers(
    text_model_with_projection_from_transformers_config, "CLIPTextModelWithProjection")
vision_model_from_transformers = _from_transformers(vision_model_from_transformers_config, "CLIPVisionModel")
vision_model_with_projection_from_transformers = _from_transformers(
    vision_model_with_projection_from_transformers_config, "CLIPVisionModelWithProjection")
clip_model_from_transformers = _from_transformers(clip_model_from_transformers_config, "CLIPModel")
