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

Parameter names follow diffusers' ``UNet2DConditionModel`` so its checkpoints load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .embeddings import TimestepEmbedding, Timesteps
from .resnet import ResnetBlock2D
from .transformer import Transformer2DModel, check_context
from .unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D, run_up_path

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


def _per_block(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"CondUNetConfig: {name} has {len(value)} entries but there are {n} blocks")
    return value


@dataclass
class CondUNetConfig:
    """The conditional UNet's shape (diffusers' ``UNet2DConditionModel`` fields, SD 1.5 defaults).

    ``num_attention_heads`` is the number of heads per block (what diffusers' configs, for
    historical reasons, call ``attention_head_dim``); each head has ``channels // heads`` dims.
    ``num_class_embeds`` adds ``class_embedding`` (an ``nn.Embedding``); for classifier-free
    guidance reserve one index as the null class.
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
        uses_cross = (
            any(t.startswith("CrossAttn") for t in self.down_block_types + self.up_block_types)
            or self.mid_block_type == "UNetMidBlock2DCrossAttn"
        )
        if uses_cross and self.cross_attention_dim is None:
            raise ValueError("CondUNetConfig: cross-attention blocks need cross_attention_dim")
        for name in ("in_channels", "out_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"CondUNetConfig: {name} must be positive, got {getattr(self, name)}")
        if min(self.block_out_channels) < 1:
            raise ValueError(f"CondUNetConfig: block_out_channels must all be positive, got {self.block_out_channels}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"CondUNetConfig: block_out_channels {self.block_out_channels} are not all divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        heads = _per_block(self.num_attention_heads, n, "num_attention_heads")
        if uses_cross and min(heads) < 1:
            raise ValueError(f"CondUNetConfig: num_attention_heads must be positive, got {self.num_attention_heads}")
        for c, h in zip(self.block_out_channels, heads):
            if uses_cross and c % h:
                raise ValueError(f"CondUNetConfig: {c} channels are not divisible into {h} attention heads")
        _per_block(self.layers_per_block, n, "layers_per_block")
        _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")

    def to_diffusers_config(self) -> dict[str, Any]:
        """The keyword arguments of the equivalent diffusers ``UNet2DConditionModel``."""
        n = len(self.block_out_channels)
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
        return d

    @property
    def has_cross_attention(self) -> bool:
        return self.cross_attention_dim is not None

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


# ---------------------------------------------------------------------------------------------
# The blocks come from the one family of :mod:`.unet_blocks`; here only what this UNet gives them.
# ---------------------------------------------------------------------------------------------


def _block_parts(cfg: CondUNetConfig):
    """The residual-block factory and, per level, the spatial-transformer factory of ``cfg``."""
    n = len(cfg.block_out_channels)
    heads = _per_block(cfg.num_attention_heads, n, "num_attention_heads")
    tlayers = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
    temb = cfg.time_embed_dim

    def resnet(in_ch: int, out_ch: int, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(in_ch, out_ch, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                             output_scale_factor=scale)

    def transformer(level: int):
        def make(channels: int) -> Transformer2DModel:
            return Transformer2DModel(heads[level], channels // heads[level], channels, num_layers=tlayers[level],
                                      cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
                                      use_linear_projection=cfg.use_linear_projection)
        return make

    return resnet, transformer


def build_down_blocks(cfg: CondUNetConfig) -> nn.ModuleList:
    """The encoder's levels (``CrossAttnDownBlock2D`` = a down block with a spatial transformer
    after each residual block); shared by :class:`UNet2DCondition` and the ControlNet."""
    n, ch = len(cfg.block_out_channels), cfg.block_out_channels
    layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
    resnet, transformer = _block_parts(cfg)
    return nn.ModuleList(
        DownBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=layers[i], resnet=resnet,
                    attention=transformer(i) if kind == "CrossAttnDownBlock2D" else None, cross_attention=True,
                    add_downsample=i < n - 1, downsample_padding=1)
        for i, kind in enumerate(cfg.down_block_types)
    )


def build_mid_block(cfg: CondUNetConfig) -> UNetMidBlock2D | None:
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet; ``UNetMidBlock2D``: one resnet."""
    if cfg.mid_block_type is None:
        return None
    resnet, transformer = _block_parts(cfg)
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
        n = len(cfg.block_out_channels)
        return UNetMidBlock2D(cfg.block_out_channels[-1], num_layers=1, resnet=resnet, attention=transformer(n - 1),
                              cross_attention=True)
    return UNetMidBlock2D(cfg.block_out_channels[-1], num_layers=0, resnet=resnet)


def build_up_blocks(cfg: CondUNetConfig) -> nn.ModuleList:
    n, ch = len(cfg.block_out_channels), cfg.block_out_channels
    layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
    resnet, transformer = _block_parts(cfg)
    rev, rlayers = ch[::-1], layers[::-1]
    return nn.ModuleList(
        UpBlock2D(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], num_layers=rlayers[i] + 1, resnet=resnet,
                  attention=transformer(n - 1 - i) if kind == "CrossAttnUpBlock2D" else None, cross_attention=True,
                  add_upsample=i < n - 1)
        for i, kind in enumerate(cfg.up_block_types)
    )


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
        self.time_embedding = TimestepEmbedding(ch0, cfg.time_embed_dim)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, cfg.time_embed_dim) if cfg.num_class_embeds else None
        self.down_blocks = build_down_blocks(cfg)
        self.mid_block = build_mid_block(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def skip_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The shapes of the skip connections for an input ``(batch, in_channels, height, width)``, in
        order: ``conv_in``'s output, then each down block's residual layers and downsampler."""
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
            check_context(encoder_hidden_states, x.shape[0], cfg.cross_attention_dim, who)
        elif encoder_hidden_states is not None:
            raise ValueError(f"{who} has no cross-attention (cross_attention_dim=None) but got encoder_hidden_states")
        if self.class_embedding is not None:
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

    def time_embed(self, x: torch.Tensor, t: torch.Tensor | float | int,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 4 * block_out_channels[0])``: MLP(sinusoid(t)) [+ class_embedding(class_labels)]."""
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
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        return emb

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
        skips = [h]
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
        if self.mid_block is not None and self.down_blocks[-1].downsamplers is not None:
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
        # the loaded IP-Adapters' image projections (a MultiIPAdapterImageProjection), or None
        self.encoder_hid_proj: nn.Module | None
        self.register_module("encoder_hid_proj", None)

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
        proj = self.encoder_hid_proj
        return 0 if proj is None else len(proj.image_projection_layers)

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
        proj = self.encoder_hid_proj
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
    ) -> torch.Tensor:
        """Predict ``eps`` (or whatever the model was trained for): ``(B, out_channels, H, W)``.

        Args:
            x: ``(B, in_channels, H, W)`` noisy latents.
            t: timesteps, a scalar or ``(B,)``.
            encoder_hidden_states: ``(B, M, cross_attention_dim)`` condition tokens (required iff the
                model has cross-attention).
            class_labels: ``(B,)`` integer labels (required iff ``num_class_embeds``).
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
        """
        self._check_inputs(x, encoder_hidden_states, class_labels)
        kw = self._image_tokens(x.shape[0], added_cond_kwargs, cross_attention_kwargs)
        emb = self.time_embed(x, t, class_labels)
        ctx = encoder_hidden_states
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
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def sd15_unet() -> UNet2DCondition:
    """The Stable Diffusion 1.5 UNet (preset ``"sd15-unet"``)."""
    return UNet2DCondition(CondUNetConfig.sd15())


_UNSUPPORTED_DEFAULTS = {
    "center_input_sample": False, "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None, "addition_embed_type": None,
    "resnet_time_scale_shift": "default", "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "only_cross_attention": False, "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None, "cross_attention_norm": None,
    "mid_block_only_cross_attention": None,
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
    package does not implement is an error that names it. A ControlNet config has no up blocks: they
    mirror the down blocks (the ControlNet never builds them)."""
    c = {**_DIFFUSERS_DEFAULTS, **dict(c)}
    if c.get("encoder_hid_dim_type") == "ip_image_proj" and c.get("encoder_hid_dim") is None:
        c["encoder_hid_dim_type"] = None  # IP-Adapters loaded: the converter attaches them
    bad = [f"{k}={c.get(k)!r}" for k, v in _UNSUPPORTED_DEFAULTS.items()
           if k in c and c.get(k) != v and not (k == "act_fn" and c.get(k) == "swish")]
    if c.get("norm_num_groups", 32) is None:
        bad.append("norm_num_groups=None")
    xdim = c.get("cross_attention_dim")
    if not isinstance(xdim, int) and xdim is not None:
        bad.append(f"cross_attention_dim={xdim!r} (one per block)")
    if bad:
        raise ValueError(f"{what} conversion: unsupported diffusers config " + ", ".join(bad))
    down = tuple(c["down_block_types"])
    up = tuple(c["up_block_types"]) if "up_block_types" in c else tuple(
        t.replace("Down", "Up") for t in reversed(down))
    mid = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    n = len(c["block_out_channels"])
    uses_cross = any("CrossAttn" in t for t in down + up) or mid == "UNetMidBlock2DCrossAttn"
    size = c.get("sample_size")
    size = size if isinstance(size, int) or size is None else size[0]
    return CondUNetConfig(
        sample_size=size or 64, in_channels=c["in_channels"],
        out_channels=out_channels if out_channels is not None else c["out_channels"],
        block_out_channels=tuple(c["block_out_channels"]), down_block_types=down, up_block_types=up,
        mid_block_type=mid, layers_per_block=_per_block(c.get("layers_per_block", 2), n, "layers_per_block"),
        transformer_layers_per_block=_per_block(c.get("transformer_layers_per_block", 1), n,
                                                "transformer_layers_per_block"),
        cross_attention_dim=xdim if uses_cross else None,
        num_attention_heads=_per_block(c.get("attention_head_dim", 8), n, "attention_head_dim"),
        use_linear_projection=c.get("use_linear_projection", False), norm_num_groups=c.get("norm_num_groups", 32),
        norm_eps=c.get("norm_eps", 1e-5), num_class_embeds=c.get("num_class_embeds"),
        flip_sin_to_cos=c.get("flip_sin_to_cos", True), freq_shift=c.get("freq_shift", 0),
        dropout=c.get("dropout", 0.0),
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
