"""Models trained with condition dropout for classifier-free guidance (chapter 06 trains them;
later chapters may reuse them through the store).

Ho & Salimans (2021), Algorithm 1: one network learns the conditional and the unconditional noise
prediction together. At every training step each example's condition is replaced, with probability
``p_uncond``, by a null condition; the loss is DDPM's L_simple on the result.

* ``digits-cfg-p0.1``, ``digits-cfg-p0.2``, ``digits-cfg-p0.5``: class-conditional 16x16 digits. The
  UNet of chapter 01 with ``num_class_embeds=11``: the ten digits and class 10, the null class.

The caption-conditional models of chapter 06 are chapter 04's text-to-image latent diffusion
models, one per caption dropout rate (``shapes-ldm-t2i``, ``-p0.2``, ``-p0.5``:
:data:`~diffusion_core.recipes.latent.T2I_RECIPES`); their null caption is the empty caption
``""``, the tokens ``<start> <end> <pad> ...`` (GLIDE's choice), so the unconditional model still
sees a well-formed token sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.digits import batches, digits
from ..models.unet import UNet2D
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile
from ..samplers.guidance import drop_condition
from ..store import Recipe, register
from ..train import TrainConfig, train
from .digits import diffusion_for, unet_config

NULL_CLASS = 10  # the digits' null class: labels 0-9 are digits, 10 means "no condition"
DIGIT_P_UNCONDS = (0.1, 0.2, 0.5)


def digits_recipe_name(p_uncond: float) -> str:
    return f"digits-cfg-p{p_uncond:g}"


# --------------------------------------------------------------------------------------------------
# Class-conditional digits
# --------------------------------------------------------------------------------------------------

def _digits_config(p_uncond: float):
    def config(p: Profile) -> dict[str, Any]:
        # smoke runs every code path; only the main model (p = 0.1) gets more than a token budget
        smoke_steps = 200 if p_uncond == DIGIT_P_UNCONDS[0] else 40
        return {
            "p_uncond": p_uncond, "null_class": NULL_CLASS, "num_classes": 10,
            "schedule": "linear", "T": 1000, "prediction": "eps", "variance": "fixed_large",
            "resolution": 16, "width": p.pick(smoke=16, cpu=32, gpu=64), "dropout": 0.1,
            "steps": p.pick(smoke=smoke_steps, cpu=800, gpu=15000),
            "batch_size": p.pick(smoke=64, cpu=64, gpu=256),
            "lr": p.pick(smoke=2e-3, cpu=1e-3, gpu=3e-4), "ema_decay": p.pick(smoke=0.99, cpu=0.995, gpu=0.9995),
            "seed": 0,
        }
    return config


def _digits_build(c: dict[str, Any]) -> UNet2D:
    torch.manual_seed(c["seed"])
    return UNet2D(unet_config(c["width"], c["resolution"], 1, c["dropout"], num_classes=c["num_classes"] + 1))


def digits_loss(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, y: torch.Tensor,
                p_uncond: float, null_class: int = NULL_CLASS, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Algorithm 1 of Ho & Salimans on a batch: drop each label to ``null_class`` with probability
    ``p_uncond``, then L_simple with the (possibly dropped) label as the condition."""
    y_in = drop_condition(y, null_class, p_uncond, generator=generator)  # c <- null with prob. p_uncond
    return diffusion.training_losses(model, x0, generator=generator,
                                     model_kwargs={"class_labels": y_in})["loss"].mean()


def _digits_train(model: UNet2D, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    x, y = digits("train", c["resolution"])
    diffusion = diffusion_for(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, batch):
        return digits_loss(m, diffusion, batch[0], batch[1], c["p_uncond"], c["null_class"], g)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(100, c["steps"] // 5),
                      cpu_amp=True, desc=f"class-conditional digits (p_uncond={c['p_uncond']:g})")
    res = train(model, loss_fn, batches(x, c["batch_size"], c["seed"], y), cfg, p)
    model.load_state_dict(res.ema.state_dict())  # the store keeps the EMA weights
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
            "amp": bool(p.amp)}


def _digits_recipe(p_uncond: float) -> Recipe:
    return register(Recipe(digits_recipe_name(p_uncond), 2, _digits_config(p_uncond), _digits_build, _digits_train,
                           f"class-conditional DDPM on 16x16 digits with condition dropout p_uncond={p_uncond:g} "
                           f"(class {NULL_CLASS} = null) for classifier-free guidance", process=diffusion_for))


DIGITS_CFG_P01 = _digits_recipe(0.1)
DIGITS_CFG_P02 = _digits_recipe(0.2)
DIGITS_CFG_P05 = _digits_recipe(0.5)
