"""The conditional UNet of Latent Diffusion / Stable Diffusion (Rombach et al. 2022, Sec. 3.3).
Chapter 04 defines it; chapters 06-09 plug into its seams.

``eps_theta(z_t, t, y)``: a UNet over latents ``z_t`` of shape ``(B, C, h, w)``, told the timestep
through a sinusoidal embedding and an MLP (added in every residual block), and told the condition
``y`` in one or both of two ways:

* cross-attention to a token sequence ``tau_theta(y)`` of shape ``(B, M, cross_attention_dim)``
  (text) in the spatial transformers of :mod:`.transformer`, placed after each residual block of
  the ``CrossAttn*`` blocks and in the middle;
* a class embedding added to the time embedding (``num_class_embeds``), for class-conditional
  models; a UNet with only ``DownBlock2D``/``UpBlock2D`` blocks and no cross-attention at all is
  the class-conditional model of the guidance chapter.

The seams later chapters use (all in :meth:`UNet2DCondition.forward`):

* ControlNet (ch. 07): ``down_block_additional_residuals`` are added to every skip connection, and
  ``mid_block_additional_residual`` to the middle block's output.
* T2I-Adapter (ch. 08): ``down_intrablock_additional_residuals`` are added inside the down blocks,
  one per block (diffusers' semantics, see :meth:`UNet2DCondition.forward`).
* IP-Adapter (ch. 09): the processors of the cross-attention layers (``attn2``) are swapped through
  :meth:`UNet2DCondition.set_cross_attention_processors`; ``cross_attention_kwargs`` reach them.
  With an adapter loaded (:func:`.ip_adapter.load_ip_adapter`), ``encoder_hid_proj`` projects
  ``added_cond_kwargs={"image_embeds": [...]}`` to image tokens, which reach the ``attn2`` processors
  as ``ip_hidden_states``. :meth:`UNet2DCondition.attention_layers` lists the attention layers in
  diffusers' order (down blocks, up blocks, then the middle block), the order adapter files count in.

The same class, through :class:`CondUNetConfig` options and the block factories of
:mod:`.unet_blocks` (no second UNet), is the pixel-space text-conditional UNet of GLIDE (Nichol et
al. 2021), unCLIP's decoder (Ramesh et al. 2022) and DeepFloyd IF (after Imagen, Saharia et al.
2022), chapters 11-13: residual blocks with scale-shift norm that also resample, attention layers
whose keys and values take the text tokens too, the text (or CLIP image) embedding added to the
timestep embedding, and an ``attention_mask`` over the text tokens.

Parameter names follow diffusers' ``UNet2DConditionModel`` so its checkpoints load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import Attention
from .embeddings import TextTimeEmbedding, TimestepEmbedding, Timesteps
from .resnet import ResnetBlock2D, activation, check_block_channels
from .transformer import Transformer2DModel, check_context
from .unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D, check_efficient_options, run_up_path

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "UNetMidBlock2DSimpleCrossAttn", None)
# the pixel text-conditional family (GLIDE, unCLIP's decoder, DeepFloyd IF): residual-block resampling
# and, in the SimpleCrossAttn blocks, attention whose keys/values also take the text tokens
_GLIDE_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "ResnetUpsampleBlock2D",
                 "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn")
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
ADDITION_EMBED_TYPES = (None, "text")
ENCODER_HID_DIM_TYPES = (None, "text_proj")


def _per_block(value: Any, n: int, name: str, one: tuple[type, ...] = (int,),
               item: Callable[[Any], Any] = int) -> tuple[Any, ...]:
    """A config value given once (an instance of ``one``) or per block: ``n`` values, each ``item(v)``."""
    if isinstance(value, one):
        return (value,) * n
    value = tuple(item(v) for v in value)
    if len(value) != n:
        raise ValueError(f"CondUNetConfig: {name} has {len(value)} entries but there are {n} blocks")
    return value


def _per_block_bool(value: bool | Sequence[bool], n: int, name: str) -> tuple[bool, ...]:
    return _per_block(value, n, name, (bool,), bool)


def _per_block_opt(value: int | None | Sequence[int | None], n: int, name: str) -> tuple[int | None, ...]:
    return _per_block(value, n, name, (int, type(None)), lambda v: None if v is None else int(v))


@dataclass
class CondUNetConfig:
    """The conditional UNet's shape (diffusers' ``UNet2DConditionModel`` fields, SD 1.5 defaults).

    ``num_attention_heads`` is the number of heads per block of the spatial transformers
    (``CrossAttn*`` blocks; what diffusers' configs, for historical reasons, call
    ``attention_head_dim``); each head has ``channels // heads`` dims. ``num_class_embeds`` adds
    ``class_embedding`` (an ``nn.Embedding``); for classifier-free guidance reserve one index as the
    null class.

    The pixel text-conditional family (GLIDE, Nichol et al. 2021; unCLIP's decoder, Ramesh et al.
    2022; DeepFloyd IF after Imagen, Saharia et al. 2022), chapters 11-13, with diffusers' names:

    * ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``: resampling by a residual block;
      ``SimpleCrossAttn*Block2D`` and ``UNetMidBlock2DSimpleCrossAttn`` add after each residual
      block an attention whose keys and values also take the text tokens
      (:class:`.attention.AttnAddedKVProcessor`), with ``attention_head_dim`` dims per head (here
      the name means what it says; as in diffusers, up block ``i`` uses entry ``i``, not reversed;
      ``None``: one head), ``only_cross_attention`` (per block; ``mid_block_only_cross_attention``,
      default: ``only_cross_attention`` when it is one bool) and ``cross_attention_norm``
      ("group_norm": 32 groups over the text channels, IF). ``resnet_skip_time_act`` and
      ``resnet_out_scale_factor`` apply to the residual blocks of these blocks only (diffusers).
    * ``resnet_time_scale_shift="scale_shift"``: AdaGN in every residual block (Dhariwal & Nichol
      2021); ``act_fn`` ("silu"/"gelu") everywhere; ``mid_block_scale_factor`` divides the middle's
      residual outputs.
    * the time embedding ``emb = MLP(sinusoid(t)) [+ class_embedding(class_labels)] [+
      add_embedding(text tokens)]``, then ``time_embedding_act_fn``; its width is
      ``time_embedding_dim`` (default 4 x ``block_out_channels[0]``). ``class_embed_type``:
      "timestep" (labels are numbers embedded like t), "identity" (labels are ``(B, time_embed_dim)``
      vectors: unCLIP's decoder gets the projected CLIP embeddings this way), "projection" (an MLP
      from ``projection_class_embeddings_input_dim``, e.g. GLIDE's final text token),
      "simple_projection" (one linear map); ``None`` with ``num_class_embeds``: an ``nn.Embedding``.
      ``addition_embed_type="text"``: the attention-pooled text tokens (Imagen/IF,
      :class:`.embeddings.TextTimeEmbedding`, ``addition_embed_type_num_heads`` heads).
    * ``encoder_hid_dim`` (``encoder_hid_dim_type="text_proj"``, the default when it is set): the
      text tokens come in with ``encoder_hid_dim`` channels and ``encoder_hid_proj`` maps them to
      ``cross_attention_dim`` (IF: T5's 4096); the addition embedding pools them before it.

    Imagen's Efficient U-Net (Saharia et al. 2022, App. B.1), chapter 13, as three options:

    * ``layers_per_block`` per level, e.g. ``(1, 2, 4)``: parameters moved from the high-resolution
      levels to the low ones ("more residual blocks at the lower resolutions"). diffusers takes the
      same tuple: down block ``i`` has ``layers_per_block[i]`` residual blocks, up block ``i``
      ``reversed(layers_per_block)[i] + 1``.
    * ``skip_scale``: every skip connection is multiplied by it before the up blocks concatenate it
      (the paper's ``1/sqrt(2)``; a ControlNet's residuals, added to the skips first, are scaled with
      them). Not ``resnet_out_scale_factor``, which divides the residual sum inside the GLIDE-family
      residual blocks.
    * ``downsample_first``: every down block (the last too) downsamples *before* its residual blocks,
      and every up block (the last too) upsamples after them, so level ``i`` runs at ``H / 2^(i+1)``:
      the full resolution keeps only ``conv_in`` and ``conv_out``, and the input must be divisible by
      ``2^len(block_out_channels)``. ``conv_in``'s output is then no skip; each down block's skips are
      its downsampler's output and its residual layers' (see :mod:`.unet_blocks`).

    ``skip_scale`` and ``downsample_first`` are this package's own options: diffusers'
    ``UNet2DConditionModel`` has no keys for them, so :func:`unet_config_from_diffusers` never sets
    them and :meth:`to_diffusers_config` refuses a config that uses them.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
    )
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int | None = 768
    num_attention_heads: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    num_class_embeds: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0
    # the pixel text-conditional family (GLIDE / unCLIP decoder / DeepFloyd IF)
    attention_head_dim: int | None | tuple[int | None, ...] = 64
    act_fn: str = "silu"
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    mid_block_scale_factor: float = 1.0
    only_cross_attention: bool | tuple[bool, ...] = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    class_embed_type: str | None = None
    projection_class_embeddings_input_dim: int | None = None
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    # Imagen's Efficient U-Net (App. B.1): our own options, no diffusers keys
    skip_scale: float = 1.0
    downsample_first: bool = False

    @classmethod
    def sd15(cls) -> CondUNetConfig:
        """Stable Diffusion 1.5's UNet (859,520,964 parameters): 64x64x4 latents, CLIP ViT-L/14 text."""
        return cls()

    @classmethod
    def tiny(cls, cross_attention_dim: int = 64, in_channels: int = 4, sample_size: int = 16) -> CondUNetConfig:
        """A small text-conditional UNet for the CPU chapters (about 1.3M parameters at the defaults)."""
        return cls(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1, cross_attention_dim=cross_attention_dim, num_attention_heads=4,
            norm_num_groups=8,
        )

    @classmethod
    def class_conditional(
        cls, num_classes: int, in_channels: int = 1, sample_size: int = 16,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
    ) -> CondUNetConfig:
        """A class-conditional UNet with no cross-attention: residual blocks only, and
        ``num_classes + 1`` class embeddings (index ``num_classes`` is the null class of CFG)."""
        n = len(block_out_channels)
        return cls(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
            mid_block_type="UNetMidBlock2D", layers_per_block=2, cross_attention_dim=None,
            norm_num_groups=8, num_class_embeds=num_classes + 1,
        )

    @classmethod
    def if_stage1_xl(cls) -> CondUNetConfig:
        """DeepFloyd IF stage I XL (DeepFloyd/IF-I-XL-v1.0, 4,304,695,110 parameters): 64x64 pixels,
        T5-XXL tokens (4096) projected to 2816 and pooled into the time embedding, attention at 32, 16
        and 8 (64-dim heads, group-normed text), GELU, AdaGN, 6 output channels (eps and the learned
        variance). The options are those diffusers' conversion script (``scripts/convert_if.py``,
        stage I) writes; ``time_embedding_act_fn``/``resnet_skip_time_act`` are its stage II options
        and change no parameter count."""
        return cls(
            sample_size=64, in_channels=3, out_channels=6, block_out_channels=(704, 1408, 2112, 2816),
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=3, cross_attention_dim=2816,
            attention_head_dim=64, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text",
            addition_embed_type_num_heads=64, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
            act_fn="gelu",
        )

    @classmethod
    def karlo_decoder(cls) -> CondUNetConfig:
        """The unCLIP decoder of kakaobrain/karlo-v1-alpha (subfolder ``decoder``): 64x64 pixels, the
        CLIP text tokens and image embedding through :class:`~.unclip.UnCLIPTextProjModel` (1536-wide
        tokens, the time-embedding addition as ``class_labels``)."""
        return cls(
            sample_size=64, in_channels=3, out_channels=6, block_out_channels=(320, 640, 960, 1280),
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=3, cross_attention_dim=1536,
            attention_head_dim=64, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
        )

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.down_block_types, self.up_block_types = tuple(self.down_block_types), tuple(self.up_block_types)
        if n < 1:
            raise ValueError("CondUNetConfig: block_out_channels needs at least one entry")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"CondUNetConfig: {n} block_out_channels but {len(self.down_block_types)} down_block_types "
                f"and {len(self.up_block_types)} up_block_types"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"CondUNetConfig: unknown down block {t!r}; expected one of {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"CondUNetConfig: unknown up block {t!r}; expected one of {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(
                f"CondUNetConfig: unknown mid block {self.mid_block_type!r}; expected one of {MID_BLOCK_TYPES}"
            )
        uses_cross = self.uses_transformers
        if (uses_cross or self.uses_added_kv) and self.cross_attention_dim is None:
            raise ValueError("CondUNetConfig: cross-attention blocks need cross_attention_dim")
        self._check_pixel_family(n)
        for name in ("in_channels", "out_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"CondUNetConfig: {name} must be positive, got {getattr(self, name)}")
        check_block_channels("CondUNetConfig", self.block_out_channels, self.norm_num_groups)
        heads = _per_block(self.num_attention_heads, n, "num_attention_heads")
        if uses_cross and min(heads) < 1:
            raise ValueError(f"CondUNetConfig: num_attention_heads must be positive, got {self.num_attention_heads}")
        for c, h in zip(self.block_out_channels, heads):
            if uses_cross and c % h:
                raise ValueError(f"CondUNetConfig: {c} channels are not divisible into {h} attention heads")
        if min(_per_block(self.layers_per_block, n, "layers_per_block")) < 1:
            raise ValueError(f"CondUNetConfig: layers_per_block must all be positive, got {self.layers_per_block}")
        _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        check_efficient_options("CondUNetConfig", self.skip_scale, self.downsample_first)

    def _check_pixel_family(self, n: int) -> None:
        """The options of the GLIDE / unCLIP / IF family: each a ValueError naming the field."""
        from .resnet import ACTIVATIONS, TIME_EMBEDDING_NORMS

        for name, value, allowed in (
            ("act_fn", self.act_fn, tuple(ACTIVATIONS)),
            ("time_embedding_act_fn", self.time_embedding_act_fn, (None, *ACTIVATIONS)),
            ("resnet_time_scale_shift", self.resnet_time_scale_shift, TIME_EMBEDDING_NORMS),
            ("cross_attention_norm", self.cross_attention_norm, (None, "group_norm", "layer_norm")),
            ("class_embed_type", self.class_embed_type, CLASS_EMBED_TYPES),
            ("addition_embed_type", self.addition_embed_type, ADDITION_EMBED_TYPES),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type, ENCODER_HID_DIM_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"CondUNetConfig: {name}={value!r} is not supported; expected one of {allowed}")
        if self.encoder_hid_dim is not None and self.encoder_hid_dim_type is None:
            self.encoder_hid_dim_type = "text_proj"  # diffusers' default
        if self.encoder_hid_dim_type is not None and self.encoder_hid_dim is None:
            raise ValueError(f"CondUNetConfig: encoder_hid_dim_type={self.encoder_hid_dim_type!r} needs encoder_hid_dim")
        if self.encoder_hid_dim is not None and self.cross_attention_dim is None:
            raise ValueError("CondUNetConfig: encoder_hid_dim (text_proj) needs cross_attention_dim")
        if self.class_embed_type in ("projection", "simple_projection") and not self.projection_class_embeddings_input_dim:
            raise ValueError(f"CondUNetConfig: class_embed_type={self.class_embed_type!r} needs "
                             "projection_class_embeddings_input_dim")
        if self.class_embed_type is not None and self.num_class_embeds is not None:
            raise ValueError(f"CondUNetConfig: class_embed_type={self.class_embed_type!r} and num_class_embeds="
                             f"{self.num_class_embeds} are two class embeddings; give one")
        if self.addition_embed_type == "text":
            width = self.context_dim
            if width is None:
                raise ValueError("CondUNetConfig: addition_embed_type='text' needs cross_attention_dim (or encoder_hid_dim)")
            if width % self.addition_embed_type_num_heads:
                raise ValueError(f"CondUNetConfig: the text width {width} is not divisible into "
                                 f"addition_embed_type_num_heads={self.addition_embed_type_num_heads} heads")
        only = _per_block_bool(self.only_cross_attention, n, "only_cross_attention")
        head_dims = _per_block_opt(self.attention_head_dim, n, "attention_head_dim")
        rev = self.block_out_channels[::-1]
        for where, kinds, channels in (("down", self.down_block_types, self.block_out_channels),
                                       ("up", self.up_block_types, rev)):
            for i, kind in enumerate(kinds):
                if not kind.startswith("SimpleCrossAttn"):
                    continue
                d = head_dims[i] or channels[i]  # diffusers: up block i takes attention_head_dim[i]
                if d < 1 or channels[i] % d:
                    raise ValueError(f"CondUNetConfig: {where} block {i} ({kind}) has {channels[i]} channels, not "
                                     f"divisible into heads of attention_head_dim={d}")
        if self.mid_block_type == "UNetMidBlock2DSimpleCrossAttn":
            d = head_dims[-1] or self.block_out_channels[-1]
            if d < 1 or self.block_out_channels[-1] % d:
                raise ValueError(f"CondUNetConfig: the middle block has {self.block_out_channels[-1]} channels, not "
                                 f"divisible into heads of attention_head_dim={d}")
        for where, kinds, flags in (("down", self.down_block_types, only), ("up", self.up_block_types, only[::-1])):
            for i, (kind, flag) in enumerate(zip(kinds, flags)):
                if flag and kind.startswith("CrossAttn"):
                    raise ValueError(f"CondUNetConfig: only_cross_attention in {where} block {i} ({kind}) is not "
                                     "supported (only in the SimpleCrossAttn blocks)")
        if self.time_embedding_dim is not None and self.time_embedding_dim < 1:
            raise ValueError(f"CondUNetConfig: time_embedding_dim must be positive, got {self.time_embedding_dim}")

    @property
    def uses_transformers(self) -> bool:
        """Whether any block has spatial transformers (``CrossAttn*``, ``UNetMidBlock2DCrossAttn``)."""
        return (any(t.startswith("CrossAttn") for t in self.down_block_types + self.up_block_types)
                or self.mid_block_type == "UNetMidBlock2DCrossAttn")

    @property
    def uses_added_kv(self) -> bool:
        """Whether any block has GLIDE's added-K/V attention (``SimpleCrossAttn*``)."""
        return (any(t.startswith("SimpleCrossAttn") for t in self.down_block_types + self.up_block_types)
                or self.mid_block_type == "UNetMidBlock2DSimpleCrossAttn")

    @property
    def context_dim(self) -> int | None:
        """The width of the ``encoder_hidden_states`` the UNet takes: ``encoder_hid_dim`` when a
        text projection maps them to ``cross_attention_dim``, else ``cross_attention_dim``."""
        return self.encoder_hid_dim if self.encoder_hid_dim_type == "text_proj" else self.cross_attention_dim

    @property
    def mid_only_cross_attention(self) -> bool:
        if self.mid_block_only_cross_attention is not None:
            return bool(self.mid_block_only_cross_attention)
        return self.only_cross_attention if isinstance(self.only_cross_attention, bool) else False

    def to_diffusers_config(self) -> dict[str, Any]:
        """The keyword arguments of the equivalent diffusers ``UNet2DConditionModel``; a ValueError
        for the Efficient U-Net's ``skip_scale`` / ``downsample_first`` (diffusers has no such keys)."""
        n = len(self.block_out_channels)
        for name in ("skip_scale", "downsample_first"):
            if getattr(self, name) != CondUNetConfig.__dataclass_fields__[name].default:
                raise ValueError(f"CondUNetConfig.to_diffusers_config: {name}={getattr(self, name)!r} has no "
                                 "diffusers equivalent (UNet2DConditionModel has no such option)")
        d = dict(
            sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.out_channels,
            block_out_channels=self.block_out_channels, down_block_types=self.down_block_types,
            up_block_types=self.up_block_types, mid_block_type=self.mid_block_type,
            layers_per_block=_per_block(self.layers_per_block, n, "layers_per_block"),
            transformer_layers_per_block=_per_block(self.transformer_layers_per_block, n, "transformer_layers"),
            attention_head_dim=_per_block(self.num_attention_heads, n, "num_attention_heads"),  # sic: heads
            use_linear_projection=self.use_linear_projection, norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps, num_class_embeds=self.num_class_embeds, flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift, dropout=self.dropout,
        )
        if self.cross_attention_dim is not None:
            d["cross_attention_dim"] = self.cross_attention_dim
        if self.uses_added_kv:
            head_dims = _per_block_opt(self.attention_head_dim, n, "attention_head_dim")
            if self.uses_transformers and head_dims != d["attention_head_dim"]:
                raise ValueError("CondUNetConfig.to_diffusers_config: diffusers has one attention_head_dim key for "
                                 f"both the transformers' head count {d['attention_head_dim']} and the SimpleCrossAttn "
                                 f"head width {head_dims}")
            d["attention_head_dim"] = head_dims
        for name in ("act_fn", "resnet_time_scale_shift", "resnet_skip_time_act", "resnet_out_scale_factor",
                     "mid_block_scale_factor", "only_cross_attention", "mid_block_only_cross_attention",
                     "cross_attention_norm", "class_embed_type", "projection_class_embeddings_input_dim",
                     "addition_embed_type", "addition_embed_type_num_heads", "encoder_hid_dim", "encoder_hid_dim_type",
                     "time_embedding_dim", "time_embedding_act_fn"):
            value = getattr(self, name)
            if value != CondUNetConfig.__dataclass_fields__[name].default:
                d[name] = value
        return d

    @property
    def has_cross_attention(self) -> bool:
        return self.cross_attention_dim is not None

    @property
    def downsampling_factor(self) -> int:
        """H and W must be multiples of this: ``2^(levels - 1)``, ``2^levels`` with ``downsample_first``
        (every down block halves the resolution)."""
        return 2 ** (len(self.block_out_channels) - (not self.downsample_first))

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


# ---------------------------------------------------------------------------------------------
# The blocks come from the one family of :mod:`.unet_blocks`; here only what this UNet gives them.
# ---------------------------------------------------------------------------------------------


def _block_parts(cfg: CondUNetConfig):
    """The residual-block factory and, per level, the spatial-transformer factory of ``cfg``."""
    n = len(cfg.block_out_channels)
    heads = _per_block(cfg.num_attention_heads, n, "num_attention_heads")
    tlayers = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
    resnet = _resnet_factory(cfg, glide=False)

    def transformer(level: int):
        def make(channels: int) -> Transformer2DModel:
            return Transformer2DModel(heads[level], channels // heads[level], channels, num_layers=tlayers[level],
                                      cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
                                      use_linear_projection=cfg.use_linear_projection)
        return make

    return resnet, transformer


def _resnet_factory(cfg: CondUNetConfig, glide: bool):
    """``resnet(in, out, scale=None, down=False, up=False)``. Every residual block takes
    ``act_fn`` and ``resnet_time_scale_shift``; those of the GLIDE-family blocks (``Resnet*``,
    ``SimpleCrossAttn*``) also ``resnet_skip_time_act`` and, as their default scale,
    ``resnet_out_scale_factor`` (diffusers passes these to those blocks only)."""
    temb = cfg.time_embed_dim
    default_scale = cfg.resnet_out_scale_factor if glide else 1.0
    skip_time_act = cfg.resnet_skip_time_act if glide else False

    def resnet(in_ch: int, out_ch: int, scale: float | None = None, **resample: bool) -> ResnetBlock2D:
        return ResnetBlock2D(in_ch, out_ch, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                             time_embedding_norm=cfg.resnet_time_scale_shift, act_fn=cfg.act_fn,
                             skip_time_act=skip_time_act,
                             output_scale_factor=default_scale if scale is None else scale, **resample)
    return resnet


def _added_kv_attention(cfg: CondUNetConfig, head_dim: int | None, only_cross: bool):
    """The attention of the ``SimpleCrossAttn`` blocks (GLIDE): pixel tokens after a GroupNorm,
    ``channels // head_dim`` heads, keys/values also from the text tokens (``add_k_proj``,
    ``add_v_proj`` from ``cross_attention_dim``), a residual around it."""
    def make(channels: int) -> Attention:
        d = head_dim or channels
        return Attention(channels, heads=channels // d, dim_head=d, bias=True, norm_num_groups=cfg.norm_num_groups,
                         residual_connection=True, added_kv_proj_dim=cfg.cross_attention_dim,
                         only_cross_attention=only_cross, cross_attention_norm=cfg.cross_attention_norm)
    return make


def build_down_blocks(cfg: CondUNetConfig) -> nn.ModuleList:
    """The encoder's levels (``CrossAttnDownBlock2D`` = a down block with a spatial transformer
    after each residual block; ``SimpleCrossAttnDownBlock2D`` = one with GLIDE's added-K/V attention
    and a residual-block downsampler; ``ResnetDownsampleBlock2D`` = the latter without attention);
    shared by :class:`UNet2DCondition` and the ControlNet."""
    n, ch = len(cfg.block_out_channels), cfg.block_out_channels
    layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
    head_dims = _per_block_opt(cfg.attention_head_dim, n, "attention_head_dim")
    only = _per_block_bool(cfg.only_cross_attention, n, "only_cross_attention")
    resnet, transformer = _block_parts(cfg)
    glide_resnet = _resnet_factory(cfg, glide=True)
    blocks = []
    for i, kind in enumerate(cfg.down_block_types):
        glide = kind in _GLIDE_BLOCKS
        if kind == "CrossAttnDownBlock2D":
            attention = transformer(i)
        elif kind == "SimpleCrossAttnDownBlock2D":
            attention = _added_kv_attention(cfg, head_dims[i], only[i])
        else:
            attention = None
        # Efficient U-Net (App. B.1): with downsample_first every block (the last too) halves first
        blocks.append(DownBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=layers[i], resnet=glide_resnet if glide else resnet,
                                  attention=attention, cross_attention=True,
                                  add_downsample=i < n - 1 or cfg.downsample_first, downsample_padding=1,
                                  resnet_resample=glide, downsample_first=cfg.downsample_first))
    return nn.ModuleList(blocks)


def build_mid_block(cfg: CondUNetConfig) -> UNetMidBlock2D | None:
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet; ``UNetMidBlock2DSimpleCrossAttn``:
    resnet, added-K/V attention, resnet; ``UNetMidBlock2D``: one resnet. The residual blocks divide
    by ``mid_block_scale_factor``."""
    if cfg.mid_block_type is None:
        return None
    resnet, transformer = _block_parts(cfg)
    n, scale = len(cfg.block_out_channels), cfg.mid_block_scale_factor
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
        return UNetMidBlock2D(cfg.block_out_channels[-1], num_layers=1, resnet=resnet, attention=transformer(n - 1),
                              cross_attention=True, scale=scale)
    if cfg.mid_block_type == "UNetMidBlock2DSimpleCrossAttn":
        head_dim = _per_block_opt(cfg.attention_head_dim, n, "attention_head_dim")[-1]
        return UNetMidBlock2D(cfg.block_out_channels[-1], num_layers=1, resnet=_resnet_factory(cfg, glide=True),
                              attention=_added_kv_attention(cfg, head_dim, cfg.mid_only_cross_attention),
                              cross_attention=True, scale=scale)
    return UNetMidBlock2D(cfg.block_out_channels[-1], num_layers=0, resnet=resnet, scale=scale)


def build_up_blocks(cfg: CondUNetConfig) -> nn.ModuleList:
    n, ch = len(cfg.block_out_channels), cfg.block_out_channels
    layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
    head_dims = _per_block_opt(cfg.attention_head_dim, n, "attention_head_dim")
    only = _per_block_bool(cfg.only_cross_attention, n, "only_cross_attention")[::-1]
    resnet, transformer = _block_parts(cfg)
    glide_resnet = _resnet_factory(cfg, glide=True)
    rev, rlayers = ch[::-1], layers[::-1]
    blocks = []
    for i, kind in enumerate(cfg.up_block_types):
        glide = kind in _GLIDE_BLOCKS
        if kind == "CrossAttnUpBlock2D":
            attention = transformer(n - 1 - i)
        elif kind == "SimpleCrossAttnUpBlock2D":
            # diffusers gives up block i attention_head_dim[i] (not reversed, unlike the other lists)
            attention = _added_kv_attention(cfg, head_dims[i], only[i])
        else:
            attention = None
        # the last skip's width: the matching down block's input; with downsample_first every skip of
        # down block n-1-i (its downsampler's and residual layers' outputs) has that block's width
        skip_in = rev[i] if cfg.downsample_first else rev[min(i + 1, n - 1)]
        blocks.append(UpBlock2D(skip_in, rev[max(i - 1, 0)], rev[i], num_layers=rlayers[i] + 1,
                                resnet=glide_resnet if glide else resnet, attention=attention, cross_attention=True,
                                add_upsample=i < n - 1 or cfg.downsample_first, resnet_resample=glide,
                                skip_scale=cfg.skip_scale))
    return nn.ModuleList(blocks)


def _class_embedding(cfg: CondUNetConfig) -> nn.Module | None:
    """``class_embedding`` as diffusers builds it: an ``nn.Embedding`` (``num_class_embeds``), the
    time MLP on sinusoidal labels ("timestep"), nothing to learn ("identity", the labels are already
    ``(B, time_embed_dim)``), an MLP ("projection") or one linear map ("simple_projection") from
    ``projection_class_embeddings_input_dim``."""
    d, kind = cfg.time_embed_dim, cfg.class_embed_type
    if kind is None:
        return nn.Embedding(cfg.num_class_embeds, d) if cfg.num_class_embeds else None
    if kind == "timestep":
        return TimestepEmbedding(cfg.block_out_channels[0], d, act_fn=cfg.act_fn)
    if kind == "identity":
        return nn.Identity()
    if kind == "projection":  # diffusers builds this MLP with SiLU whatever act_fn is
        return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, d)
    return nn.Linear(cfg.projection_class_embeddings_input_dim, d)


class UNetEncoder(nn.Module):
    """The encoder half of the conditional UNet: ``conv_in``, the time (and class) embedding, the down
    blocks and the middle block, with diffusers' names. :class:`UNet2DCondition` adds the decoder;
    :class:`~.controlnet.ControlNet` adds zero convolutions and a condition embedding to a trainable
    copy of it (``ControlNet.from_unet`` copies exactly these weights)."""

    def __init__(self, config: CondUNetConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else CondUNetConfig()
        ch0 = cfg.block_out_channels[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        # t -> sinusoidal features (B, ch[0]) -> MLP (B, 4 ch[0])
        self.time_proj = Timesteps(ch0, cfg.flip_sin_to_cos, cfg.freq_shift)
        d = cfg.time_embed_dim
        self.time_embedding = TimestepEmbedding(ch0, d, act_fn=cfg.act_fn)
        self.class_embedding = _class_embedding(cfg)
        if cfg.encoder_hid_dim_type == "text_proj":
            # IF: the T5 tokens (B, M, encoder_hid_dim) -> (B, M, cross_attention_dim)
            self.encoder_hid_proj: nn.Module | None = nn.Linear(cfg.encoder_hid_dim, cfg.cross_attention_dim)
        if cfg.addition_embed_type == "text":
            # Imagen/IF: the attention-pooled text tokens, added to the time embedding
            self.add_embedding = TextTimeEmbedding(cfg.context_dim, d, num_heads=cfg.addition_embed_type_num_heads)
        else:
            self.add_embedding = None
        self.time_embed_act = None if cfg.time_embedding_act_fn is None else activation(cfg.time_embedding_act_fn)
        self.down_blocks = build_down_blocks(cfg)
        self.mid_block = build_mid_block(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def skip_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The shapes of the skip connections for an input ``(batch, in_channels, height, width)``, in
        order: ``conv_in``'s output, then each down block's residual layers and downsampler (with
        ``downsample_first``: no ``conv_in``, and each block's downsampler before its layers)."""
        if self.config.downsample_first:
            shapes = []
            for block in self.down_blocks:
                height, width = (height + 1) // 2, (width + 1) // 2
                shapes += [(batch, block.out_channels, height, width)] * (len(block.resnets) + 1)
            return shapes
        h, w, shapes = height, width, [(batch, self.config.block_out_channels[0], height, width)]
        for block in self.down_blocks:
            c = block.out_channels
            shapes += [(batch, c, h, w)] * len(block.resnets)
            if block.downsamplers is not None:
                h, w = (h + 1) // 2, (w + 1) // 2
                shapes.append((batch, c, h, w))
        return shapes

    def adapter_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Where each ``down_intrablock_additional_residuals`` entry is added, for an input of this
        size: one shape per down block (at the block's resolution before downsampling if it has
        attention, after it otherwise)."""
        h, w, shapes = height, width, []
        for block in self.down_blocks:
            down = block.downsamplers is not None
            if block.downsample_first:  # the feature lands after the residual blocks, at H/2
                h, w = (h + 1) // 2, (w + 1) // 2
                shapes.append((batch, block.out_channels, h, w))
                continue
            if block.attentions is None and down:
                shapes.append((batch, block.out_channels, (h + 1) // 2, (w + 1) // 2))
            else:
                shapes.append((batch, block.out_channels, h, w))
            if down:
                h, w = (h + 1) // 2, (w + 1) // 2
        return shapes

    # -- checks -----------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                      class_labels: torch.Tensor | None) -> None:
        cfg, who = self.config, type(self).__name__
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{who} expects x of shape (B, {cfg.in_channels}, H, W), got {shape}")
        f = cfg.downsampling_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"{who}: input size {tuple(x.shape[2:])} is not divisible by {f} (2^(number of blocks - 1))"
            )
        if cfg.has_cross_attention:
            check_context(encoder_hidden_states, x.shape[0], cfg.context_dim, who)
        elif encoder_hidden_states is not None:
            raise ValueError(f"{who} has no cross-attention (cross_attention_dim=None) but got encoder_hidden_states")
        if cfg.class_embed_type is not None:
            self._check_class_vectors(x, class_labels)
        elif self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"{who} is class-conditional (num_class_embeds={cfg.num_class_embeds}) "
                                 "and needs class_labels of shape (B,)")
            if class_labels.shape != (x.shape[0],):
                raise ValueError(f"{who}: class_labels must have shape ({x.shape[0]},), got {tuple(class_labels.shape)}")
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
                raise ValueError(f"{who}: class_labels must be integers, got dtype {class_labels.dtype}")
            if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= cfg.num_class_embeds):
                raise ValueError(f"{who}: class_labels must lie in 0..{cfg.num_class_embeds - 1}, got values in "
                                 f"{int(class_labels.min())}..{int(class_labels.max())}")
        elif class_labels is not None:
            raise ValueError(f"{who} has no class embedding (num_class_embeds=None) but got class_labels")

    def _check_class_vectors(self, x: torch.Tensor, class_labels: torch.Tensor | None) -> None:
        """``class_labels`` for ``class_embed_type``: ``(B,)`` numbers ("timestep", e.g. a noise level),
        ``(B, time_embed_dim)`` ("identity": unCLIP's time-embedding addition) or ``(B,
        projection_class_embeddings_input_dim)`` ("projection", "simple_projection")."""
        cfg, who, b = self.config, type(self).__name__, x.shape[0]
        kind = cfg.class_embed_type
        want = ((b,) if kind == "timestep" else
                (b, cfg.time_embed_dim) if kind == "identity" else (b, cfg.projection_class_embeddings_input_dim))
        if class_labels is None:
            raise ValueError(f"{who} has class_embed_type={kind!r} and needs class_labels of shape {want}")
        if not isinstance(class_labels, torch.Tensor) or tuple(class_labels.shape) != want:
            got = tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
            raise ValueError(f"{who}: class_embed_type={kind!r} needs class_labels of shape {want}, got {got}")
        if kind != "timestep" and not class_labels.dtype.is_floating_point:
            raise ValueError(f"{who}: class_embed_type={kind!r} needs float class_labels (vectors), "
                             f"got dtype {class_labels.dtype}")

    def time_embed(self, x: torch.Tensor, t: torch.Tensor | float | int,
                   class_labels: torch.Tensor | None = None,
                   encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, time_embed_dim)``: ``act(MLP(sinusoid(t)) [+ class_embedding(class_labels)] [+
        add_embedding(encoder_hidden_states)])``; the addition embedding (IF) pools the text tokens
        as given, before ``encoder_hid_proj``, and ``act`` is ``time_embedding_act_fn`` (or none)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            t = t.reshape(()).expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"{type(self).__name__}: t must be a scalar or of shape ({x.shape[0]},), "
                             f"got {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{type(self).__name__}: t must be integer or float timesteps, got dtype {t.dtype}")
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.class_embedding is not None:
            if self.config.class_embed_type == "timestep":  # numbers (e.g. a noise level) embedded like t
                class_labels = self.time_proj(class_labels).to(self.dtype)
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        if self.add_embedding is not None:
            if encoder_hidden_states is None:
                raise ValueError(f"{type(self).__name__} has addition_embed_type='text' and needs encoder_hidden_states")
            emb = emb + self.add_embedding(encoder_hidden_states).to(emb.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def project_context(self, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor | None:
        """The text tokens every attention takes: ``encoder_hid_proj`` applied when the config has a
        text projection (``encoder_hid_dim_type="text_proj"``, IF), else as given."""
        if encoder_hidden_states is not None and self.config.encoder_hid_dim_type == "text_proj":
            return self.encoder_hid_proj(encoder_hidden_states)
        return encoder_hidden_states

    def text_mask(self, attention_mask: torch.Tensor | None, encoder_attention_mask: torch.Tensor | None,
                  encoder_hidden_states: torch.Tensor | None) -> torch.Tensor | None:
        """A mask over the text tokens, ``(B, M)`` with 1/True = attend and 0/False = padding, as the
        boolean ``(B, 1, 1, M)`` the added-K/V attentions take. diffusers' rule: ``attention_mask``
        (what its unCLIP pipeline passes) if given, else ``encoder_attention_mask``."""
        mask = attention_mask if attention_mask is not None else encoder_attention_mask
        if mask is None:
            return None
        cfg, who = self.config, type(self).__name__
        name = "attention_mask" if attention_mask is not None else "encoder_attention_mask"
        if not cfg.uses_added_kv:
            raise ValueError(f"{who}: {name} (a mask over the text tokens) is supported in the SimpleCrossAttn blocks' "
                             "attention only, and this UNet has none")
        if cfg.uses_transformers:
            raise ValueError(f"{who}: {name} is not supported in a UNet with spatial transformers (CrossAttn* "
                             "blocks); diffusers passes attention_mask to their self-attention")
        b, m = encoder_hidden_states.shape[:2]
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, m):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{who}: {name} must be (B, M) = {(b, m)} over the text tokens, got {got}")
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{who}: {name} must hold 1 (attend) and 0 (padding), or be boolean")
            mask = mask != 0
        return mask[:, None, None, :]

    def encode(self, h: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               cross_attention_kwargs: dict[str, Any] | None = None,
               down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path and the middle from ``h = conv_in(x)`` (plus whatever the caller added to
        it): returns the middle block's output and the skips (``h`` first). T2I-Adapter features
        are consumed one per down block; one left over with the middle's shape is added there."""
        intra = list(down_intrablock_additional_residuals or [])
        if intra:
            self._check_adapter_features(intra, h)
        # with downsample_first no residual block runs at conv_in's resolution: its output is no skip
        skips = [] if self.config.downsample_first else [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states, cross_attention_kwargs,
                                   additional_residual=intra.pop(0) if intra else None)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states, cross_attention_kwargs)
        if intra:
            h = h + intra.pop(0)
        return h, skips

    def _check_adapter_features(self, feats: list[torch.Tensor], h: torch.Tensor) -> None:
        who = type(self).__name__
        want = self.adapter_shapes(h.shape[0], h.shape[2], h.shape[3])
        mid = (h.shape[0], self.down_blocks[-1].out_channels, *want[-1][2:]) if self.mid_block is not None else None
        last = self.down_blocks[-1]
        if self.mid_block is not None and last.downsamplers is not None and not last.downsample_first:
            mid = None  # the middle's resolution is below the last block's: never the adapter's
        if len(feats) > len(want) + (mid is not None):
            raise ValueError(f"{who}: got {len(feats)} down_intrablock_additional_residuals (T2I-Adapter features); "
                             f"the UNet takes at most {len(want) + (mid is not None)}: one per down block "
                             f"{[s[1:] for s in want]}" + (f" and one for the middle {mid[1:]}" if mid else ""))
        for i, f in enumerate(feats):
            shape = want[i] if i < len(want) else mid
            if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(shape):
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                where = f"down block {i}" if i < len(want) else "the middle block"
                raise ValueError(f"{who}: down_intrablock_additional_residuals[{i}] (T2I-Adapter feature) has shape "
                                 f"{got}; {where} needs {tuple(shape)}: the adapter's channels/downscaling do not "
                                 "match this UNet")


class UNet2DCondition(UNetEncoder):
    """``eps_theta(x_t, t, y)``: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.

    H and W must be divisible by ``2^(len(block_out_channels) - 1)``. The encoder half (conv_in, the
    embeddings, down and middle blocks) is :class:`UNetEncoder`; this class adds the decoder.
    """

    def __init__(self, config: CondUNetConfig | None = None):
        super().__init__(config)
        cfg = self.config
        self.up_blocks = build_up_blocks(cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, cfg.block_out_channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, padding=1)
        # the loaded IP-Adapters' image projections (a MultiIPAdapterImageProjection), or None; with
        # encoder_hid_dim (IF) it is the text projection instead (no IP-Adapter then)
        self.encoder_hid_proj: nn.Module | None
        if cfg.encoder_hid_dim_type is None:
            self.register_module("encoder_hid_proj", None)
        self.conv_act = activation(cfg.act_fn)

    # -- the IP-Adapter seam --------------------------------------------------------------------
    def attention_layers(self) -> Iterator[tuple[str, Attention]]:
        """Every attention layer of the UNet (``attn1`` and ``attn2`` of each transformer block, in
        turn) with its diffusers name, in diffusers' order: the down blocks, the UP blocks, then the
        middle block (diffusers registers ``up_blocks`` before ``mid_block``; its ``attn_processors``
        and the IP-Adapter files count in this order). The forward pass visits the middle block
        before the up blocks. Attention inside ``encoder_hid_proj`` (a Resampler) is not listed."""
        for prefix in ("down_blocks", "up_blocks", "mid_block"):
            part = getattr(self, prefix)
            if part is None:
                continue
            for name, module in part.named_modules(prefix=prefix):
                if isinstance(module, Attention):
                    yield name, module

    def attention_processors(self) -> dict[str, Callable[..., torch.Tensor]]:
        """``{"<layer name>.processor": processor}`` in :meth:`attention_layers` order (diffusers'
        ``attn_processors``)."""
        return {f"{name}.processor": attn.processor for name, attn in self.attention_layers()}

    def cross_attentions(self) -> Iterator[tuple[str, Attention]]:
        """The cross-attention layers (``attn2``) with their diffusers names, in diffusers' order
        (:meth:`attention_layers`: ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``, ...,
        ``"up_blocks..."``, then ``"mid_block..."``)."""
        for name, module in self.attention_layers():
            if name.endswith(".attn2"):
                yield name, module

    @property
    def num_ip_adapters(self) -> int:
        """How many IP-Adapters are loaded (0: none)."""
        proj = self._ip_projection()
        return 0 if proj is None else len(proj.image_projection_layers)

    def _ip_projection(self) -> nn.Module | None:
        return None if self.config.encoder_hid_dim_type is not None else self.encoder_hid_proj

    def _image_tokens(self, batch: int, added_cond_kwargs: Mapping[str, Any] | None,
                      cross_attention_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        """``cross_attention_kwargs`` plus ``ip_hidden_states``, the loaded IP-Adapters' image tokens
        projected from ``added_cond_kwargs["image_embeds"]``."""
        who = type(self).__name__
        added = dict(added_cond_kwargs or {})
        extra = sorted(k for k in added if k != "image_embeds")
        if extra:
            raise ValueError(f"{who}: added_cond_kwargs {extra} are not used by this UNet (it has no addition "
                             "embedding, e.g. SDXL's text_embeds/time_ids); it takes only 'image_embeds' (IP-Adapter)")
        embeds = added.get("image_embeds")
        proj = self._ip_projection()
        if proj is None:
            if embeds is not None:
                raise ValueError(f"{who} got added_cond_kwargs['image_embeds'] but has no IP-Adapter loaded "
                                 "(interop.load_ip_adapter)")
            return cross_attention_kwargs
        kwargs = dict(cross_attention_kwargs or {})
        if embeds is None:
            if "ip_hidden_states" in kwargs:  # image tokens given directly
                return kwargs
            raise ValueError(f"{who} has {self.num_ip_adapters} IP-Adapter(s) loaded and needs "
                             "added_cond_kwargs={'image_embeds': [...]}, one image embedding tensor per adapter "
                             "(set_ip_adapter_scale(unet, 0) weighs them out; unload_ip_adapter removes them)")
        if "ip_hidden_states" in kwargs:
            raise ValueError(f"{who}: got both added_cond_kwargs['image_embeds'] and "
                             "cross_attention_kwargs['ip_hidden_states']; give one")
        proj.check(embeds, batch, who)
        kwargs["ip_hidden_states"] = proj(embeds)
        return kwargs

    def set_cross_attention_processors(
        self, processors: Callable[..., torch.Tensor] | Mapping[str, Callable[..., torch.Tensor]]
    ) -> None:
        """Install a processor in every ``attn2`` (one callable), or per layer (a dict keyed by the
        names of :meth:`cross_attentions`, with or without diffusers' ``".processor"`` suffix; it
        must name every layer)."""
        layers = dict(self.cross_attentions())
        if isinstance(processors, Mapping):
            procs = {k.removesuffix(".processor"): v for k, v in processors.items()}
            missing, unknown = set(layers) - set(procs), set(procs) - set(layers)
            if missing or unknown:
                raise ValueError(
                    f"set_cross_attention_processors: missing {sorted(missing)[:5]}, unknown {sorted(unknown)[:5]} "
                    f"(there are {len(layers)} attn2 layers)"
                )
            for name, attn in layers.items():
                attn.set_processor(procs[name])
        else:
            for attn in layers.values():
                attn.set_processor(processors)

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: Mapping[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``eps`` (or whatever the model was trained for): ``(B, out_channels, H, W)``.

        Args:
            x: ``(B, in_channels, H, W)`` noisy latents.
            t: timesteps, a scalar or ``(B,)``.
            encoder_hidden_states: ``(B, M, cross_attention_dim)`` condition tokens (required iff the
                model has cross-attention).
            encoder_hidden_states: with ``encoder_hid_dim`` (IF) ``(B, M, encoder_hid_dim)``, projected
                by ``encoder_hid_proj``.
            class_labels: ``(B,)`` integer labels (required iff ``num_class_embeds``); with
                ``class_embed_type``: ``(B,)`` numbers ("timestep"), ``(B, time_embed_dim)`` float
                vectors ("identity": unCLIP's decoder gets the projected CLIP embeddings of
                :class:`~.unclip.UnCLIPTextProjModel` this way), ``(B,
                projection_class_embeddings_input_dim)`` ("projection", "simple_projection").
            down_block_additional_residuals: ControlNet. One tensor per skip connection, in order
                (``conv_in``'s output, then each down block's residual layers and downsampler), each
                shaped like that skip (:meth:`skip_shapes`); added to the skips before the up path
                uses them.
            mid_block_additional_residual: ControlNet. Added to the middle block's output.
            down_intrablock_additional_residuals: T2I-Adapter. Consumed in order, one per down block
                (:meth:`adapter_shapes`; fewer is allowed, the last blocks then get none): in a block
                with cross-attention it is added to the output of its last (resnet, transformer)
                pair, before downsampling; in a ``DownBlock2D`` to the block's output after
                downsampling; either way the block's last skip carries it. One more, shaped like
                the middle block's output, is added there (SDXL's adapters). Any other shape or
                count is an error naming the mismatch.
            cross_attention_kwargs: passed as keyword arguments to every ``attn2`` processor. The
                default processor accepts none.
            added_cond_kwargs: IP-Adapter (ch. 09), as in diffusers: ``{"image_embeds": [e_0, ...]}``,
                one tensor per loaded adapter, ``(B, num_images, D)`` for a base adapter (CLIP's image
                embedding), ``(B, num_images, S, D)`` for a plus adapter (the image encoder's
                tokens). ``encoder_hid_proj`` turns them into image tokens that every ``attn2``
                processor gets as ``ip_hidden_states``. Required iff an adapter is loaded.
            attention_mask: ``(B, M)`` over the text tokens, 1/True = attend, 0/False = padding (as
                diffusers' unCLIP pipeline passes it); reaches the added-K/V attentions of the
                SimpleCrossAttn blocks, where the image's own tokens are always attended.
            encoder_attention_mask: the same, used when ``attention_mask`` is None (diffusers' rule).
        """
        self._check_inputs(x, encoder_hidden_states, class_labels)
        kw = self._image_tokens(x.shape[0], added_cond_kwargs, cross_attention_kwargs)
        mask = self.text_mask(attention_mask, encoder_attention_mask, encoder_hidden_states)
        if mask is not None:
            kw = {**(kw or {}), "attention_mask": mask}
        emb = self.time_embed(x, t, class_labels, encoder_hidden_states)
        ctx = self.project_context(encoder_hidden_states)
        h, skips = self.encode(self.conv_in(x), emb, ctx, kw, down_intrablock_additional_residuals)

        if down_block_additional_residuals is not None:
            res = list(down_block_additional_residuals)
            if len(res) != len(skips):
                raise ValueError(f"UNet2DCondition: got {len(res)} down_block_additional_residuals (ControlNet); "
                                 f"the UNet has {len(skips)} skip connections: was the ControlNet built for "
                                 "another UNet?")
            for i, (s, r) in enumerate(zip(skips, res)):
                if not isinstance(r, torch.Tensor) or r.shape != s.shape:
                    got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                    raise ValueError(f"UNet2DCondition: down_block_additional_residuals[{i}] has shape "
                                     f"{got}, the skip connection has {tuple(s.shape)}")
            skips = [s + r for s, r in zip(skips, res)]
        if mid_block_additional_residual is not None:
            if mid_block_additional_residual.shape != h.shape:
                raise ValueError(f"UNet2DCondition: mid_block_additional_residual has shape "
                                 f"{tuple(mid_block_additional_residual.shape)}, the middle block output has "
                                 f"{tuple(h.shape)}")
            h = h + mid_block_additional_residual

        h = run_up_path(self.up_blocks, h, skips, emb, ctx, kw)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


def sd15_unet() -> UNet2DCondition:
    """The Stable Diffusion 1.5 UNet (preset ``"sd15-unet"``)."""
    return UNet2DCondition(CondUNetConfig.sd15())


def if_stage1_xl_unet() -> UNet2DCondition:
    """The DeepFloyd IF stage I XL UNet (preset ``"if-stage1-xl"``, 4,304,695,110 parameters)."""
    return UNet2DCondition(CondUNetConfig.if_stage1_xl())


def karlo_decoder_unet() -> UNet2DCondition:
    """The unCLIP decoder UNet of Karlo v1 alpha (preset ``"karlo-decoder"``)."""
    return UNet2DCondition(CondUNetConfig.karlo_decoder())


_UNSUPPORTED_DEFAULTS = {
    "center_input_sample": False, "downsample_padding": 1, "time_embedding_type": "positional",
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
}
# the pixel text-conditional family's keys: diffusers' default, and the values this package builds
_FAMILY_KEYS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "act_fn": ("silu", ("silu", "swish", "gelu")),
    "time_embedding_act_fn": (None, (None, "silu", "swish", "gelu")),
    "resnet_time_scale_shift": ("default", ("default", "scale_shift")),
    "cross_attention_norm": (None, (None, "group_norm")),
    "class_embed_type": (None, CLASS_EMBED_TYPES),
    "addition_embed_type": (None, ADDITION_EMBED_TYPES),
    "encoder_hid_dim_type": (None, ENCODER_HID_DIM_TYPES),
}
_FAMILY_NUMBERS = {  # key: diffusers' default (any value is built)
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "mid_block_scale_factor": 1,
    "only_cross_attention": False, "mid_block_only_cross_attention": None, "projection_class_embeddings_input_dim": None,
    "addition_embed_type_num_heads": 64, "encoder_hid_dim": None, "time_embedding_dim": None,
}


# UNet2DConditionModel's own defaults, for the keys a config.json must otherwise carry (diffusers 0.2x-0.4x)
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=1280,
)


def unet_config_from_diffusers(c: Mapping[str, Any], what: str = "UNet2DConditionModel",
                               out_channels: int | None = None) -> CondUNetConfig:
    """Our config from a diffusers ``UNet2DConditionModel`` (or ``ControlNetModel``) config
    (``model.config`` or a config.json dict; missing keys take diffusers' defaults); anything this
    package does not implement is a ValueError that names the config key (e.g. IF stage II's
    ``class_embeddings_concat=True``). A ControlNet config has no up blocks: they mirror the down
    blocks (the ControlNet never builds them); the ControlNet refuses the GLIDE/IF options."""
    c = {**_DIFFUSERS_DEFAULTS, **dict(c)}
    if c.get("encoder_hid_dim_type") == "ip_image_proj" and c.get("encoder_hid_dim") is None:
        c["encoder_hid_dim_type"] = None  # IP-Adapters loaded: the converter attaches them
    if c.get("encoder_hid_dim") is not None and c.get("encoder_hid_dim_type") is None:
        c["encoder_hid_dim_type"] = "text_proj"  # diffusers' default
    bad = [f"{k}={c.get(k)!r}" for k, v in _UNSUPPORTED_DEFAULTS.items() if k in c and c.get(k) != v]
    for k, (default, allowed) in _FAMILY_KEYS.items():
        value = c.get(k, default)
        controlnet_refuses = what != "UNet2DConditionModel" and value != default and (k, value) != ("act_fn", "swish")
        if value not in allowed or controlnet_refuses:
            bad.append(f"{k}={value!r}")
    if what != "UNet2DConditionModel":
        bad += [f"{k}={c[k]!r}" for k, v in _FAMILY_NUMBERS.items() if k in c and c[k] != v]
    if c.get("norm_num_groups", 32) is None:
        bad.append("norm_num_groups=None")
    xdim = c.get("cross_attention_dim")
    if not isinstance(xdim, int) and xdim is not None:
        bad.append(f"cross_attention_dim={xdim!r} (one per block)")
    down = tuple(c["down_block_types"])
    up = tuple(c["up_block_types"]) if "up_block_types" in c else tuple(
        t.replace("Down", "Up") for t in reversed(down))
    mid = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    for key, kinds, known in (("down_block_types", down, DOWN_BLOCK_TYPES), ("up_block_types", up, UP_BLOCK_TYPES),
                              ("mid_block_type", (mid,), MID_BLOCK_TYPES)):
        bad += [f"{key} {k!r}" for k in kinds if k not in known]
    if bad:
        raise ValueError(f"{what} conversion: unsupported diffusers config " + ", ".join(bad))
    n = len(c["block_out_channels"])
    uses_cross = any("CrossAttn" in t for t in down + up) or mid in ("UNetMidBlock2DCrossAttn",
                                                                      "UNetMidBlock2DSimpleCrossAttn")
    needs_text = uses_cross or c.get("encoder_hid_dim") is not None or c.get("addition_embed_type") == "text"
    uses_transformers = any(t.startswith("CrossAttn") for t in down + up) or mid == "UNetMidBlock2DCrossAttn"
    head_dims = _per_block_opt(c.get("attention_head_dim", 8), n, "attention_head_dim")
    heads = head_dims if uses_transformers or None not in head_dims else 8  # the transformers' head count
    size = c.get("sample_size")
    size = size if isinstance(size, int) or size is None else size[0]
    family = {k: c.get(k, default) for k, (default, _) in _FAMILY_KEYS.items()}
    family.update({k: c.get(k, default) for k, default in _FAMILY_NUMBERS.items()})
    family["act_fn"] = "silu" if family["act_fn"] == "swish" else family["act_fn"]
    family["only_cross_attention"] = (family["only_cross_attention"] if isinstance(family["only_cross_attention"], bool)
                                      else tuple(family["only_cross_attention"]))
    return CondUNetConfig(
        sample_size=size or 64, in_channels=c["in_channels"],
        out_channels=out_channels if out_channels is not None else c["out_channels"],
        block_out_channels=tuple(c["block_out_channels"]), down_block_types=down, up_block_types=up,
        mid_block_type=mid, layers_per_block=_per_block(c.get("layers_per_block", 2), n, "layers_per_block"),
        transformer_layers_per_block=_per_block(c.get("transformer_layers_per_block", 1), n,
                                                "transformer_layers_per_block"),
        cross_attention_dim=xdim if needs_text else None,
        num_attention_heads=_per_block(heads, n, "attention_head_dim"), attention_head_dim=head_dims,
        use_linear_projection=c.get("use_linear_projection", False), norm_num_groups=c.get("norm_num_groups", 32),
        norm_eps=c.get("norm_eps", 1e-5), num_class_embeds=c.get("num_class_embeds"),
        flip_sin_to_cos=c.get("flip_sin_to_cos", True), freq_shift=c.get("freq_shift", 0),
        dropout=c.get("dropout", 0.0), **family,
    )


_unet_config_from_diffusers = unet_config_from_diffusers  # the name other modules used


def unet_2d_condition_from_diffusers_config(config: Mapping[str, Any]) -> UNet2DCondition:
    """An (untrained) :class:`UNet2DCondition` for a diffusers ``UNet2DConditionModel`` config dict."""
    return UNet2DCondition(unet_config_from_diffusers(config))


def from_diffusers_unet_2d_condition(model) -> UNet2DCondition:
    """Convert a diffusers ``UNet2DConditionModel`` (the SD 1.x/2.x family, optionally with
    ``num_class_embeds``, optionally with IP-Adapters loaded) into ours with the same weights,
    loaded strictly. ``upcast_attention`` (a float16 precision switch) is ignored: attention runs in
    the input's dtype."""
    from ..interop import load_state_dict

    cfg = unet_config_from_diffusers(model.config)
    p = next(model.parameters())
    with torch.device(p.device):
        ours = UNet2DCondition(cfg)
        if type(getattr(model, "encoder_hid_proj", None)).__name__ == "MultiIPAdapterImageProjection":
            from .ip_adapter import attach_like_diffusers

            attach_like_diffusers(ours, model)
        ours = ours.to(p.dtype)
    return load_state_dict(ours, model.state_dict(), what="diffusers UNet2DConditionModel")
