"""Digit diffusion models trained by fixed recipes (chapters 01-03 reuse them through the store).

``digits-ddpm`` is DDPM's setup in miniature: the linear schedule over T = 1000 steps, eps-prediction,
L_simple, fixed variance. ``digits-ddpm-vlb`` is the same network trained on the true bound at the
same budget (chapter 01's comparison).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.digits import batches, digits
from ..models.unet import UNet2D, UNetConfig
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile
from ..store import Recipe, register
from ..train import TrainConfig, train


def unet_config(width: int = 32, resolution: int = 16, out_channels: int = 1, dropout: float = 0.1,
                num_classes: int | None = None) -> UNetConfig:
    """The book's digit UNet: 16 -> 8 -> 4 with widths (w, 2w, 2w), one residual block per level,
    self-attention at 4x4 and in the middle, scale-shift norm (ADM). About 1M parameters at w = 32."""
    return UNetConfig(
        sample_size=resolution, in_channels=1, out_channels=out_channels,
        block_out_channels=(width, 2 * width, 2 * width), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        dropout=dropout, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        class_embed_type=None, num_class_embeds=num_classes,
    )


def diffusion_for(config: dict[str, Any]) -> GaussianDiffusion:
    """The process a stored digit model was trained with."""
    return GaussianDiffusion.from_schedule(config["schedule"], config["T"], prediction=config["prediction"],
                                           variance=config["variance"])


def _config(loss: str, variance: str = "fixed_large", schedule: str = "linear"):
    def config(p: Profile) -> dict[str, Any]:
        return {
            "loss": loss, "schedule": schedule, "T": 1000, "prediction": "eps", "variance": variance,
            # cpu: no dropout (a 1,000-step run underfits; dropout cost 11% of a step) and 1,000 steps,
            # so that chapter 01 trains both of its models in its 15-minute budget. smoke keeps
            # dropout so CI runs that code path; gpu trains 20x longer and uses DDPM's 0.1.
            "resolution": 16, "width": p.pick(smoke=16, cpu=32, gpu=64),
            "dropout": p.pick(smoke=0.1, cpu=0.0, gpu=0.1),
            "steps": p.pick(smoke=150, cpu=1000, gpu=20000), "batch_size": p.pick(smoke=64, cpu=128, gpu=128),
            "lr": p.pick(smoke=1e-3, cpu=1e-3, gpu=3e-4), "ema_decay": p.pick(smoke=0.99, cpu=0.999, gpu=0.9995),
            "seed": 0,
        }
    return config


def _build(c: dict[str, Any]) -> UNet2D:
    torch.manual_seed(c["seed"])
    out = 2 if c["variance"] == "learned_range" else 1
    return UNet2D(unet_config(c["width"], c["resolution"], out, c["dropout"]))


def _train(model: UNet2D, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    x, _ = digits("train", c["resolution"])
    diffusion = diffusion_for(c)
    g = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, x0):
        return diffusion.training_losses(m, x0, loss=c["loss"], generator=g)["loss"].mean()

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(200, c["steps"] // 5),
                      cpu_amp=True, desc=f"digits DDPM ({c['loss']})")
    res = train(model, loss_fn, batches(x, c["batch_size"], c["seed"]), cfg, p)
    model.load_state_dict(res.ema.state_dict())  # the store keeps the EMA weights
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
            "amp": bool(p.amp)}


DIGITS_DDPM = register(Recipe("digits-ddpm", 3, _config("simple"), _build, _train,
                              "DDPM on 16x16 digits: linear schedule, T=1000, eps-prediction, L_simple",
                              process=diffusion_for))
DIGITS_DDPM_VLB = register(Recipe("digits-ddpm-vlb", 4, _config("vlb"), _build, _train,
                                  "the same UNet and budget trained on the true variational bound L_vlb",
                                  process=diffusion_for))
