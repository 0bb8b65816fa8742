"""The T2I-Adapter of Mou et al. (2023, arXiv 2302.08453): a small convolutional network that turns a
spatial condition (sketch, depth, pose, colour palette, ...) into features added to a frozen UNet.

The adapter ``F_AD`` runs ONCE on the condition image ``C``, not once per denoising step: its
output is a list of multi-scale features, one per resolution level of the UNet's encoder,

    F_c = F_AD(C) = [F_c^1, ..., F_c^L],

and at every step the frozen UNet adds them to its own encoder features at the same level,

    F_enc^i  <-  F_enc^i + F_c^i,          i = 1 .. L.

Only ``F_AD`` is trained. Because the features are plain additive offsets, adapters for different
conditions compose without retraining (the paper's multi-adapter control):

    F_c = sum_k w_k F_AD^k(C_k),

with user-chosen weights ``w_k`` (:class:`MultiAdapter`).

Architecture (``adapter_type="full_adapter"``, the paper's adapter): ``PixelUnshuffle`` by
``downscale_factor`` (8 for SD: a 512x512 condition becomes 64x64, the latent's size, with
``in_channels * 64`` channels), a 3x3 ``conv_in``, then one block per entry of ``channels``. Every
block after the first halves the resolution by 2x2 average pooling, changes the width by a 1x1 conv
if needed, and applies ``num_res_blocks`` residual blocks ``x + conv1x1(relu(conv3x3(x)))``; the
output of each block is one feature. ``adapter_type="light_adapter"`` (the reference code's lighter
variant) has no ``conv_in``; each block works at a quarter of its width (1x1 in, residual blocks
of two 3x3 convs, 1x1 out) and there is one more block than ``channels`` entries, the last one
repeating ``channels[-1]`` one level lower.

Level ``i`` (0-based) of either type is ``downscale_factor * 2**i`` times smaller than the condition.
``total_downscale_factor`` is, as in diffusers, the factor of the coarsest (last) level,
``downscale_factor * 2**(levels - 1)``; the condition's height and width must be multiples of it.

Which UNet blocks consume the features (diffusers' ``UNet2DConditionModel`` with
``down_intrablock_additional_residuals``, and ours, :meth:`UNet2DCondition.forward`): feature ``i``
goes to down block ``i``. In a ``CrossAttnDownBlock2D`` it is added after the block's last
(resnet, transformer) pair, before the block's downsampler; in a ``DownBlock2D`` it is added to the
block's output (after its downsampler, if it has one). For SD 1.4/1.5 (latents 64x64 for a 512x512
image) the full adapter's four features are

    320 x 64 x 64    -> down_blocks.0 (CrossAttnDownBlock2D, 64x64)
    640 x 32 x 32    -> down_blocks.1 (CrossAttnDownBlock2D, 32x32)
    1280 x 16 x 16   -> down_blocks.2 (CrossAttnDownBlock2D, 16x16)
    1280 x 8 x 8     -> down_blocks.3 (DownBlock2D, no downsampler, 8x8)

and a light adapter with ``channels=(320, 640, 1280)`` (four levels) lines up the same way. Since the
sum lands on the block's last skip connection too, the decoder sees the condition through the skips.

Parameter names follow diffusers' ``T2IAdapter`` (``adapter.conv_in``,
``adapter.body.i.in_conv``, ``adapter.body.i.resnets.j.block1`` / ``block2``,
``adapter.body.i.out_conv``) and ``MultiAdapter`` (``adapters.k.adapter...``), so their state
dicts load without renaming. diffusers' ``full_adapter_xl`` (SDXL) is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_TYPES = ("full_adapter", "light_adapter")
_NOT_IMPLEMENTED_TYPES = ("full_adapter_xl",)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"T2IAdapterConfig: {name} must be a positive integer, got {value!r}")
    return value


@dataclass
class T2IAdapterConfig:
    """The adapter's shape, with diffusers' ``T2IAdapter`` argument names.

    ``in_channels``: channels of the condition image (3 for RGB sketches/depth maps rendered as RGB,
    1 for a grey-scale one). ``channels``: the width of each level's feature (full adapter) or of
    each level but the last (light adapter, whose extra last level repeats ``channels[-1]``).
    ``num_res_blocks``: residual blocks per level. ``downscale_factor``: the pixel-unshuffle factor,
    i.e. how much smaller the first feature is than the condition (the VAE's factor, 8, for SD).
    """

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self) -> None:
        if self.adapter_type in _NOT_IMPLEMENTED_TYPES:
            raise ValueError(
                f"T2IAdapterConfig: adapter_type={self.adapter_type!r} (the SDXL adapter) is not implemented; "
                f"implemented: {', '.join(ADAPTER_TYPES)}"
            )
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(
                f"T2IAdapterConfig: unknown adapter_type {self.adapter_type!r}; expected one of "
                f"{', '.join(ADAPTER_TYPES)}"
            )
        _positive_int("in_channels", self.in_channels)
        _positive_int("num_res_blocks", self.num_res_blocks)
        _positive_int("downscale_factor", self.downscale_factor)
        if isinstance(self.channels, int) or not isinstance(self.channels, Sequence) or len(self.channels) == 0:
            raise ValueError(f"T2IAdapterConfig: channels must be a non-empty sequence of widths, got {self.channels!r}")
        for c in self.channels:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"T2IAdapterConfig: channels must all be positive integers, got {tuple(self.channels)}")
        self.channels = tuple(self.channels)
        if self.adapter_type == "light_adapter" and min(self.channels) < 4:
            raise ValueError(
                f"T2IAdapterConfig: a light_adapter works at channels // 4 inside each level, so channels must "
                f"all be >= 4, got {self.channels}"
            )

    @property
    def num_levels(self) -> int:
        """How many features the adapter returns (``len(channels)``, one more for the light adapter)."""
        return len(self.channels) + (self.adapter_type == "light_adapter")

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """The width of each returned feature."""
        if self.adapter_type == "light_adapter":
            return self.channels + self.channels[-1:]
        return self.channels

    @property
    def feature_downscale_factors(self) -> tuple[int, ...]:
        """How much smaller than the condition each returned feature is: ``downscale_factor * 2**i``."""
        return tuple(self.downscale_factor * 2**i for i in range(self.num_levels))

    @property
    def total_downscale_factor(self) -> int:
        """The coarsest (last) feature's factor, as diffusers defines it; H and W must be multiples of it."""
        return self.feature_downscale_factors[-1]

    def to_diffusers_config(self) -> dict:
        """The keyword arguments of the equivalent diffusers ``T2IAdapter``."""
        return dict(in_channels=self.in_channels, channels=list(self.channels), num_res_blocks=self.num_res_blocks,
                    downscale_factor=self.downscale_factor, adapter_type=self.adapter_type)

    @classmethod
    def sd15(cls, in_channels: int = 3) -> T2IAdapterConfig:
        """The SD 1.4/1.5 full adapter (diffusers' ``T2IAdapter`` defaults): 77,369,280 parameters with
        3 input channels, 77,000,640 with 1 (a grey-scale condition)."""
        return cls(in_channels=in_channels)


class AdapterResnetBlock(nn.Module):
    """``x + block2(relu(block1(x)))``, ``(B, C, h, w) -> (B, C, h, w)``.

    ``block1`` is a 3x3 conv; ``block2`` a 1x1 conv in the full adapter and a 3x3 conv in the light
    one (``second_kernel``).
    """

    def __init__(self, channels: int, second_kernel: int = 1):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


def _halve(x: torch.Tensor) -> torch.Tensor:
    # 2x2 average pooling; ceil_mode as in the reference code (only matters for odd sizes)
    return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class AdapterBlock(nn.Module):
    """One level of the full adapter: ``(B, in_channels, h, w) -> (B, out_channels, h', w')``.

    ``down``: 2x2 average pooling first (``h' = h / 2``); a 1x1 ``in_conv`` when the widths differ;
    then ``num_res_blocks`` :class:`AdapterResnetBlock` (``resnets``).
    """

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*(AdapterResnetBlock(out_channels, 1) for _ in range(num_res_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = _halve(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    """One level of the light adapter: ``(B, in_channels, h, w) -> (B, out_channels, h', w')``.

    ``down``: 2x2 average pooling first; then a 1x1 ``in_conv`` to ``out_channels // 4``,
    ``num_res_blocks`` residual blocks of two 3x3 convs at that width, and a 1x1 ``out_conv`` back
    up to ``out_channels`` (no skip around the level).
    """

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        mid = out_channels // 4
        self.down = down
        self.in_conv = nn.Conv2d(in_channels, mid, 1)
        self.resnets = nn.Sequential(*(AdapterResnetBlock(mid, 3) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(mid, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = _halve(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


class FullAdapter(nn.Module):
    """Pixel-unshuffle, ``conv_in`` (3x3), then one :class:`AdapterBlock` per level (``body``).

    ``(B, in_channels, H, W)`` -> ``[(B, channels[i], H / (f 2^i), W / (f 2^i))]``, ``f = downscale_factor``.
    """

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        ch, f = cfg.channels, cfg.downscale_factor
        self.downscale_factor = f
        self.conv_in = nn.Conv2d(cfg.in_channels * f * f, ch[0], 3, padding=1)
        self.body = nn.ModuleList(
            AdapterBlock(ch[max(i - 1, 0)], ch[i], cfg.num_res_blocks, down=i > 0) for i in range(len(ch))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv_in(F.pixel_unshuffle(x, self.downscale_factor))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class LightAdapter(nn.Module):
    """Pixel-unshuffle, then ``len(channels) + 1`` :class:`LightAdapterBlock` (``body``): the first
    maps the unshuffled ``in_channels * f^2`` channels to ``channels[0]``, the others each halve the
    resolution, the last keeping ``channels[-1]``.

    ``(B, in_channels, H, W)`` -> ``[(B, feature_channels[i], H / (f 2^i), W / (f 2^i))]``.
    """

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        f = cfg.downscale_factor
        widths = (cfg.in_channels * f * f, *cfg.feature_channels)
        self.downscale_factor = f
        self.body = nn.ModuleList(
            LightAdapterBlock(widths[i], widths[i + 1], cfg.num_res_blocks, down=i > 0)
            for i in range(cfg.num_levels)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.pixel_unshuffle(x, self.downscale_factor)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """The adapter ``F_AD``: ``adapter(C)`` -> one feature per UNet level (see the module docstring).

    ``C``: ``(B, in_channels, H, W)`` with H and W multiples of :attr:`total_downscale_factor`
    (64 for SD's full adapter: 512x512 -> features at 64, 32, 16, 8). Returns a list of
    ``num_levels`` tensors ``(B, feature_channels[i], H / (f 2^i), W / (f 2^i))``,
    ``f = downscale_factor``, ready for the UNet's ``down_intrablock_additional_residuals`` (scale
    them by a conditioning weight first if wanted). The submodule is ``adapter`` as in diffusers.
    """

    def __init__(self, config: T2IAdapterConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else T2IAdapterConfig()
        self.adapter = FullAdapter(config) if config.adapter_type == "full_adapter" else LightAdapter(config)

    @property
    def downscale_factor(self) -> int:
        """The pixel-unshuffle factor: how much smaller the first (finest) feature is than the condition."""
        return self.config.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        """How much smaller the last (coarsest) feature is than the condition (diffusers' definition)."""
        return self.config.total_downscale_factor

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    def feature_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The shapes :meth:`forward` returns for a ``(batch, in_channels, height, width)`` condition."""
        return [(batch, c, height // d, width // d)
                for c, d in zip(self.config.feature_channels, self.config.feature_downscale_factors)]

    def check_condition(self, cond: torch.Tensor, name: str = "cond") -> None:
        """Raise a ValueError naming ``name`` unless ``cond`` is a finite ``(B, in_channels, H, W)``
        tensor with H and W multiples of :attr:`total_downscale_factor`."""
        c, m = self.config.in_channels, self.total_downscale_factor
        if not isinstance(cond, torch.Tensor):
            raise ValueError(f"T2IAdapter: {name} must be a tensor (B, {c}, H, W), got {type(cond).__name__}")
        if cond.ndim != 4:
            raise ValueError(f"T2IAdapter: {name} must be 4-D (B, {c}, H, W), got shape {tuple(cond.shape)}")
        if cond.shape[1] != c:
            raise ValueError(
                f"T2IAdapter: {name} has {cond.shape[1]} channels, the adapter expects in_channels={c} "
                f"(shape {tuple(cond.shape)})"
            )
        h, w = cond.shape[2:]
        if h % m or w % m:
            raise ValueError(
                f"T2IAdapter: {name} has H x W = {h} x {w}; both must be multiples of {m} (total_downscale_factor = "
                f"downscale_factor {self.downscale_factor} x 2^{self.num_levels - 1}, for {self.num_levels} levels)"
            )
        if not torch.isfinite(cond).all():
            raise ValueError(f"T2IAdapter: {name} contains NaN or inf values")

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """``(B, in_channels, H, W) -> [F_c^1, ..., F_c^L]``, finest first (shapes: :meth:`feature_shapes`)."""
        self.check_condition(cond)
        return self.adapter(cond)


class MultiAdapter(nn.Module):
    """Several adapters, one condition each, their features summed with weights:
    ``F_c^i = sum_k w_k F_AD^k(C_k)^i`` for every level ``i``.

    The adapters may take conditions with different channel counts but must return features of the
    same widths and resolutions (checked here). ``adapters`` is an ``nn.ModuleList`` as in
    diffusers, so a diffusers ``MultiAdapter`` state dict (``adapters.k.adapter...``) loads as is.
    """

    def __init__(self, adapters: Sequence[T2IAdapter]):
        super().__init__()
        adapters = list(adapters)
        if not adapters:
            raise ValueError("MultiAdapter: adapters must hold at least one T2IAdapter, got none")
        ref = adapters[0].config
        for k, a in enumerate(adapters[1:], start=1):
            if (a.config.feature_channels, a.config.feature_downscale_factors) != (
                ref.feature_channels, ref.feature_downscale_factors
            ):
                raise ValueError(
                    "MultiAdapter: adapters must return features of the same shapes to be summed; adapters[0] gives "
                    f"widths {ref.feature_channels} at downscale factors {ref.feature_downscale_factors}, "
                    f"adapters[{k}] gives {a.config.feature_channels} at {a.config.feature_downscale_factors}"
                )
        self.adapters = nn.ModuleList(adapters)

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    @property
    def downscale_factor(self) -> int:
        return self.adapters[0].downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        return self.adapters[0].total_downscale_factor

    def forward(
        self, conds: Sequence[torch.Tensor], adapter_weights: Sequence[float] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``conds[k]``: ``(B, adapters[k].config.in_channels, H, W)``, one per adapter, all of the same
        B, H, W. ``adapter_weights``: ``K`` numbers ``w_k`` (default ``1/K`` each, as diffusers).
        Returns the per-level weighted sums, shaped like one adapter's features."""
        K = self.num_adapters
        if isinstance(conds, torch.Tensor) or not isinstance(conds, Sequence):
            raise ValueError(
                f"MultiAdapter: conds must be a list of {K} condition images (one per adapter), "
                f"got {type(conds).__name__}"
            )
        if len(conds) != K:
            raise ValueError(f"MultiAdapter: got {len(conds)} conds for {K} adapters; pass one condition per adapter")
        if adapter_weights is None:
            weights = [1.0 / K] * K
        elif isinstance(adapter_weights, torch.Tensor):  # kept as tensors, so learnable weights get gradients
            if adapter_weights.ndim != 1 or adapter_weights.shape[0] != K:
                raise ValueError(f"MultiAdapter: adapter_weights must be 1-D with {K} entries (one per adapter), "
                                 f"got shape {tuple(adapter_weights.shape)}")
            if not torch.isfinite(adapter_weights).all():
                raise ValueError(f"MultiAdapter: adapter_weights must be finite, got {adapter_weights.tolist()}")
            weights = list(adapter_weights.unbind())
        elif isinstance(adapter_weights, Sequence) and not isinstance(adapter_weights, str):
            weights = [float(w) for w in adapter_weights]
            if len(weights) != K:
                raise ValueError(f"MultiAdapter: got {len(weights)} adapter_weights for {K} adapters")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"MultiAdapter: adapter_weights must be finite, got {weights}")
        else:
            raise ValueError(f"MultiAdapter: adapter_weights must be {K} numbers, one per adapter, "
                             f"got {adapter_weights!r}")
        for k, c in enumerate(conds):
            self.adapters[k].check_condition(c, name=f"conds[{k}]")
            if c.shape[0] != conds[0].shape[0] or c.shape[2:] != conds[0].shape[2:]:
                raise ValueError(
                    f"MultiAdapter: conds[{k}] has batch and size {(c.shape[0], *c.shape[2:])}, conds[0] has "
                    f"{(conds[0].shape[0], *conds[0].shape[2:])}; their features could not be summed"
                )
        total: list[torch.Tensor] | None = None
        for w, adapter, c in zip(weights, self.adapters, conds):
            features = adapter.adapter(c)
            if total is None:
                total = [w * f for f in features]
            else:
                total = [t + w * f for t, f in zip(total, features)]
        return total


def t2i_adapter_sd15() -> T2IAdapter:
    """The SD 1.4/1.5 full adapter with 3 input channels (preset ``"t2i-adapter-sd15"``, 77,369,280 params)."""
    return T2IAdapter(T2IAdapterConfig.sd15())


def t2i_adapter_config_from_diffusers(config: Mapping[str, Any]) -> T2IAdapterConfig:
    """Our :class:`T2IAdapterConfig` from a diffusers ``T2IAdapter`` config (``model.config`` or a
    config.json dict); missing keys take diffusers' defaults, which are this dataclass's."""
    c, d = dict(config), T2IAdapterConfig()
    return T2IAdapterConfig(in_channels=c.get("in_channels", d.in_channels), channels=tuple(c.get("channels", d.channels)),
                            num_res_blocks=c.get("num_res_blocks", d.num_res_blocks),
                            downscale_factor=c.get("downscale_factor", d.downscale_factor),
                            adapter_type=c.get("adapter_type", d.adapter_type))


def t2i_adapter_from_diffusers_config(config: Mapping[str, Any]) -> T2IAdapter:
    """An (untrained) :class:`T2IAdapter` for a diffusers ``T2IAdapter`` config dict."""
    return T2IAdapter(t2i_adapter_config_from_diffusers(config))


def from_diffusers_t2i_adapter(model) -> T2IAdapter:
    """Convert a diffusers ``T2IAdapter`` (``full_adapter`` or ``light_adapter``) into ours with the
    same weights, loaded strictly (``full_adapter_xl`` is refused with a ValueError)."""
    from ..interop import load_state_dict

    cfg = t2i_adapter_config_from_diffusers(model.config)
    p = next(model.parameters())
    with torch.device(p.device):
        ours = T2IAdapter(cfg).to(p.dtype)
    return load_state_dict(ours, model.state_dict(), what="diffusers T2IAdapter")


def from_diffusers_multi_adapter(model) -> MultiAdapter:
    """Convert a diffusers ``MultiAdapter`` into ours (its adapters converted one by one, then the
    whole state dict loaded strictly)."""
    from ..interop import load_state_dict

    p = next(model.parameters())
    with torch.device(p.device):
        ours = MultiAdapter([T2IAdapter(t2i_adapter_config_from_diffusers(a.config)).to(p.dtype) for a in model.adapters])
    return load_state_dict(ours, model.state_dict(), what="diffusers MultiAdapter")
