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
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer import Transformer2DModel, check_context

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
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"CondUNetConfig: block_out_channels {self.block_out_channels} are not all divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        heads = _per_block(self.num_attention_heads, n, "num_attention_heads")
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


# ---------------------------------------------------------------------------------------------
# Blocks (diffusers' names). Each down block returns (h, skips): one skip per residual layer and
# one after its downsampler; each up block consumes as many skips as it has residual layers.
# ---------------------------------------------------------------------------------------------


class DownBlock2D(nn.Module):
    """``num_layers`` residual blocks, then a stride-2 conv (unless last). ``(B, in, H, W) -> (B, out, H/2, W/2)``."""

    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, groups: int,
                 eps: float, add_downsample: bool, dropout: float = 0.0, **_: Any):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups=groups,
                          eps=eps, dropout=dropout)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=1)])
            if add_downsample else None
        )

    def forward(self, h: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                additional_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for resnet in self.resnets:
            h = resnet(h, temb)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        if additional_residual is not None:
            # T2I-Adapter without attention: added to the block's output, which is also its last skip
            h = h + additional_residual
            skips[-1] = h
        return h, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """Residual block then spatial transformer, ``num_layers`` times, then a stride-2 conv."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, groups: int,
                 eps: float, add_downsample: bool, dropout: float = 0.0, heads: int = 8,
                 cross_attention_dim: int = 768, transformer_layers: int = 1, use_linear_projection: bool = False):
        super().__init__(in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample, dropout)
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, out_channels // heads, out_channels, num_layers=transformer_layers,
                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                               use_linear_projection=use_linear_projection)
            for _ in range(num_layers)
        )

    def forward(self, h: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                additional_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            h = attn(resnet(h, temb), encoder_hidden_states, cross_attention_kwargs)
            if i == last and additional_residual is not None:
                # T2I-Adapter: added before downsampling, so the skip carries it too
                h = h + additional_residual
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UNetMidBlock2D(nn.Module):
    """The middle of a UNet without attention: one residual block (diffusers' ``UNetMidBlock2D``
    as ``UNet2DConditionModel`` builds it)."""

    has_cross_attention = False

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, dropout: float = 0.0, **_: Any):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps,
                                                    dropout=dropout)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        return self.resnets[0](h, temb)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (spatial transformer, resnet) ``num_layers`` times, at the lowest resolution."""

    has_cross_attention = True

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, dropout: float = 0.0,
                 heads: int = 8, cross_attention_dim: int = 768, transformer_layers: int = 1,
                 use_linear_projection: bool = False, num_layers: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps, dropout=dropout)
            for _ in range(num_layers + 1)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, channels // heads, channels, num_layers=transformer_layers,
                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                               use_linear_projection=use_linear_projection)
            for _ in range(num_layers)
        )

    def forward(self, h: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attn(h, encoder_hidden_states, cross_attention_kwargs), temb)
        return h


class UpBlock2D(nn.Module):
    """``num_layers`` residual blocks, each on ``[h, skip]`` concatenated along channels, then
    nearest x2 and a 3x3 conv (unless last). The last layer's skip has ``in_channels`` (the
    matching down block's input width), the others ``out_channels``."""

    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, groups: int, eps: float, add_upsample: bool, dropout: float = 0.0, **_: Any):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, temb_channels, groups=groups, eps=eps, dropout=dropout)
            for i in range(num_layers)
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample else None
        )

    def _layers(self) -> Iterator[tuple[nn.Module, nn.Module | None]]:
        return ((r, None) for r in self.resnets)

    def forward(self, h: torch.Tensor, skips: Sequence[torch.Tensor], temb: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        skips = list(skips)
        for resnet, attn in self._layers():
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if attn is not None:
                h = attn(h, encoder_hidden_states, cross_attention_kwargs)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class CrossAttnUpBlock2D(UpBlock2D):
    """As :class:`UpBlock2D` with a spatial transformer after each residual block."""

    has_cross_attention = True

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, groups: int, eps: float, add_upsample: bool, dropout: float = 0.0,
                 heads: int = 8, cross_attention_dim: int = 768, transformer_layers: int = 1,
                 use_linear_projection: bool = False):
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, groups, eps,
                         add_upsample, dropout)
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, out_channels // heads, out_channels, num_layers=transformer_layers,
                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                               use_linear_projection=use_linear_projection)
            for _ in range(num_layers)
        )

    def _layers(self) -> Iterator[tuple[nn.Module, nn.Module | None]]:
        return zip(self.resnets, self.attentions)


_DOWN = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
_UP = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
_MID = {"UNetMidBlock2D": UNetMidBlock2D, "UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}


class UNet2DCondition(nn.Module):
    """``eps_theta(x_t, t, y)``: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.

    H and W must be divisible by ``2^(len(block_out_channels) - 1)``.
    """

    def __init__(self, config: CondUNetConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else CondUNetConfig()
        n, ch = len(cfg.block_out_channels), cfg.block_out_channels
        heads = _per_block(cfg.num_attention_heads, n, "num_attention_heads")
        layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
        tlayers = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        temb = 4 * ch[0]
        common = dict(temb_channels=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                      cross_attention_dim=cfg.cross_attention_dim, use_linear_projection=cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        # t -> sinusoidal features (B, ch[0]) -> MLP (B, 4 ch[0])
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb) if cfg.num_class_embeds else None

        self.down_blocks = nn.ModuleList(
            _DOWN[kind](ch[max(i - 1, 0)], ch[i], num_layers=layers[i], add_downsample=i < n - 1, heads=heads[i],
                        transformer_layers=tlayers[i], **common)
            for i, kind in enumerate(cfg.down_block_types)
        )
        self.mid_block = (
            _MID[cfg.mid_block_type](ch[-1], heads=heads[-1], transformer_layers=tlayers[-1], **common)
            if cfg.mid_block_type is not None else None
        )
        rev, rheads, rlayers, rtl = ch[::-1], heads[::-1], layers[::-1], tlayers[::-1]
        self.up_blocks = nn.ModuleList(
            _UP[kind](rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], num_layers=rlayers[i] + 1,
                      add_upsample=i < n - 1, heads=rheads[i], transformer_layers=rtl[i], **common)
            for i, kind in enumerate(cfg.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    # -- the IP-Adapter seam --------------------------------------------------------------------
    def cross_attentions(self) -> Iterator[tuple[str, Attention]]:
        """The cross-attention layers with their diffusers names, in forward order
        (``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``, ..., ``"mid_block..."``,
        ``"up_blocks..."``)."""
        for name, module in self.named_modules():
            if name.endswith(".attn2") and isinstance(module, Attention):
                yield name, module

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
    def _check_inputs(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                      class_labels: torch.Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet2DCondition expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = cfg.downsampling_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"UNet2DCondition: input size {tuple(x.shape[2:])} is not divisible by {f} "
                f"(2^(number of blocks - 1))"
            )
        if cfg.has_cross_attention:
            check_context(encoder_hidden_states, x.shape[0], cfg.cross_attention_dim, "UNet2DCondition")
        elif encoder_hidden_states is not None:
            raise ValueError("UNet2DCondition has no cross-attention (cross_attention_dim=None) but got "
                             "encoder_hidden_states")
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"UNet2DCondition is class-conditional (num_class_embeds={cfg.num_class_embeds}) "
                                 "and needs class_labels of shape (B,)")
            if class_labels.shape != (x.shape[0],):
                raise ValueError(f"UNet2DCondition: class_labels must have shape ({x.shape[0]},), "
                                 f"got {tuple(class_labels.shape)}")
        elif class_labels is not None:
            raise ValueError("UNet2DCondition has no class embedding (num_class_embeds=None) but got class_labels")

    def time_embed(self, x: torch.Tensor, t: torch.Tensor | float | int,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 4 * block_out_channels[0])``: MLP(sinusoid(t)) [+ class_embedding(class_labels)]."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet2DCondition: t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        return emb

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
                shaped like that skip; added to the skips before the up path uses them.
            mid_block_additional_residual: ControlNet. Added to the middle block's output.
            down_intrablock_additional_residuals: T2I-Adapter. Consumed in order, one per down block:
                in a ``CrossAttnDownBlock2D`` it is added to the output of its last (resnet,
                transformer) pair, before downsampling; in a ``DownBlock2D`` to the block's output
                after downsampling; either way the block's last skip carries it. If one is left
                after the down path and it has the middle block's output shape, it is added there.
            cross_attention_kwargs: passed as keyword arguments to every ``attn2`` processor (e.g.
                IP-Adapter's ``scale``). The default processor accepts none.
        """
        self._check_inputs(x, encoder_hidden_states, class_labels)
        emb = self.time_embed(x, t, class_labels)
        ctx, kw = encoder_hidden_states, cross_attention_kwargs
        intra = list(down_intrablock_additional_residuals) if down_intrablock_additional_residuals is not None else []

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            r = intra.pop(0) if intra else None
            h, block_skips = block(h, emb, ctx, kw, additional_residual=r)
            skips.extend(block_skips)

        if down_block_additional_residuals is not None:
            res = list(down_block_additional_residuals)
            if len(res) != len(skips):
                raise ValueError(f"UNet2DCondition: got {len(res)} down_block_additional_residuals; the UNet has "
                                 f"{len(skips)} skip connections")
            for i, (s, r) in enumerate(zip(skips, res)):
                if r.shape != s.shape:
                    raise ValueError(f"UNet2DCondition: down_block_additional_residuals[{i}] has shape "
                                     f"{tuple(r.shape)}, the skip connection has {tuple(s.shape)}")
            skips = [s + r for s, r in zip(skips, res)]

        if self.mid_block is not None:
            h = self.mid_block(h, emb, ctx, kw)
            if intra and intra[0].shape == h.shape:
                h = h + intra.pop(0)
        if mid_block_additional_residual is not None:
            if mid_block_additional_residual.shape != h.shape:
                raise ValueError(f"UNet2DCondition: mid_block_additional_residual has shape "
                                 f"{tuple(mid_block_additional_residual.shape)}, the middle block output has "
                                 f"{tuple(h.shape)}")
            h = h + mid_block_additional_residual

        for block in self.up_blocks:
            k = len(block.resnets)
            h = block(h, skips[-k:], emb, ctx, kw)
            del skips[-k:]
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


def from_diffusers_unet_2d_condition(model) -> UNet2DCondition:
    """Convert a diffusers ``UNet2DConditionModel`` (the SD 1.x/2.x family, optionally with
    ``num_class_embeds``) into ours with the same weights, loaded strictly. ``upcast_attention``
    (a float16 precision switch) is ignored: attention runs in the input's dtype."""
    from ..interop import load_state_dict

    c = model.config
    bad = [f"{k}={c.get(k)!r}" for k, v in _UNSUPPORTED_DEFAULTS.items()
           if k in c and c.get(k) != v and not (k == "act_fn" and c.get(k) == "swish")]
    if c.get("norm_num_groups") is None:
        bad.append("norm_num_groups=None")
    if not isinstance(c.cross_attention_dim, int) and c.cross_attention_dim is not None:
        bad.append(f"cross_attention_dim={c.cross_attention_dim!r} (one per block)")
    if bad:
        raise ValueError("UNet2DConditionModel conversion: unsupported diffusers config " + ", ".join(bad))
    n = len(c.block_out_channels)
    uses_cross = any("CrossAttn" in t for t in tuple(c.down_block_types) + tuple(c.up_block_types)) or (
        c.mid_block_type == "UNetMidBlock2DCrossAttn")
    sample_size = c.sample_size if isinstance(c.sample_size, int) or c.sample_size is None else c.sample_size[0]
    cfg = CondUNetConfig(
        sample_size=sample_size or 64, in_channels=c.in_channels, out_channels=c.out_channels,
        block_out_channels=tuple(c.block_out_channels), down_block_types=tuple(c.down_block_types),
        up_block_types=tuple(c.up_block_types), mid_block_type=c.mid_block_type,
        layers_per_block=_per_block(c.layers_per_block, n, "layers_per_block"),
        transformer_layers_per_block=_per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block"),
        cross_attention_dim=c.cross_attention_dim if uses_cross else None,
        num_attention_heads=_per_block(c.attention_head_dim, n, "attention_head_dim"),
        use_linear_projection=c.use_linear_projection, norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps,
        num_class_embeds=c.num_class_embeds, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift,
        dropout=c.get("dropout", 0.0),
    )
    p = next(model.parameters())
    with torch.device(p.device):
        ours = UNet2DCondition(cfg).to(p.dtype)
    return load_state_dict(ours, model.state_dict(), what="diffusers UNet2DConditionModel")
