"""The pixel-space UNet of DDPM and ADM (chapters 01-02), with diffusers' ``UNet2DModel`` names.

DDPM (Ho et al. 2020, appendix B) uses "a U-Net backbone similar to an unmasked PixelCNN++ with
group normalization throughout", two residual blocks per resolution, self-attention at 16x16 and
the timestep given to every residual block through the Transformer sinusoidal embedding. ADM
(Dhariwal & Nichol 2021) adds adaptive group normalisation (``resnet_time_scale_shift=
"scale_shift"``), more heads and class embeddings. Both are one :class:`UNetConfig` here::

    h = conv_in(x);  skips = [h]
    down blocks:  (resnet, attention?) x layers_per_block, then downsample; every output is pushed
    mid block:    resnet, attention, resnet
    up blocks:    (concat a popped skip, resnet, attention?) x (layers_per_block + 1), upsample
    out = conv_out(silu(conv_norm_out(h)))

Imagen's Efficient U-Net options (Saharia et al. 2022, App. B.1; chapter 13, where
:class:`.unet_cond.CondUNetConfig` documents them) exist here too, off by default:
``layers_per_block`` per level, ``skip_scale`` and ``downsample_first``. diffusers' ``UNet2DModel``
has none of them (its ``layers_per_block`` is one int), so :meth:`UNetConfig.to_diffusers_config`
refuses a config that uses them.

Submodule names are diffusers' (``down_blocks.1.attentions.0.to_q``...), so a ``UNet2DModel``
state dict loads with no renaming: :func:`from_diffusers_unet2d` converts a diffusers model,
:meth:`UNet2D.from_pretrained` reads a diffusers folder (safetensors only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .embeddings import TimestepEmbedding, Timesteps
from .resnet import ResnetBlock2D, check_block_channels
from .unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D, check_efficient_options, run_up_path

DOWN_BLOCK_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # name -> has attention
UP_BLOCK_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
CLASS_EMBED_TYPES = (None, "timestep", "identity")


@dataclass
class UNetConfig:
    """Everything that fixes a :class:`UNet2D`; the field names are ``UNet2DModel``'s config keys.

    ``block_out_channels[i]`` is the width at level i (resolution ``sample_size / 2**i``);
    ``attention_head_dim=None`` means one head as wide as the block (DDPM). ``num_class_embeds``
    adds a learned embedding per class to the time embedding (ADM's class conditioning).
    ``out_channels = 2 * in_channels`` gives the learned-variance output of Improved DDPM.
    The defaults are the DDPM CIFAR-10 model; see the presets :meth:`tiny`,
    :meth:`ddpm_cifar10`, :meth:`ddpm_256`.
    """

    sample_size: int | tuple[int, int] | None = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | None = None
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    center_input_sample: bool = False
    downsample_padding: int = 0
    dropout: float = 0.0
    time_embedding_dim: int | None = None
    mid_block_scale_factor: float = 1.0
    mid_block_type: str | None = "UNetMidBlock2D"
    # diffusers options this package implements in one way only (validated, kept for round trips)
    time_embedding_type: str = "positional"
    act_fn: str = "silu"
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    # Imagen's Efficient U-Net (App. B.1): our own options, no UNet2DModel keys
    skip_scale: float = 1.0
    downsample_first: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # ignored diffusers keys

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides: Any) -> UNetConfig:
        """A two-level UNet with attention at 8x8, for tests and smoke runs (16x16 inputs)."""
        kw: dict[str, Any] = dict(
            sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
            attention_head_dim=16, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def ddpm_cifar10(cls, **overrides: Any) -> UNetConfig:
        """google/ddpm-cifar10-32 (Ho et al. 2020): 35,746,307 parameters."""
        return cls(**overrides)  # the defaults are this model

    @classmethod
    def ddpm_256(cls, **overrides: Any) -> UNetConfig:
        """The 256x256 DDPM of CelebA-HQ and LSUN (google/ddpm-celebahq-256, ddpm-church-256,
        ddpm-bedroom-256, ddpm-cat-256): six levels, attention at 16x16, 113,673,219 parameters."""
        kw: dict[str, Any] = dict(
            sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
            down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        )
        kw.update(overrides)
        return cls(**kw)

    # -- derived quantities ----------------------------------------------------------------------
    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def downsampling_factor(self) -> int:
        """H and W must be multiples of this: ``2 ** (levels - 1)``; ``2 ** levels`` with ``downsample_first``."""
        return 2 ** (len(self.block_out_channels) - (not self.downsample_first))

    @property
    def layers(self) -> tuple[int, ...]:
        """``layers_per_block`` per level."""
        n, lpb = len(self.block_out_channels), self.layers_per_block
        return tuple(int(v) for v in lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * n

    def head_dim(self, channels: int) -> int:
        return self.attention_head_dim if self.attention_head_dim is not None else channels

    @property
    def mid_attn_groups(self) -> int | None:
        # diffusers' UNetMidBlock2D: without attn_norm_num_groups, the mid attention has a GroupNorm
        # only for the "default" norm (scale_shift checkpoints have none there).
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_num_groups if self.resnet_time_scale_shift == "default" else None

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency."""
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("UNetConfig: block_out_channels is empty")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"UNetConfig: block_out_channels ({levels}), down_block_types ({len(self.down_block_types)}) "
                f"and up_block_types ({len(self.up_block_types)}) must have the same length"
            )
        for kind, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for name in getattr(self, kind):
                if name not in known:
                    raise ValueError(f"UNetConfig: {kind} has {name!r}; supported: {', '.join(known)}")
        for name in ("in_channels", "out_channels", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig: {name} must be positive, got {getattr(self, name)}")
        if isinstance(self.layers_per_block, (list, tuple)):
            self.layers_per_block = tuple(self.layers_per_block)
            if len(self.layers_per_block) != levels:
                raise ValueError(f"UNetConfig: layers_per_block has {len(self.layers_per_block)} entries but there "
                                 f"are {levels} blocks")
        if min(self.layers) < 1:
            raise ValueError(f"UNetConfig: layers_per_block must be positive, got {self.layers_per_block}")
        check_efficient_options("UNetConfig", self.skip_scale, self.downsample_first)
        for name in ("attention_head_dim", "attn_norm_num_groups"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig: {name} must be positive (or None), got {getattr(self, name)}")
        check_block_channels("UNetConfig", self.block_out_channels, self.norm_num_groups)
        mid_groups = self.mid_attn_groups
        if mid_groups is not None and self.block_out_channels[-1] % mid_groups != 0:
            raise ValueError(
                f"UNetConfig: {self.block_out_channels[-1]} mid-block channels are not divisible by "
                f"attn_norm_num_groups={mid_groups}"
            )
        attn_widths = [ch for ch, t in zip(self.block_out_channels, self.down_block_types) if DOWN_BLOCK_TYPES[t]]
        attn_widths += [ch for ch, t in zip(self.block_out_channels[::-1], self.up_block_types) if UP_BLOCK_TYPES[t]]
        if self.mid_block_type is not None and self.add_attention:
            attn_widths.append(self.block_out_channels[-1])
        for ch in attn_widths:
            if ch % self.head_dim(ch) != 0:
                raise ValueError(
                    f"UNetConfig: attention over {ch} channels cannot be split into heads of "
                    f"attention_head_dim={self.attention_head_dim}"
                )
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                f"UNetConfig: resnet_time_scale_shift={self.resnet_time_scale_shift!r}; "
                "supported: 'default', 'scale_shift'"
            )
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise ValueError(
                f"UNetConfig: class_embed_type={self.class_embed_type!r}; supported: None, 'timestep', 'identity'"
            )
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            raise ValueError(f"UNetConfig: num_class_embeds must be positive, got {self.num_class_embeds}")
        if self.mid_block_type not in ("UNetMidBlock2D", None):
            raise ValueError(f"UNetConfig: mid_block_type={self.mid_block_type!r}; supported: 'UNetMidBlock2D', None")
        unsupported = {
            "time_embedding_type": ("positional",), "act_fn": ("silu", "swish"),
            "downsample_type": ("conv",), "upsample_type": ("conv",),
        }
        for name, ok in unsupported.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"UNetConfig: {name}={getattr(self, name)!r} is not implemented; supported: {ok}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNetConfig: downsample_padding must be 0 or 1, got {self.downsample_padding}")

    # -- diffusers configs -----------------------------------------------------------------------
    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> UNetConfig:
        """Our config from a ``UNet2DModel`` config (``model.config`` or a config.json dict).
        Missing keys take diffusers' defaults; keys starting with ``_`` are ignored."""
        own = {f.name for f in dataclasses.fields(cls)} - {"extra", "skip_scale", "downsample_first"}  # ours only
        cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}
        extra = {k: cfg.pop(k) for k in list(cfg) if k in _IGNORED_DIFFUSERS_KEYS}
        unknown = sorted(set(cfg) - own)
        if unknown:
            raise ValueError(f"UNetConfig.from_diffusers_config: unknown UNet2DModel keys {unknown}")
        return cls(**cfg, extra=extra)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The keyword arguments of an equivalent ``diffusers.UNet2DModel(**config)``; a ValueError
        for the Efficient U-Net options, which ``UNet2DModel`` does not have."""
        for name, default in (("skip_scale", 1.0), ("downsample_first", False)):
            if getattr(self, name) != default:
                raise ValueError(f"UNetConfig.to_diffusers_config: {name}={getattr(self, name)!r} has no diffusers "
                                 "equivalent (UNet2DModel has no such option)")
        if isinstance(self.layers_per_block, tuple):
            if len(set(self.layers)) > 1:
                raise ValueError(f"UNetConfig.to_diffusers_config: layers_per_block={self.layers_per_block} per level "
                                 "has no diffusers equivalent (UNet2DModel takes one int)")
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "skip_scale", "downsample_first")}
        out["layers_per_block"] = self.layers[0]
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            out[k] = list(out[k])
        return {**out, **self.extra}


# UNet2DModel's own defaults, for keys a config.json leaves out (diffusers 0.2x-0.4x)
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1.0, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None,
)
_IGNORED_DIFFUSERS_KEYS = ("num_train_timesteps",)  # used only by time_embedding_type="learned"


# -- blocks (the family lives in unet_blocks.py) ------------------------------------------------------------------------------------------
def _spatial_attention(channels: int, cfg: UNetConfig, groups: int | None, rescale: float = 1.0) -> Attention:
    """The DDPM attention block: GroupNorm, single-/multi-head self-attention over pixels, residual."""
    head_dim = cfg.head_dim(channels)
    return Attention(
        channels, heads=channels // head_dim, dim_head=head_dim, bias=True, norm_num_groups=groups,
        eps=cfg.norm_eps, residual_connection=True, rescale_output_factor=rescale,
    )


def _resnets(cfg: UNetConfig):
    """The residual-block factory of every block of this UNet (time embedding, norm, AdaGN switch)."""
    def make(in_ch: int, out_ch: int, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_ch, out_ch, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
            dropout=cfg.dropout, time_embedding_norm=cfg.resnet_time_scale_shift, output_scale_factor=scale,
        )
    return make


def build_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, nn.Module | None, nn.ModuleList]:
    """``(down_blocks, mid_block, up_blocks)`` of the pixel UNet, from the one block family of
    :mod:`.unet_blocks` (``AttnDownBlock2D`` = a down block with pixel self-attention)."""
    ch, levels, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers
    resnet = _resnets(cfg)
    first = cfg.downsample_first  # Efficient U-Net: every block resamples, the down blocks first

    def attention(on: bool):
        return (lambda c: _spatial_attention(c, cfg, cfg.norm_num_groups)) if on else None

    down = nn.ModuleList(
        DownBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=layers[i], resnet=resnet,
                    attention=attention(DOWN_BLOCK_TYPES[kind]), add_downsample=i < levels - 1 or first,
                    downsample_padding=cfg.downsample_padding, downsample_first=first)
        for i, kind in enumerate(cfg.down_block_types)
    )
    mid = None
    if cfg.mid_block_type is not None:
        scale = cfg.mid_block_scale_factor
        mid_attn = (lambda c: _spatial_attention(c, cfg, cfg.mid_attn_groups, scale)) if cfg.add_attention else None
        mid = UNetMidBlock2D(ch[-1], num_layers=1, resnet=resnet, attention=mid_attn, scale=scale)
    rev, rlayers = ch[::-1], layers[::-1]
    up = nn.ModuleList(
        UpBlock2D(rev[i] if first else rev[min(i + 1, levels - 1)], rev[max(i - 1, 0)], rev[i],
                  num_layers=rlayers[i] + 1, resnet=resnet, attention=attention(UP_BLOCK_TYPES[kind]),
                  add_upsample=i < levels - 1 or first, skip_scale=cfg.skip_scale)
        for i, kind in enumerate(cfg.up_block_types)
    )
    return down, mid, up


# -- the UNet ----------------------------------------------------------------------------------------
class UNet2D(nn.Module):
    """The DDPM/ADM UNet: ``forward(x (B, in_channels, H, W), t, class_labels=None) -> (B, out_channels, H, W)``.

    ``t``: timesteps in 0..T-1 (int or float), a tensor of shape ``(B,)`` or a scalar (a number,
    a 0-d or a one-element tensor: used for the whole batch). ``class_labels``: ``(B,)`` integers in ``0..num_class_embeds-1`` when the config
    has ``num_class_embeds`` (``(B,)`` numbers for ``class_embed_type="timestep"``, ``(B,
    time_embed_dim)`` vectors for ``"identity"``); they must be absent otherwise. H and W must be
    multiples of ``config.downsampling_factor``.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config if config is not None else UNetConfig()
        cfg.validate()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        if cfg.class_embed_type is None and cfg.num_class_embeds is not None:
            self.class_embedding: nn.Module | None = nn.Embedding(cfg.num_class_embeds, cfg.time_embed_dim)
        elif cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        elif cfg.class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        else:
            self.class_embedding = None

        self.down_blocks, self.mid_block, self.up_blocks = build_blocks(cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        t = self._check_inputs(x, t, class_labels)
        if self.config.center_input_sample:  # inputs given in [0, 1]
            x = 2 * x - 1.0

        # the conditioning vector: MLP(sinusoidal(t)) [+ class embedding]
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.class_embedding is not None:
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(self.dtype)
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)

        # the U: push every feature map on the way down, pop them on the way up
        h = self.conv_in(x)
        skips = [] if self.config.downsample_first else [h]  # no residual block at full resolution to take it
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        h = run_up_path(self.up_blocks, h, skips, emb)

        n = self.conv_norm_out
        return self.conv_out(F.silu(F.group_norm(h, n.num_groups, n.weight, n.bias, n.eps)))

    def _check_inputs(self, x: torch.Tensor, t: Any, class_labels: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet2D expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = cfg.downsampling_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"UNet2D: H and W must be multiples of {f} (the UNet halves them {f.bit_length() - 1} "
                f"times), got {tuple(x.shape[-2:])}"
            )
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1 and b != 1):
            t = t.reshape(1).expand(b)
        if t.ndim != 1 or t.shape[0] != b:
            raise ValueError(f"UNet2D: t must be a scalar or have shape (B,) = ({b},), got {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"UNet2D: t must be integer or float timesteps, got dtype {t.dtype}")

        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("UNet2D: class_labels given but the config has no class embedding "
                                 "(set num_class_embeds or class_embed_type)")
            return t
        if class_labels is None:
            raise ValueError("UNet2D: this model is class-conditional; pass class_labels of shape (B,)")
        if cfg.class_embed_type == "identity":
            want = (b, cfg.time_embed_dim)
            if tuple(class_labels.shape) != want:
                raise ValueError(f"UNet2D: class_labels must be {want} vectors, got {tuple(class_labels.shape)}")
            return t
        if class_labels.ndim != 1 or class_labels.shape[0] != b:
            raise ValueError(f"UNet2D: class_labels must have shape ({b},), got {tuple(class_labels.shape)}")
        if cfg.class_embed_type is None:
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
                raise ValueError(f"UNet2D: class_labels must be integers, got dtype {class_labels.dtype}")
            if b and (int(class_labels.min()) < 0 or int(class_labels.max()) >= cfg.num_class_embeds):
                raise ValueError(f"UNet2D: class_labels must lie in 0..{cfg.num_class_embeds - 1}")
        return t

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, variant: str | None = None) -> UNet2D:
        """Load a diffusers ``UNet2DModel`` folder: ``config.json`` + ``diffusion_pytorch_model
        [.variant].safetensors`` (sharded or not; or a pipeline folder with a ``unet/`` subfolder),
        strictly, with :func:`diffusion_core.interop.load_folder_weights`. Only safetensors are read,
        never pickles."""
        from ..interop import load_folder_weights, read_config

        folder = Path(path)
        if not (folder / "config.json").exists() and (folder / "unet" / "config.json").exists():
            folder = folder / "unet"
        config_file = folder / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"no config.json in {folder}")
        model = cls(UNetConfig.from_diffusers_config(read_config(config_file)))
        return load_folder_weights(model, folder, variant=variant)


def unet2d_from_diffusers_config(config: dict[str, Any]) -> UNet2D:
    """An (untrained) :class:`UNet2D` for a diffusers ``UNet2DModel`` config dict."""
    return UNet2D(UNetConfig.from_diffusers_config(config))


def from_diffusers_unet2d(model: nn.Module) -> UNet2D:
    """Convert a diffusers ``UNet2DModel`` into a :class:`UNet2D` with the same weights (and dtype)."""
    from ..interop import load_state_dict

    state = model.state_dict()
    param = next(model.parameters())
    ours = UNet2D(UNetConfig.from_diffusers_config(dict(model.config))).to(device=param.device, dtype=param.dtype)
    return load_state_dict(ours, state, what="diffusers UNet2DModel")


# -- presets (see diffusion_core.presets) ----------------------------------------------------------------
def build_ddpm_cifar10() -> UNet2D:
    return UNet2D(UNetConfig.ddpm_cifar10())


def build_ddpm_256() -> UNet2D:
    return UNet2D(UNetConfig.ddpm_256())
