"""Models trained with condition dropout for classifier-free guidance (chapter 06 trains them;
later chapters may reuse them through the store).

Ho & Salimans (2021), Algorithm 1: one network learns the conditional and the unconditional noise
prediction together. At every training step each example's condition is replaced, with probability
``p_uncond``, by a null condition; the loss is DDPM's L_simple on the result.

* ``digits-cfg-p0.1``, ``digits-cfg-p0.2``, ``digits-cfg-p0.5``: class-conditional 16x16 digits. The
  UNet of chapter 01 with ``num_class_embeds=11``: the ten digits and class 10, the null class.
* ``shapes-cfg-p0.2``: caption-conditional shapes-world scenes (single objects: "a large red circle
  at the top left"). A :class:`CaptionUNet`: a small CLIP-style text transformer over word tokens,
  trained jointly with a cross-attention UNet (:class:`~diffusion_core.models.unet_cond.UNet2DCondition`)
  that, as in GLIDE, also adds the caption's pooled state to its time embedding;
  the null caption is the empty caption ``""``, i.e. the tokens ``<start> <end> <pad> ...`` (GLIDE's
  choice), so the unconditional model still sees a well-formed token sequence. To train in minutes
  on a laptop, the model draws the scenes at half the world's resolution (16x16 means of 2x2 blocks
  at ``cpu``); :func:`to_world` shows its images at the world's resolution for the evaluator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.digits import batches, digits
from ..data.shapes import ShapesWorld
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.tokenizers import WordTokenizer
from ..models.unet import UNet2D
from ..models.unet_cond import CondUNetConfig, UNet2DCondition
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile
from ..samplers.guidance import drop_condition
from ..store import Recipe, register
from ..train import TrainConfig, train
from .digits import diffusion_for, unet_config

NULL_CLASS = 10  # the digits' null class: labels 0-9 are digits, 10 means "no condition"
DIGIT_P_UNCONDS = (0.1, 0.2, 0.5)
SHAPES_P_UNCOND = 0.2
NULL_CAPTION = ""


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
                           f"(class {NULL_CLASS} = null) for classifier-free guidance"))


DIGITS_CFG_P01 = _digits_recipe(0.1)
DIGITS_CFG_P02 = _digits_recipe(0.2)
DIGITS_CFG_P05 = _digits_recipe(0.5)


# --------------------------------------------------------------------------------------------------
# Caption-conditional shapes
# --------------------------------------------------------------------------------------------------

def shapes_world(c: dict[str, Any], seed: int | None = None) -> ShapesWorld:
    """The shapes world a caption model of config ``c`` is trained on (and evaluated on)."""
    return ShapesWorld(resolution=c["resolution"], seed=c["world_seed"] if seed is None else seed,
                       max_objects=c["max_objects"], split="train", n_paraphrases=0, n_heldout_paraphrases=0)


def caption_tokenizer(c: dict[str, Any]) -> WordTokenizer:
    """Word tokens over the whole shapes vocabulary (ids 0-3: pad, start, end, unk)."""
    return WordTokenizer(ShapesWorld.vocabulary(), c["context_length"])


class TextTimeUNet(UNet2DCondition):
    """:class:`~diffusion_core.models.unet_cond.UNet2DCondition` whose ``class_labels`` slot takes a
    float vector (B, 4 * block_out_channels[0]) added to the time embedding, as diffusers'
    ``class_embed_type="identity"`` does. GLIDE conditions its UNet on a caption this way *and* by
    cross-attention: the class embedding of ADM is replaced by a projection of the caption's
    final token state."""

    def _check_inputs(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                      class_labels: torch.Tensor | None) -> None:
        super()._check_inputs(x, encoder_hidden_states, None)
        temb = 4 * self.config.block_out_channels[0]
        if class_labels is not None and class_labels.shape != (x.shape[0], temb):
            raise ValueError(f"TextTimeUNet: class_labels must be a float tensor of shape ({x.shape[0]}, {temb}), "
                             f"got {tuple(class_labels.shape)}")

    def time_embed(self, x: torch.Tensor, t: torch.Tensor | float | int,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = super().time_embed(x, t)
        return emb if class_labels is None else emb + class_labels.to(emb.dtype)


class CaptionUNet(nn.Module):
    """eps_theta(x_t, t, caption), conditioned as GLIDE conditions on text: a text transformer
    (``text_encoder``, a small :class:`~diffusion_core.models.clip.CLIPTextModel` trained from
    scratch with the UNet) encodes the caption; the UNet (``unet``) cross-attends to its per-token
    states (B, N, D), and a projection of its pooled state (the end token's, (B, D)) is added to the
    time embedding (``caption_embedding``, in place of a class embedding).

    ``forward(x (B, 3, r, r), t (B,), input_ids (B, N)) -> eps (B, 3, r, r)``. For sampling, encode
    the captions once (:meth:`encode`: ``{"tokens", "pooled"}``) and call :meth:`denoise` at every step.
    """

    def __init__(self, text_config: CLIPTextConfig, unet_config: CondUNetConfig):
        super().__init__()
        self.text_encoder = CLIPTextModel(text_config)
        self.unet = TextTimeUNet(unet_config)
        self.caption_embedding = nn.Linear(text_config.hidden_size, 4 * unet_config.block_out_channels[0])

    def encode(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, N) token ids -> ``{"tokens": (B, N, D), "pooled": (B, D)}``, what the UNet reads."""
        out = self.text_encoder(input_ids)
        return {"tokens": out.last_hidden_state, "pooled": out.pooled}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, caption: dict[str, torch.Tensor]) -> torch.Tensor:
        """eps from x_t (B, 3, r, r), t (B,) and the encoded caption (:meth:`encode`)."""
        return self.unet(x, t, encoder_hidden_states=caption["tokens"],
                         class_labels=self.caption_embedding(caption["pooled"]))

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t, self.encode(input_ids))


def _shapes_config(p_uncond: float):
    def config(p: Profile) -> dict[str, Any]:
        max_objects = 1
        world = ShapesWorld(resolution=32, max_objects=max_objects, n_paraphrases=0, n_heldout_paraphrases=0)
        return {
            "p_uncond": p_uncond, "null_caption": NULL_CAPTION, "max_objects": max_objects, "world_seed": 6,
            # the world (and its evaluator) at `resolution`; the model draws it 2x smaller (2x2 means)
            "resolution": p.pick(smoke=32, cpu=32, gpu=64), "downsample": 2,
            "context_length": world.max_caption_words() + 2,
            "vocab_size": len(ShapesWorld.vocabulary()) + len(WordTokenizer.SPECIALS),
            "text_width": 64, "text_layers": 2, "text_heads": 4,
            "widths": p.pick(smoke=[16, 32, 32], cpu=[32, 64, 64], gpu=[64, 128, 128]), "heads": 4,
            "schedule": "linear", "T": 1000, "prediction": "eps", "variance": "fixed_large",
            "steps": p.pick(smoke=60, cpu=800, gpu=12000), "batch_size": p.pick(smoke=32, cpu=64, gpu=128),
            "lr": p.pick(smoke=2e-3, cpu=1e-3, gpu=3e-4), "ema_decay": p.pick(smoke=0.99, cpu=0.995, gpu=0.9995),
            "seed": 0,
        }
    return config


def model_resolution(c: dict[str, Any]) -> int:
    return c["resolution"] // c["downsample"]


def to_model(images: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
    """Scenes (B, 3, R, R) -> what the model learns, (B, 3, R/k, R/k): means of k x k blocks."""
    return F.avg_pool2d(images, c["downsample"])


def to_world(x: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
    """The model's images back at the world's resolution (each pixel a k x k block), for the evaluator."""
    return F.interpolate(x, scale_factor=c["downsample"], mode="nearest")


def shapes_unet_config(c: dict[str, Any]) -> CondUNetConfig:
    """16 -> 8 -> 4 (at ``cpu``), residual blocks everywhere, cross-attention to the caption at the
    4x4 level and in the middle (the cheapest place on a CPU; convolutions carry it to every pixel)."""
    return CondUNetConfig(
        sample_size=model_resolution(c), in_channels=3, out_channels=3, block_out_channels=tuple(c["widths"]),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1, cross_attention_dim=c["text_width"],
        num_attention_heads=c["heads"], use_linear_projection=True, norm_num_groups=8,
    )


def _shapes_build(c: dict[str, Any]) -> CaptionUNet:
    torch.manual_seed(c["seed"])
    text = CLIPTextConfig.tiny(vocab_size=c["vocab_size"], hidden_size=c["text_width"],
                               intermediate_size=2 * c["text_width"], num_hidden_layers=c["text_layers"],
                               num_attention_heads=c["text_heads"], max_position_embeddings=c["context_length"],
                               eos_token_id=WordTokenizer.end_id, projection_dim=None)
    return CaptionUNet(text, shapes_unet_config(c))


def shapes_diffusion(c: dict[str, Any]) -> GaussianDiffusion:
    """The process of the caption model: the digits' (linear schedule, T = 1000, eps)."""
    return diffusion_for(c)


def null_caption_ids(c: dict[str, Any]) -> torch.Tensor:
    """(context_length,) the token ids of the null caption ``""``: <start> <end> <pad> ..."""
    return caption_tokenizer(c).encode([c["null_caption"]])[0]


def caption_loss(model: CaptionUNet, diffusion: GaussianDiffusion, x0: torch.Tensor, ids: torch.Tensor,
                 null_ids: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1 with captions: each caption's tokens become the null caption's with probability
    ``p_uncond``; the text encoder and the UNet are trained together by L_simple."""
    ids_in = drop_condition(ids, null_ids.to(ids.device), p_uncond, generator=generator)
    return diffusion.training_losses(model, x0, generator=generator, model_kwargs={"input_ids": ids_in})["loss"].mean()


def _shapes_train(model: CaptionUNet, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    world, tok = shapes_world(c), caption_tokenizer(c)
    diffusion = shapes_diffusion(c)
    null_ids = null_caption_ids(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def stream():
        for scenes in world.batches(c["batch_size"], seed=c["seed"]):
            yield to_model(scenes.images, c), tok.encode(scenes.captions)

    def loss_fn(m, batch):
        return caption_loss(m, diffusion, batch[0], batch[1], null_ids, c["p_uncond"], g)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(100, c["steps"] // 5),
                      cpu_amp=True, desc=f"caption-conditional shapes (p_uncond={c['p_uncond']:g})")
    res = train(model, loss_fn, stream(), cfg, p)
    model.load_state_dict(res.ema.state_dict())
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
            "amp": bool(p.amp)}


SHAPES_CFG = register(Recipe(f"shapes-cfg-p{SHAPES_P_UNCOND:g}", 3, _shapes_config(SHAPES_P_UNCOND), _shapes_build,
                             _shapes_train,
                             "caption-conditional shapes scenes (one object) with a jointly trained text "
                             f"transformer; the caption is dropped to the empty caption with p={SHAPES_P_UNCOND:g}"))
