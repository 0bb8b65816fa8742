"""Imagen on the shapes world (chapter 13; Saharia et al. 2022), trained by fixed recipes and cached.

**Finding 1: a frozen pretrained text encoder** (Sec. 2.1). One text-to-image pixel model
(:class:`~diffusion_core.models.imagen.ImagenTextUNet`, 16x16 at ``smoke`` and ``cpu``, 32x32 at
``gpu``) on one-object scenes, in three recipes that differ only in where the caption's token states
come from:

* ``shapes-imagen-minilm``: the frozen all-MiniLM-L6-v2 (:func:`~diffusion_core.models.bert.load_minilm`,
  a 6-layer BERT pretrained on text alone, 384 wide): the stand-in for Imagen's frozen T5-XXL. Its
  token states are computed once per distinct text and kept in memory (as the paper notes, a
  frozen encoder's embeddings can be computed offline);
* ``shapes-imagen-clip``: the frozen text tower of chapter 05's ``shapes-clip`` (trained
  contrastively on this world's training captions): Imagen's CLIP alternative;
* ``shapes-imagen-scratch``: a text transformer trained from scratch with the diffusion model (as
  GLIDE's, chapter 11), over the words of the *training* text (a held-out word is ``<unk>`` to it).

All three train on the captions and the training paraphrases of the same scenes; the world's
held-out paraphrases (templates and synonyms training never uses: :func:`evaluation_texts`) test
the generalisation the paper claims. Captions are dropped to the empty caption ``""`` (through the
same encoder) with probability ``p_uncond = 0.1`` for classifier-free guidance.

**Finding 2: a cascade with noise conditioning augmentation** (Sec. 2.4). ``shapes-imagen-sr``
(16 -> 32; 32 -> 64 at ``gpu``): :class:`~diffusion_core.models.imagen.ImagenSRUNet`, given the
low-resolution image upsampled bicubically and noised to a random augmentation level ``a`` (uniform
in [0, ``aug_max``]) by the forward process of the continuous cosine schedule,
``z_a = sqrt(alpha_bar(a)) z + sqrt(1 - alpha_bar(a)) eps`` (:func:`augment`), and told ``a``.
``shapes-imagen-sr-noaug`` is the same with ``aug_max = 0``: the low-resolution input is never
noised. :func:`cascade_sample` runs the base model, then the super-resolution model at a chosen
sampling-time ``aug_level``. Neither SR model reads the caption (Imagen's do; on one-object scenes
the 16 px image already says everything the caption does), which keeps the cascade cheap. (A check
at the smoke size, 200 steps of ``shapes-imagen-sr-noaug``: eps MSE on 64 held-out scenes 0.087 with
their own low-resolution images, 0.172 with another scene's, 0.138 with zeros: the model reads its
input; its 50-step samples put the right objects in the right places but stay noisy at that budget.)

**Finding 3: dynamic thresholding** (Sec. 2.3): :func:`sample` takes ``threshold="none" /
"static" / "dynamic"`` (:mod:`diffusion_core.process.thresholding`), :func:`guidance_sweep` samples
every method at every guidance weight from the same noise, and :func:`saturated_fraction` counts
the saturated pixels of the sampler's output before any final clipping.

The process (all recipes): GLIDE's cosine schedule, T = 1000, eps-prediction with a learned
variance (Improved DDPM's ``learned_range``, trained by L_hybrid with lambda = 0.001), as DeepFloyd IF
(the public Imagen-style cascade) has at both stages; sampling is ancestral in ``steps`` respaced
steps (Improved DDPM found the learned variance keeps few-step sampling good; ``"variance":
"fixed_small"`` in the config gives the L_simple model instead). A smoke-size model trained for 500
steps still leaves visible noise in 50-step samples (so does ``shapes-glide`` at that size): judge
the recipes at ``cpu``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes import Scenes, ShapesWorld
from ..models.clip import CLIPTextConfig
from ..models.imagen import ImagenSRUNet, ImagenTextUNet
from ..models.tokenizers import WordTokenizer
from ..models.unet_cond import CondUNetConfig
from ..process.gaussian import GaussianDiffusion
from ..process.thresholding import METHODS, ThresholdLike, resolve_threshold
from ..profiles import Profile, current
from ..samplers.ancestral import ddpm_sample
from ..samplers.guidance import cfg_eps, check_scale, drop_condition
from ..store import Recipe, Stored, device_of, load, path_for, recipe, register
from ..train import TrainConfig, train
from . import glide
from .latent import NULL_CAPTION, LatentCodes, _training_set, caption_batches

MAX_OBJECTS = 1
# The cpu budget, from seconds per training step measured at the cpu sizes on the 2-core machine (torch
# with 2 threads, other jobs sharing it): the three base models 3 x 1,200 x 0.11 s = 396 s, the two SR
# models 2 x 600 x 0.137 s = 164 s, MiniLM's token states of the 16,841 distinct training texts about
# 40 s: 10 minutes, shapes-clip cached by chapter 05, leaving chapter 13 about 5 minutes to sample. On
# one thread beside two other jobs a base step took 0.19-0.20 s and the MiniLM states 66 s. (The first
# cpu budget, 1,800 and 900 steps, came to about 27 minutes for training alone at one thread there;
# its MiniLM model still placed the object in the right grid cell no more often than chance, 0.18 of
# 100 captions, with colour 0.97 and size 0.90 right: position is what a small budget learns last.)
CPU_SECONDS_PER_STEP = {"base": 0.11, "sr": 0.137}
CPU_BUDGET_SECONDS = {"base": 3 * 1200 * CPU_SECONDS_PER_STEP["base"], "sr": 2 * 600 * CPU_SECONDS_PER_STEP["sr"],
                      "minilm_states": 40}
ENCODERS = ("minilm", "clip", "scratch")
RECIPE_NAMES = {"minilm": "shapes-imagen-minilm", "clip": "shapes-imagen-clip", "scratch": "shapes-imagen-scratch"}
MINILM_LENGTH = 20   # WordPiece ids per text ([CLS] ... [SEP], padded): the longest one-object text has 17
POOL_HEADS = 4       # heads of the attention pooling into the time embedding


# ------------------------------------------------------------------------------------------------
# The text encoders and their token states
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def minilm(device: str = "cpu"):
    """The frozen all-MiniLM-L6-v2 (:class:`~diffusion_core.models.bert.SentenceEncoder`), loaded once
    per process and device (eval mode, no gradients)."""
    from ..models.bert import load_minilm

    return load_minilm(device)


def scratch_tokenizer(c: dict[str, Any]) -> WordTokenizer:
    """The scratch encoder's words: those of the training text only; a held-out word is ``<unk>``."""
    return WordTokenizer(ShapesWorld.vocabulary(heldout=False), c["context_length"], unknown="unk")


_CLIP_TEXT: dict[str, Any] = {}  # store file -> (CLIP model, tokenizer): read once per process


def _clip_text(c: dict[str, Any]):
    """(the frozen shapes-clip, its tokenizer) of a ``shapes-imagen-clip`` config, from the store."""
    from .clip import tokenizer_for

    r = recipe(c["text_encoder"]["recipe"])
    wanted = {k: v for k, v in c["text_encoder"].items() if k not in ("recipe", "version")}
    if r.version != c["text_encoder"]["version"] or r.config(Profile(c["profile"], torch.device("cpu"))) != wanted:
        raise ValueError(f"{r.name} has changed (version or config) since this Imagen model was configured with it")
    key = str(path_for(r, c["profile"], wanted))
    if key not in _CLIP_TEXT:
        stored = load(r.name, c["profile"], verbose=False)
        _CLIP_TEXT[key] = (stored.model.eval().requires_grad_(False), tokenizer_for(stored.config))
    return _CLIP_TEXT[key]


@torch.no_grad()
def frozen_states(c: dict[str, Any], texts: Sequence[str], batch: int = 256,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The token states of a frozen encoder for ``texts``: ``(N, L, D)`` float32 and the mask ``(N, L)``
    bool, on the CPU, L fixed by the encoder (MiniLM: :data:`MINILM_LENGTH`; CLIP: its context length),
    so a text's states never depend on the batch it came in. MiniLM runs on ``device``."""
    kind, texts = c["encoder"], list(texts)
    states, masks = [], []
    if kind == "minilm":
        enc = minilm(str(torch.device(device)))
        dev = next(enc.model.parameters()).device
        for i in range(0, len(texts), batch):
            tok = enc.tokenizer(texts[i:i + batch], max_length=MINILM_LENGTH, padding="max_length")
            out = enc.model(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev),
                            token_type_ids=tok.token_type_ids.to(dev))
            states.append(out.last_hidden_state.float().cpu())
            masks.append(tok.attention_mask.bool())
    elif kind == "clip":
        model, tok = _clip_text(c)
        dev = next(model.parameters()).device
        for i in range(0, len(texts), batch):
            ids = tok.encode(texts[i:i + batch]).to(dev)
            states.append(model.text_model(ids).last_hidden_state.float().cpu())
            masks.append((ids != tok.pad_id).cpu())
    else:
        raise ValueError(f"the {kind!r} encoder is not frozen: the model encodes input_ids itself")
    return torch.cat(states), torch.cat(masks)


@dataclass
class TextTable:
    """Every distinct text of a training set, encoded once: ``texts`` and ``index`` (text -> row);
    for a frozen encoder its ``tokens`` (U, L, D) (float16, to halve the memory) and ``mask`` (U, L);
    for the scratch encoder the ``ids`` (U, L). :meth:`lookup` gives a batch's model inputs."""

    texts: list[str]
    index: dict[str, int]
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def lookup(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = rows.cpu()
        if self.ids is not None:
            return {"input_ids": self.ids[rows]}
        return {"tokens": self.tokens[rows].float(), "mask": self.mask[rows]}


def text_table(c: dict[str, Any], texts: Sequence[str], device: torch.device | str = "cpu") -> TextTable:
    """The :class:`TextTable` of the distinct ``texts`` for config ``c``'s encoder (a frozen one run on
    ``device``; the table itself stays on the CPU)."""
    texts = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(texts)}
    if c["encoder"] == "scratch":
        return TextTable(texts, index, ids=scratch_tokenizer(c).encode(texts))
    tokens, mask = frozen_states(c, texts, device=device)
    return TextTable(texts, index, tokens=tokens.half(), mask=mask)


def encode_captions(stored: Stored, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """The model inputs for ``captions`` (on the model's device): ``tokens`` and ``mask`` of the frozen
    encoder the model was trained with, or ``input_ids`` for the scratch encoder."""
    captions = glide.check_captions(captions)
    c, dev = stored.config, device_of(stored.model)
    if c["encoder"] == "scratch":
        return {"input_ids": scratch_tokenizer(c).encode(captions).to(dev)}
    tokens, mask = frozen_states(c, captions, device=dev)
    return {"tokens": tokens.to(dev), "mask": mask.to(dev)}


# ------------------------------------------------------------------------------------------------
# The base model: shapes-imagen-{minilm,clip,scratch}
# ------------------------------------------------------------------------------------------------

def _diffusion_config() -> dict[str, Any]:
    return {"schedule": "cosine", "T": 1000, "variance": "learned_range", "loss": "hybrid", "hybrid_lambda": 1e-3}


def _loss(diffusion: GaussianDiffusion, c: dict[str, Any]) -> dict[str, Any]:
    """The ``training_losses`` options of a config: L_hybrid with a learned variance, else L_simple."""
    d = c["diffusion"]
    if diffusion.variance == "learned_range":
        return {"loss": d.get("loss", "hybrid"), "hybrid_lambda": d.get("hybrid_lambda", 1e-3)}
    return {"loss": "simple"}


def out_channels(c: dict[str, Any]) -> int:
    """eps (3), and the variance's v (3 more) when it is learned."""
    return 6 if c["diffusion"]["variance"] == "learned_range" else 3


def diffusion_for(c: dict[str, Any]) -> GaussianDiffusion:
    return glide.diffusion_for(c)


def _base_config(encoder: str):
    def config(p: Profile) -> dict[str, Any]:
        res = glide.resolution_for(p)
        c: dict[str, Any] = {
            "encoder": encoder, "profile": p.name, "resolution": res,
            "n_train": p.pick(smoke=512, cpu=8000, gpu=16000), "paraphrases": True,
            "diffusion": _diffusion_config(),
            "width": p.pick(smoke=16, cpu=24, gpu=64), "cross_dim": p.pick(smoke=32, cpu=64, gpu=128),
            # per level, highest resolution first: added-K/V attention (the middle block always has it)
            "attention": [False, True, True], "coord_channels": True, "skip_scale": 2 ** -0.5,
            "p_uncond": 0.1,
            # cpu: 0.11 s per step on the 2-core machine (0.145-0.165 on one thread; measured with MiniLM's
            # 384-wide tokens, the other encoders alike): 1,200 steps in about 2.2 minutes (CPU_BUDGET_SECONDS)
            "steps": p.pick(smoke=30, cpu=1200, gpu=20000), "batch_size": p.pick(smoke=16, cpu=32, gpu=128),
            "lr": p.pick(smoke=1e-3, cpu=1e-3, gpu=3e-4), "ema_decay": p.pick(smoke=0.99, cpu=0.999, gpu=0.9995),
            "seed": 0,
        }
        if encoder == "minilm":
            c.update(text_dim=384, context_length=MINILM_LENGTH)
        elif encoder == "clip":
            r = recipe("shapes-clip")
            cc = r.config(p)
            c.update(text_dim=cc["text_width"], context_length=cc["context_length"],
                     text_encoder={"recipe": r.name, "version": r.version, **cc})
        else:
            c.update(text_dim=p.pick(smoke=32, cpu=64, gpu=128), text_layers=p.pick(smoke=1, cpu=2, gpu=4),
                     text_heads=4, context_length=ShapesWorld(res, max_objects=MAX_OBJECTS).max_caption_words() + 2)
        return c
    return config


def base_unet_config(c: dict[str, Any]) -> CondUNetConfig:
    """The base UNet of a config: widths (w, 2w, 2w), scale-shift residual blocks that also resample,
    added-K/V attention (heads of width w) at ``c["attention"]`` and in the middle, the text tokens
    projected from ``text_dim`` to ``cross_dim`` (``encoder_hid_dim``) and attention-pooled into the
    time embedding (``addition_embed_type="text"``), skips scaled by ``skip_scale`` (Efficient U-Net)."""
    w, attn = c["width"], c["attention"]
    return CondUNetConfig(
        sample_size=c["resolution"], in_channels=3 + (2 if c["coord_channels"] else 0), out_channels=out_channels(c),
        block_out_channels=(w, 2 * w, 2 * w),
        down_block_types=tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn),
        up_block_types=tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=1, cross_attention_dim=c["cross_dim"],
        attention_head_dim=w, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        encoder_hid_dim=c["text_dim"], encoder_hid_dim_type="text_proj", addition_embed_type="text",
        addition_embed_type_num_heads=POOL_HEADS, skip_scale=c["skip_scale"],
    )


def build_base(c: dict[str, Any]) -> ImagenTextUNet:
    torch.manual_seed(c["seed"])
    text = None
    if c["encoder"] == "scratch":
        tok = scratch_tokenizer(c)
        text = CLIPTextConfig.tiny(vocab_size=tok.vocab_size, max_position_embeddings=c["context_length"],
                                   hidden_size=c["text_dim"], intermediate_size=4 * c["text_dim"],
                                   num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"],
                                   eos_token_id=tok.end_id, projection_dim=None, hidden_act="gelu")
    return ImagenTextUNet(base_unet_config(c), c["coord_channels"], text, pad_id=WordTokenizer.pad_id)


def base_loss(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, rows: torch.Tensor,
              table: TextTable, c: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """The diffusion loss (L_hybrid, or L_simple with a fixed variance) with classifier-free guidance's
    caption dropout: each text row becomes the empty caption's with probability ``c["p_uncond"]`` (Ho &
    Salimans' Algorithm 1), then the model gets that text's token states (or ids) from ``table``."""
    rows = drop_condition(rows, table.index[NULL_CAPTION], c["p_uncond"], generator)
    kw = {k: v.to(x0.device) for k, v in table.lookup(rows).items()}
    return diffusion.training_losses(model, x0, generator=generator, model_kwargs=kw,
                                     **_loss(diffusion, c))["loss"].mean()


def _metrics(res: Any, c: dict[str, Any]) -> dict[str, Any]:
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "first_loss": round(res.losses[0], 5),
            "train_seconds": round(res.seconds, 1), "steps": c["steps"], "batch_size": c["batch_size"]}


def train_base(model: ImagenTextUNet, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    """Train ``model`` by the recipe ``c``; a frozen encoder's token states are computed first, once per
    distinct text (caption, training paraphrase, and the empty caption); the store keeps the EMA weights."""
    data = _training_set(c["resolution"], c["n_train"], MAX_OBJECTS)
    per_scene = [[cap, *(par if c["paraphrases"] else [])] for cap, par in zip(data.captions, data.paraphrases)]
    V = min(len(t) for t in per_scene)
    start = time.perf_counter()
    table = text_table(c, [NULL_CAPTION] + [t for row in per_scene for t in row[:V]], p.device)
    encode_seconds = time.perf_counter() - start
    rows = torch.tensor([[table.index[t] for t in row[:V]] for row in per_scene], dtype=torch.long)  # (N, V)
    diffusion = diffusion_for(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, batch):
        return base_loss(m, diffusion, batch[0], batch[1], table, c, g)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(100, c["steps"] // 5),
                      desc=f"Imagen base ({c['encoder']} text encoder)")
    res = train(model, loss_fn, caption_batches(LatentCodes(data.pixels, None), rows, c["batch_size"], c["seed"]),
                cfg, p)
    model.load_state_dict(res.ema.state_dict())
    return {**_metrics(res, c), "distinct_texts": len(table.texts), "encode_seconds": round(encode_seconds, 1)}


def _base_recipe(encoder: str, what: str) -> Recipe:
    return register(Recipe(
        RECIPE_NAMES[encoder], 1, _base_config(encoder), build_base, train_base,
        f"Imagen-style text-to-image pixel model on one-object shapes scenes (16x16 cpu, 32x32 gpu) conditioned on "
        f"{what}: token states into every attention layer, pooled into the time embedding; captions dropped p=0.1"))


SHAPES_IMAGEN_MINILM = _base_recipe("minilm", "the frozen pretrained language model all-MiniLM-L6-v2")
SHAPES_IMAGEN_CLIP = _base_recipe("clip", "the frozen text tower of shapes-clip (chapter 05)")
SHAPES_IMAGEN_SCRATCH = _base_recipe("scratch", "a text transformer trained from scratch with it")


# ------------------------------------------------------------------------------------------------
# The super-resolution model: shapes-imagen-sr(-noaug)
# ------------------------------------------------------------------------------------------------

def aug_alpha_bar(level: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """alpha_bar(a) of the continuous cosine schedule (Nichol & Dhariwal eq. 17) at levels a in [0, 1]:
    ``cos^2(((a + s) / (1 + s)) pi / 2) / cos^2((s / (1 + s)) pi / 2)``; exactly 1 at a = 0, 0 at a = 1."""
    f = torch.cos((level.double() + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return torch.where(level == 0, torch.ones_like(f), f.clamp(0.0, 1.0)).float()


def check_aug_level(aug_level: Any) -> float:
    if isinstance(aug_level, bool) or not isinstance(aug_level, (int, float)) or not 0.0 <= float(aug_level) <= 1.0:
        raise ValueError(f"aug_level must be a number in [0, 1] (0: the low-resolution image unchanged), got {aug_level!r}")
    return float(aug_level)


def upsample(low: torch.Tensor, resolution: int) -> torch.Tensor:
    """The low-resolution images (B, 3, r, r) upsampled bicubically to (B, 3, R, R) (not clamped)."""
    return F.interpolate(low.float(), size=(resolution, resolution), mode="bicubic", align_corners=False)


def augment(low_up: torch.Tensor, level: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise conditioning augmentation: ``z_a = sqrt(alpha_bar(a)) z + sqrt(1 - alpha_bar(a)) eps`` per
    sample, ``level`` (B,) in [0, 1]; where a = 0 the image is returned unchanged (bit for bit)."""
    ab = aug_alpha_bar(level.to(low_up.device)).view(-1, 1, 1, 1)
    eps = torch.randn(low_up.shape, generator=generator,
                      device=generator.device if generator is not None else low_up.device)
    noised = ab.sqrt() * low_up + (1 - ab).sqrt() * eps.to(low_up)
    return torch.where(level.view(-1, 1, 1, 1).to(low_up.device) == 0, low_up, noised)


def _sr_config(aug_max: float):
    def config(p: Profile) -> dict[str, Any]:
        low = glide.resolution_for(p)
        return {
            "resolution": 2 * low, "low_resolution": low, "n_train": p.pick(smoke=512, cpu=8000, gpu=16000),
            "diffusion": _diffusion_config(), "width": p.pick(smoke=16, cpu=16, gpu=64), "skip_scale": 2 ** -0.5,
            # training levels a ~ U[0, aug_max]; Imagen samples them from [0, 1], we stop at 0.5 (cosine
            # alpha_bar 0.5: noise std 0.7) since useful sampling-time levels are small
            "aug_max": aug_max,
            # cpu: 0.137 s per step on the 2-core machine (0.19-0.24 on one thread): 600 steps in 1.4 minutes
            "steps": p.pick(smoke=60, cpu=600, gpu=10000), "batch_size": p.pick(smoke=16, cpu=32, gpu=64),
            "lr": p.pick(smoke=1e-3, cpu=1e-3, gpu=3e-4), "ema_decay": p.pick(smoke=0.99, cpu=0.999, gpu=0.9995),
            "seed": 0,
        }
    return config


def sr_unet_config(c: dict[str, Any]) -> CondUNetConfig:
    """The SR UNet: widths (w, 2w, 2w), scale-shift residual blocks that resample, no attention but
    the middle's self-attention (Imagen's Efficient U-Net drops it at high resolution), 6 input channels
    (x_t, the upsampled low-resolution image), the augmentation level as a timestep-like class label."""
    w = c["width"]
    return CondUNetConfig(
        sample_size=c["resolution"], in_channels=6, out_channels=out_channels(c), block_out_channels=(w, 2 * w, 2 * w),
        down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3,
        mid_block_type="UNetMidBlock2D", layers_per_block=1, cross_attention_dim=None, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", class_embed_type="timestep", skip_scale=c["skip_scale"],
    )


def build_sr(c: dict[str, Any]) -> ImagenSRUNet:
    torch.manual_seed(c["seed"])
    return ImagenSRUNet(sr_unet_config(c))


def sr_inputs(x0: torch.Tensor, c: dict[str, Any], generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SR model's conditioning for high-resolution images ``x0`` (B, 3, R, R): the low-resolution
    image (2x2 area average to r = R/2, then bicubic back to R), noised to levels a ~ U[0, aug_max]
    (all 0, and no noise, when ``aug_max`` is 0). Returns (low_res (B, 3, R, R), levels (B,))."""
    low = upsample(F.avg_pool2d(x0.float(), x0.shape[-1] // c["low_resolution"]), c["resolution"]).to(x0)
    if c["aug_max"] == 0:
        return low, torch.zeros(x0.shape[0], device=x0.device)
    gen_device = generator.device if generator is not None else x0.device
    levels = (torch.rand(x0.shape[0], generator=generator, device=gen_device) * c["aug_max"]).to(x0.device)
    return augment(low, levels, generator), levels


def sr_loss(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, c: dict[str, Any],
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The diffusion loss of the SR model on high-resolution images ``x0``, given :func:`sr_inputs`."""
    low, levels = sr_inputs(x0, c, generator)
    return diffusion.training_losses(model, x0, generator=generator, **_loss(diffusion, c),
                                     model_kwargs={"low_res": low, "aug_level": levels})["loss"].mean()


def train_sr(model: ImagenSRUNet, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    data = _training_set(c["resolution"], c["n_train"], MAX_OBJECTS)
    diffusion = diffusion_for(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, x0):
        return sr_loss(m, diffusion, x0, c, g)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(100, c["steps"] // 5),
                      desc=f"Imagen super-resolution {c['low_resolution']}->{c['resolution']} (aug_max {c['aug_max']})")
    res = train(model, loss_fn, LatentCodes(data.pixels, None).batches(c["batch_size"], c["seed"]), cfg, p)
    model.load_state_dict(res.ema.state_dict())
    return _metrics(res, c)


SHAPES_IMAGEN_SR = register(Recipe(
    "shapes-imagen-sr", 1, _sr_config(0.5), build_sr, train_sr,
    "Imagen-style super-resolution 16->32 (32->64 gpu) on one-object shapes scenes, conditioned on the bicubically "
    "upsampled low-resolution image with noise conditioning augmentation (levels U[0, 0.5], told to the model)"))
SHAPES_IMAGEN_SR_NOAUG = register(Recipe(
    "shapes-imagen-sr-noaug", 1, _sr_config(0.0), build_sr, train_sr,
    "shapes-imagen-sr without noise conditioning augmentation: the low-resolution input is never noised"))


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def _check_stored(stored: Stored, kind: type, what: str) -> None:
    if not isinstance(stored, Stored) or not isinstance(stored.model, kind):
        got = type(stored.model).__name__ if isinstance(stored, Stored) else type(stored).__name__
        raise ValueError(f"{what} must be a stored {kind.__name__} (from load('...')), got {got}")


@torch.no_grad()
def sample(stored: Stored, captions: Sequence[str], *, scale: float = 3.0, threshold: ThresholdLike = "static",
           steps: int = 50, seed: int = 0, batch: int = 250, clamp: bool = True, progress: bool = False,
           profile: Profile | None = None) -> torch.Tensor:
    """Images (N, 3, r, r) of a base model for ``captions`` (N): ancestral sampling in ``steps`` respaced
    steps with classifier-free guidance at weight ``scale`` (Imagen's w, GLIDE's s: 1 = the conditional
    model), x0_hat treated at every step by ``threshold`` (``"none"``, ``"static"``, ``"dynamic"``: Imagen's
    99.5th percentile, or a :class:`~diffusion_core.process.thresholding.Threshold`). ``clamp=False``
    returns the sampler's output as it is (beyond [-1, 1] without thresholding: what
    :func:`saturated_fraction` reads); the noise depends only on ``seed`` and N."""
    _check_stored(stored, ImagenTextUNet, "stored")
    captions = glide.check_captions(captions)
    scale = check_scale(scale)
    resolve_threshold(threshold)  # a bad choice fails before any work
    profile = profile or current()
    model, c = stored.model.eval(), stored.config
    dev, R = device_of(model), c["resolution"]
    diffusion = glide.respaced(c, steps)
    g = torch.Generator(device=dev).manual_seed(seed)
    null = encode_captions(stored, [NULL_CAPTION])
    out = []
    for i in range(0, len(captions), batch):
        caps = captions[i:i + batch]
        x_T = torch.randn(len(caps), 3, R, R, generator=g, device=dev)
        cond = encode_captions(stored, caps)

        def eps(x, t, cond=cond):
            # eps_hat = eps(x_t, "") + w (eps(x_t, c) - eps(x_t, ""))
            # (a learned variance's v channels come from the conditional output)
            return cfg_eps(lambda xx, tt, cc: model(xx, tt, **cc).float(), x, t, cond, null, scale, eps_channels=3)

        with profile.autocast():
            x0 = ddpm_sample(eps, diffusion, x_T, threshold=threshold, generator=g, progress=progress).float()
        out.append((x0.clamp(-1, 1) if clamp else x0).cpu())
    return torch.cat(out)


def saturated_fraction(images: torch.Tensor, tolerance: float = 0.0) -> float:
    """The fraction of values (over pixels and channels) of ``images`` (sampler outputs *before* any
    final clipping) that are saturated: ``|x| >= 1 - tolerance``. ``tolerance=0``: at or beyond the
    data range (what static clipping pins to +-1, what no clipping leaves outside it); ``1 / 255``:
    the values an 8-bit picture shows as 0 or 255. Real shapes scenes have some (white objects, the
    full channels of blue, yellow and orange): compare with the fraction of real images."""
    if not torch.is_tensor(images) or not images.is_floating_point() or images.numel() == 0:
        raise ValueError("images must be a non-empty float tensor")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance!r}")
    return float((images.float().abs() >= 1 - tolerance).float().mean())


def guidance_sweep(stored: Stored, captions: Sequence[str], weights: Sequence[float] = (1, 3, 5, 10, 20),
                   methods: Sequence[str] = METHODS, *, steps: int = 50, seed: int = 0, progress: bool = False
                   ) -> dict[str, dict[float, dict[str, Any]]]:
    """Finding 3: for every thresholding method and guidance weight, the samples (from the same noise)
    ``{"images": (N, 3, r, r) clamped to [-1, 1], "saturated": saturated_fraction(before clamping)}``,
    as ``result[method][w]``."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not len(methods):
        raise ValueError(f"methods must be among {METHODS}, got {list(methods)}")
    weights = [check_scale(w) for w in weights]
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for m in methods:
        out[m] = {}
        for w in weights:
            raw = sample(stored, captions, scale=w, threshold=m, steps=steps, seed=seed, clamp=False, progress=progress)
            out[m][w] = {"images": raw.clamp(-1, 1), "saturated": saturated_fraction(raw)}
    return out


@torch.no_grad()
def super_resolve(sr: Stored, low: torch.Tensor, aug_level: float = 0.0, *, steps: int = 50, seed: int = 0,
                  threshold: ThresholdLike = "static", batch: int = 250, progress: bool = False,
                  profile: Profile | None = None) -> torch.Tensor:
    """The SR model's images (N, 3, R, R) in [-1, 1] for low-resolution images ``low`` (N, 3, r, r) in
    [-1, 1]: the upsampled ``low`` is noised to ``aug_level`` (the same augmentation as in training;
    0: unchanged) and the model, told the level, samples ancestrally in ``steps`` respaced steps."""
    _check_stored(sr, ImagenSRUNet, "sr")
    aug_level = check_aug_level(aug_level)
    resolve_threshold(threshold)
    c, model = sr.config, sr.model.eval()
    r, R = c["low_resolution"], c["resolution"]
    if not torch.is_tensor(low) or low.ndim != 4 or tuple(low.shape[1:]) != (3, r, r) or not len(low):
        raise ValueError(f"low must be (N, 3, {r}, {r}) images, got "
                         f"{tuple(low.shape) if torch.is_tensor(low) else type(low).__name__}")
    profile = profile or current()
    dev = device_of(model)
    diffusion = glide.respaced(c, steps)
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for i in range(0, len(low), batch):
        part = low[i:i + batch].float().to(dev)
        level = torch.full((len(part),), aug_level, device=dev)
        cond = augment(upsample(part, R), level, g)
        x_T = torch.randn(len(part), 3, R, R, generator=g, device=dev)
        with profile.autocast():
            x0 = ddpm_sample(lambda x, t, cond=cond, level=level: model(x, t, cond, level).float(), diffusion, x_T,
                             threshold=threshold, generator=g, progress=progress)
        out.append(x0.float().clamp(-1, 1).cpu())
    return torch.cat(out)


class CascadeSample(NamedTuple):
    """The base model's images ``low`` (N, 3, r, r) and the SR model's ``high`` (N, 3, R, R), in [-1, 1]."""

    low: torch.Tensor
    high: torch.Tensor


def cascade_sample(base: Stored, sr: Stored, captions: Sequence[str], aug_level: float = 0.0, *, scale: float = 3.0,
                   threshold: ThresholdLike = "static", steps: int = 50, sr_steps: int = 50, seed: int = 0,
                   batch: int = 250, progress: bool = False) -> CascadeSample:
    """Imagen's cascade (Sec. 2.4) in two stages: the base model's ``captions`` at ``scale``, then the SR
    model given them, augmented at the sampling-time level ``aug_level`` in [0, 1]."""
    _check_stored(base, ImagenTextUNet, "base")
    _check_stored(sr, ImagenSRUNet, "sr")
    aug_level = check_aug_level(aug_level)
    if base.config["resolution"] != sr.config["low_resolution"]:
        raise ValueError(f"the SR model takes {sr.config['low_resolution']} px images, the base model makes "
                         f"{base.config['resolution']} px")
    low = sample(base, captions, scale=scale, threshold=threshold, steps=steps, seed=seed, batch=batch,
                 progress=progress)
    high = super_resolve(sr, low, aug_level, steps=sr_steps, seed=seed + 1, batch=batch, progress=progress)
    return CascadeSample(low, high)


# ------------------------------------------------------------------------------------------------
# Evaluation texts
# ------------------------------------------------------------------------------------------------

TEXT_KINDS = ("caption", "paraphrase", "heldout")


def evaluation_scenes(n: int, seed: int = 0, resolution: int = 32) -> Scenes:
    """``n`` one-object scenes of the world's fixed evaluation stream (training split: no held-out
    (shape, color) pair; finding 1 is about phrasing), at the evaluator's ``resolution``, each with its
    caption, training paraphrases and held-out paraphrases."""
    world = ShapesWorld(resolution, seed=0, max_objects=MAX_OBJECTS, n_paraphrases=4, n_heldout_paraphrases=4)
    return world.fixed(n, seed=seed)


def evaluation_texts(scenes: Scenes, kind: str = "heldout") -> list[str]:
    """One text per scene: its ``"caption"`` (the training template), a training ``"paraphrase"``, or a
    ``"heldout"`` paraphrase (templates and synonyms no training text uses), the k-th scene taking its
    (k mod count)-th one, so every template appears."""
    if kind not in TEXT_KINDS:
        raise ValueError(f"kind must be one of {TEXT_KINDS}, got {kind!r}")
    if kind == "caption":
        return list(scenes.captions)
    rows = scenes.paraphrases if kind == "paraphrase" else scenes.heldout_paraphrases
    return [row[k % len(row)] for k, row in enumerate(rows)]


def judge(evaluator: Any, images: torch.Tensor, scenes: Scenes) -> dict[str, float]:
    """``caption_accuracy`` and ``fd`` of generated ``images`` (N, 3, r, r) in [-1, 1] for ``scenes`` (N)
    by the shapes evaluator (:func:`~diffusion_core.evaluate.attributes.shapes_evaluator`): the images are
    brought to its resolution bicubically (:func:`~diffusion_core.recipes.glide.judge_resolution`:
    16 px base samples are judged at 32), and FD is taken against the real one-object ``scenes``
    themselves (brought to the same resolution), not the evaluator's 1-3 object reference."""
    if not isinstance(scenes, Scenes) or not torch.is_tensor(images) or len(scenes) != len(images):
        raise ValueError(f"need one scene per image, got {len(images) if torch.is_tensor(images) else images!r} images "
                         f"and {len(scenes) if isinstance(scenes, Scenes) else type(scenes).__name__} scenes")
    R = evaluator.resolution
    mine = glide.judge_resolution(images.float(), R)
    real = glide.judge_resolution(scenes.images.float(), R)
    return {"caption_accuracy": evaluator.caption_accuracy(mine, scenes), "fd": evaluator.fd(mine, reference=real)}


def imagen_base(encoder: str = "minilm", profile: Profile | str | None = None, verbose: bool = True) -> Stored:
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    return load(RECIPE_NAMES[encoder], profile, verbose=verbose)
