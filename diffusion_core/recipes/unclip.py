"""unCLIP (DALL·E 2) on the shapes world (chapter 12; Ramesh et al. 2022), trained by fixed recipes and cached.

unCLIP makes an image from a caption ``y`` in two stages around a *frozen* CLIP (here chapter 05's
``shapes-clip``): a **prior** ``p(z_i | y)`` that produces a CLIP image embedding, and a **decoder**
``p(x | z_i, y)`` that inverts it::

    p(x | y) = p(x | z_i, y) p(z_i | y)          (the paper's eq. 1: z_i is a deterministic function of x)

Both are trained on the one-object scenes of chapter 11 (16x16 pixels at ``smoke`` and ``cpu``, 32 at
``gpu``). The frozen CLIP reads the world at 32 px (64 on ``gpu``): every image it embeds, a training
scene or a decoded sample, is first brought there by :func:`~.glide.judge_resolution` (bicubic), so
``z_i(x) = normalize(f(up(x)))`` means the same thing everywhere (:func:`image_embeddings`).

* ``shapes-unclip-prior``: the diffusion prior, :class:`~diffusion_core.models.prior.PriorTransformer`
  (diffusers' names): a causal transformer over ``[CLIP text tokens, CLIP text embedding z_t, time,
  noised z_i, query]`` whose query output predicts the *clean* ``z_i`` (the paper: "we found it
  better to predict the unnoised z_i directly"), trained by ``|| f(z_i^(t), t, y) - z_i ||^2`` on the
  cosine schedule, T = 1000; the caption is replaced by the empty caption 10% of the time for
  classifier-free guidance. The embeddings are CLIP's unit vectors, standardised per dimension with
  the training set's mean and standard deviation (Karlo's ``clip_mean`` / ``clip_std``, kept in the
  model): a unit 64-d vector has coordinates of size ~1/8, which a unit-variance diffusion would
  drown; standardised, each coordinate has variance 1 like the noise.
* ``shapes-unclip-decoder``: the decoder, :class:`~diffusion_core.models.unclip.UnCLIPDecoder`: the
  GLIDE-family pixel UNet of chapter 11 (AdaGN residual blocks, residual resampling, ``SimpleCrossAttn``
  blocks) conditioned through :class:`~diffusion_core.models.unclip.UnCLIPTextProjModel`: ``z_i`` (and
  ``z_t``) projected and added to the timestep embedding, ``z_i`` projected into 4 extra context tokens
  in front of the caption's tokens in every attention layer. The caption is read by the frozen CLIP's
  text tower (as Karlo's decoder; the paper's reuses GLIDE's own text encoder), so the decoder trains
  only the UNet and the projections. As the paper: ``z_i`` becomes the learned null embedding 10% of
  the time and the caption the empty caption 50% of the time (classifier-free guidance on both).
  Chapter 04's coordinate channels are added to the input, as in chapter 11's ``shapes-glide`` (which, with
  them, still did not learn from its captions *where* an object goes in its budget). eps-prediction with a fixed
  variance (L_simple): the decoder is sampled by DDIM, which needs no variance.

Sampling: :func:`sample_prior` (DDIM over the embedding with classifier-free guidance, two samples per
caption keeping the one closer to ``z_t``, as the paper does), :func:`decode` (DDIM with ``eta``, with
classifier-free guidance over ``z_i`` and the caption together), :func:`slerp` (the interpolation
of the paper's Fig. 4 between two image embeddings).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..data.shapes import ShapesWorld
from ..models.prior import PriorConfig, PriorTransformer
from ..models.unclip import UnCLIPDecoder
from ..models.unet_cond import CondUNetConfig
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile, current
from ..samplers.ddim import check_eta, ddim_sample
from ..samplers.guidance import cfg_eps, check_scale, drop_condition
from ..store import Recipe, Stored, device_of, load, register
from ..train import TrainConfig, train
from .clip import SHAPES_CLIP, ShapesCLIP, shapes_clip
from .glide import judge_resolution
from .latent import NULL_CAPTION, TrainingSet, _training_set, caption_ids

MAX_OBJECTS = 1          # one-object scenes, as chapter 11's
CLIP_RECIPE = SHAPES_CLIP.name


# ------------------------------------------------------------------------------------------------
# The frozen CLIP: what the prior and the decoder read
# ------------------------------------------------------------------------------------------------

def resolution_for(p: Profile) -> int:
    """16x16 at ``smoke`` and ``cpu`` (a pixel model on 2 cores), 32x32 at ``gpu`` (chapter 11's)."""
    return p.pick(smoke=16, cpu=16, gpu=32)


def context_length(resolution: int) -> int:
    """Text tokens the prior and decoder read: the longest one-object caption or paraphrase, with the
    start and end tokens (the CLIP's own context, made for three objects, is longer: the rest is
    padding, and a causal text tower's states of the real tokens do not depend on it)."""
    return ShapesWorld(resolution, max_objects=MAX_OBJECTS).max_caption_words() + 2


def frozen_clip(profile: Profile | str | None = None) -> ShapesCLIP:
    """Chapter 05's ``shapes-clip`` (from the store), frozen: unCLIP never trains it."""
    clip = shapes_clip(profile, verbose=False)
    clip.model.eval().requires_grad_(False)
    if clip.config["text_width"] != clip.config["embed_dim"]:
        raise ValueError("unCLIP here feeds the CLIP text tokens and embeddings to one width: the CLIP's "
                         f"text_width ({clip.config['text_width']}) must equal its embed_dim ({clip.config['embed_dim']})")
    return clip


def caption_tokens(clip: ShapesCLIP, captions: Sequence[str], length: int) -> torch.Tensor:
    """(B, length) token ids of ``captions`` in the CLIP's tokenizer, cut to ``length`` (only padding is cut)."""
    captions = check_captions(captions)
    ids = clip.tokenizer.encode(captions)
    if bool((ids[:, length:] != clip.tokenizer.pad_id).any()):
        raise ValueError(f"a caption is longer than the {length - 2} words the prior and decoder read")
    return ids[:, :length]


@torch.no_grad()
def text_conditioning(clip: ShapesCLIP, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The caption as the prior and the decoder read it, from token ids (B, M):
    ``prompt_embeds`` (B, P) the unit CLIP text embedding ``z_t``; ``text_hidden_states`` (B, M, P) the
    text tower's token states (after its final LayerNorm); ``text_mask`` (B, M) float, 1 on tokens."""
    model = clip.model
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    out = model.text_model(ids)
    z_t = F.normalize(model.text_projection(out.pooled).float(), dim=-1)
    return {"prompt_embeds": z_t, "text_hidden_states": out.last_hidden_state.float(),
            "text_mask": (ids != clip.tokenizer.pad_id).float()}


def encode_captions(clip: ShapesCLIP, captions: Sequence[str], length: int) -> dict[str, torch.Tensor]:
    return text_conditioning(clip, caption_tokens(clip, captions, length))


@torch.no_grad()
def image_embeddings(clip: ShapesCLIP, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(N, 3, r, r) images in [-1, 1] at the decoder's resolution -> (N, P) unit CLIP image embeddings
    ``z_i``, the images first brought to the CLIP's resolution (bicubic, :func:`~.glide.judge_resolution`)."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, r, r) in [-1, 1], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    R = clip.config["resolution"]
    return torch.cat([clip.encode_image(judge_resolution(images[i:i + batch].float(), R))
                      for i in range(0, len(images), batch)])


def check_captions(captions: Sequence[str] | str) -> list[str]:
    if isinstance(captions, str) or not all(isinstance(s, str) for s in captions) or not len(captions):
        raise ValueError("captions must be a non-empty list of strings")
    return list(captions)


# ------------------------------------------------------------------------------------------------
# The data
# ------------------------------------------------------------------------------------------------

def training_set(c: dict[str, Any]) -> TrainingSet:
    """Chapter 11's fixed captioned one-object scenes (``n_train`` of them at the config's resolution)."""
    return _training_set(c["resolution"], c["n_train"], MAX_OBJECTS)


def _common(p: Profile) -> dict[str, Any]:
    res = resolution_for(p)
    clip = SHAPES_CLIP.config(p)
    return {"resolution": res, "n_train": p.pick(smoke=512, cpu=8000, gpu=16000),
            "context_length": context_length(res), "paraphrases": True,
            # the frozen CLIP: a change of its recipe changes this config, so both models retrain
            "clip": {"recipe": CLIP_RECIPE, "version": SHAPES_CLIP.version, **clip},
            "diffusion": {"schedule": "cosine", "T": 1000}}


class _Data:
    """The training scenes with their caption ids (N, V, M) (caption and paraphrases) and unit CLIP
    image embeddings (N, P), computed once with the frozen CLIP."""

    def __init__(self, c: dict[str, Any], clip: ShapesCLIP):
        data = training_set(c)
        self.pixels = data.pixels
        ids = caption_ids(data, clip.tokenizer, c["paraphrases"])
        L = c["context_length"]
        if bool((ids[..., L:] != clip.tokenizer.pad_id).any()):
            raise ValueError(f"a training caption is longer than the context of {L} tokens")
        self.ids = ids[..., :L]
        self.null_ids = caption_tokens(clip, [NULL_CAPTION], L)[0]
        self.z_i = image_embeddings(clip, data.images())

    def batches(self, batch_size: int, seed: int, images: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        """Endless random batches ``(x0?, z_i, ids)``: scenes with replacement, one of each scene's
        captions or paraphrases at random."""
        g = torch.Generator().manual_seed(seed)
        while True:
            i = torch.randint(0, len(self.z_i), (batch_size,), generator=g)
            v = torch.randint(0, self.ids.shape[1], (batch_size,), generator=g)
            out = (self.z_i[i], self.ids[i, v])
            yield ((self.pixels[i].float() / 127.5 - 1.0, *out) if images else out)


def _metrics(res: Any, c: dict[str, Any]) -> dict[str, Any]:
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "first_loss": round(res.losses[0], 5),
            "train_seconds": round(res.seconds, 1), "steps": c["steps"], "batch_size": c["batch_size"]}


# ------------------------------------------------------------------------------------------------
# shapes-unclip-prior
# ------------------------------------------------------------------------------------------------

def prior_diffusion(c: dict[str, Any]) -> GaussianDiffusion:
    """The prior's process: cosine schedule, T = 1000, predicting x0 = the (standardised) clean z_i."""
    d = c["diffusion"]
    return GaussianDiffusion.from_schedule(d["schedule"], d["T"], prediction="x0")


def _prior_config(p: Profile) -> dict[str, Any]:
    return {
        **_common(p),
        "heads": 4, "head_dim": p.pick(smoke=8, cpu=16, gpu=32), "layers": p.pick(smoke=2, cpu=4, gpu=6),
        "p_uncond": 0.1,
        # cpu: 20 slots (16 text tokens and 4 more) of width 64; 0.068 s per step of 128 on one thread of the
        # busy 2-core machine (measured; width 128 and batch 256: 0.31 s), so 2,000 steps in about 2.5 minutes
        "steps": p.pick(smoke=60, cpu=2000, gpu=10000), "batch_size": p.pick(smoke=64, cpu=128, gpu=512),
        "lr": p.pick(smoke=1e-3, cpu=1e-3, gpu=3e-4), "weight_decay": 0.01,
        "ema_decay": p.pick(smoke=0.9, cpu=0.999, gpu=0.9995), "seed": 0,
    }


def build_prior(c: dict[str, Any]) -> PriorTransformer:
    torch.manual_seed(c["seed"])
    P = c["clip"]["embed_dim"]
    prior = PriorTransformer(PriorConfig(num_attention_heads=c["heads"], attention_head_dim=c["head_dim"],
                                         num_layers=c["layers"], embedding_dim=P, num_embeddings=c["context_length"],
                                         additional_embeddings=4))
    # the standardisation is fitted to the data (fit_standardisation), never trained
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)
    return prior


def prior_fn(prior: PriorTransformer):
    """``f(z_i^(t), t, cond) -> z_hat`` in the process's signature ``model(x_t, t, **cond)``."""
    def fn(x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, text_hidden_states: torch.Tensor,
           text_mask: torch.Tensor) -> torch.Tensor:
        return prior(hidden_states=x, timestep=t, proj_embedding=prompt_embeds,
                     encoder_hidden_states=text_hidden_states, attention_mask=text_mask).predicted_image_embedding
    return fn


@torch.no_grad()
def fit_standardisation(prior: PriorTransformer, z_i: torch.Tensor) -> None:
    """Set ``clip_mean`` and ``clip_std`` to the per-dimension statistics of the training embeddings."""
    prior.clip_mean.copy_(z_i.mean(0, keepdim=True))
    prior.clip_std.copy_(z_i.std(0, keepdim=True).clamp(min=1e-4))


def prior_loss(prior: PriorTransformer, diffusion: GaussianDiffusion, z_i: torch.Tensor,
               cond: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """L_prior = E_t || f_theta(z_i^(t), t, y) - z_i ||^2 on standardised embeddings (paper, section 2.1)."""
    x0 = prior.pre_process_latents(z_i)
    return diffusion.training_losses(prior_fn(prior), x0, generator=generator, model_kwargs=cond)["loss"].mean()


def train_prior(prior: PriorTransformer, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    """Train the prior by the recipe ``c``; the store keeps the EMA weights."""
    clip = frozen_clip(p)
    clip.model.to(p.device)
    data = _Data(c, clip)
    fit_standardisation(prior, data.z_i)
    diffusion = prior_diffusion(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, batch):
        z_i, ids = batch
        # the caption becomes the empty caption with probability p_uncond (classifier-free guidance)
        ids = drop_condition(ids, data.null_ids.to(ids.device), c["p_uncond"], g)
        return prior_loss(m, diffusion, z_i, text_conditioning(clip, ids), g)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], weight_decay=c["weight_decay"], ema_decay=c["ema_decay"],
                      warmup_steps=min(200, c["steps"] // 10), desc="unCLIP prior")
    res = train(prior, loss_fn, data.batches(c["batch_size"], c["seed"], images=False), cfg, p)
    prior.load_state_dict(res.ema.state_dict())
    return _metrics(res, c)


SHAPES_UNCLIP_PRIOR = register(Recipe(
    "shapes-unclip-prior", 1, _prior_config, build_prior, train_prior,
    "unCLIP's diffusion prior on one-object shapes captions: a causal transformer over the frozen shapes-clip's "
    "text tokens, text embedding, time, noised image embedding and a query token, predicting the clean "
    "(standardised) CLIP image embedding; cosine schedule, captions dropped with p=0.1"))


# ------------------------------------------------------------------------------------------------
# shapes-unclip-decoder
# ------------------------------------------------------------------------------------------------

def decoder_diffusion(c: dict[str, Any]) -> GaussianDiffusion:
    """The decoder's process: cosine schedule, T = 1000, eps-prediction, fixed variance."""
    d = c["diffusion"]
    return GaussianDiffusion.from_schedule(d["schedule"], d["T"], prediction="eps")


def _decoder_config(p: Profile) -> dict[str, Any]:
    return {
        **_common(p),
        "width": p.pick(smoke=16, cpu=32, gpu=64), "layers_per_block": p.pick(smoke=1, cpu=1, gpu=2),
        "attention": [False, True, True],   # as chapter 11's: none at the full resolution
        "extra_tokens": 4, "coord_channels": True,
        # z_i and z_t are multiplied by sqrt(P) before the projections (UnCLIPDecoder.embedding_scale); in a
        # 600-step cpu trial without it the decoded samples had the source's colour 15-28% of the time and
        # its grid cell 7-9%, with it 39-45% and 14-16% (DDIM eta = 0; 100 scenes)
        "embedding_scale": float(SHAPES_CLIP.config(p)["embed_dim"]) ** 0.5,
        "p_uncond_image": 0.1, "p_uncond_caption": 0.5,   # the paper's: z_i 10%, the caption 50%
        # cpu: 0.22-0.31 s per step of 32 on one thread of the busy 2-core machine (measured): 2,400 steps in
        # 9 to 12 minutes
        "steps": p.pick(smoke=40, cpu=2400, gpu=20000), "batch_size": p.pick(smoke=16, cpu=32, gpu=128),
        "lr": p.pick(smoke=1e-3, cpu=1e-3, gpu=3e-4), "ema_decay": p.pick(smoke=0.9, cpu=0.999, gpu=0.9995),
        "seed": 0,
    }


def decoder_unet_config(c: dict[str, Any]) -> CondUNetConfig:
    """Chapter 11's UNet (widths w, 2w, 2w; AdaGN; residual resampling; added-K/V attention at the
    levels ``c["attention"]`` and in the middle) with ``class_embed_type="identity"``: the projected
    embeddings are added to the timestep embedding as they are."""
    w, attn = c["width"], c["attention"]
    down = tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn)
    up = tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn))
    return CondUNetConfig(
        sample_size=c["resolution"], in_channels=3 + (2 if c["coord_channels"] else 0), out_channels=3,
        block_out_channels=(w, 2 * w, 2 * w), down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=c["layers_per_block"],
        cross_attention_dim=2 * w, attention_head_dim=w, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity")


def build_decoder(c: dict[str, Any]) -> UnCLIPDecoder:
    torch.manual_seed(c["seed"])
    return UnCLIPDecoder(decoder_unet_config(c), c["clip"]["embed_dim"], c["extra_tokens"], c["coord_channels"],
                         embedding_scale=c["embedding_scale"])


def decoder_loss(decoder: UnCLIPDecoder, diffusion: GaussianDiffusion, x0: torch.Tensor, z_i: torch.Tensor,
                 cond: dict[str, torch.Tensor], p_uncond_image: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """L_simple of the decoder; ``z_i`` becomes the learned null embedding with probability
    ``p_uncond_image`` (the caption in ``cond`` is dropped by the caller, before CLIP reads it)."""
    z = drop_condition(z_i, decoder.null_image_embedding().expand_as(z_i), p_uncond_image, generator)
    return diffusion.training_losses(decoder, x0, generator=generator,
                                     model_kwargs={"image_embeddings": z, **cond})["loss"].mean()


def train_decoder(decoder: UnCLIPDecoder, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    """Train the decoder by the recipe ``c``; the store keeps the EMA weights."""
    clip = frozen_clip(p)
    clip.model.to(p.device)
    data = _Data(c, clip)
    diffusion = decoder_diffusion(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, batch):
        x0, z_i, ids = batch
        ids = drop_condition(ids, data.null_ids.to(ids.device), c["p_uncond_caption"], g)
        return decoder_loss(m, diffusion, x0, z_i, text_conditioning(clip, ids), c["p_uncond_image"], g)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(100, c["steps"] // 5),
                      desc="unCLIP decoder")
    res = train(decoder, loss_fn, data.batches(c["batch_size"], c["seed"], images=True), cfg, p)
    decoder.load_state_dict(res.ema.state_dict())
    return _metrics(res, c)


SHAPES_UNCLIP_DECODER = register(Recipe(
    "shapes-unclip-decoder", 1, _decoder_config, build_decoder, train_decoder,
    "unCLIP's decoder on one-object shapes scenes in pixels (16x16 cpu, 32x32 gpu): chapter 11's AdaGN UNet with "
    "the frozen shapes-clip's image embedding added to the time embedding and as 4 extra context tokens before the "
    "CLIP caption tokens; z_i dropped 10%, the caption 50%; coordinate channels"))


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def _check_steps(steps: int, T: int) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T}, got {steps!r}")
    return steps


def _check_embeddings(z: torch.Tensor, dim: int, name: str, n: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(z) or z.ndim != 2 or z.shape[1] != dim or (n is not None and z.shape[0] != n):
        want = f"({n if n is not None else 'N'}, {dim})"
        raise ValueError(f"{name} must be {want}, got {tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} contains NaN or infinity")
    return z


@torch.no_grad()
def sample_prior(prior: Stored, clip: ShapesCLIP, captions: Sequence[str], *, scale: float = 2.0,
                 steps: int = 50, candidates: int = 2, seed: int = 0, progress: bool = False,
                 profile: Profile | None = None) -> torch.Tensor:
    """(N, P) unit CLIP image embeddings drawn from the prior for ``captions`` (N).

    DDIM over the standardised embedding in ``steps`` steps with eta = 1 (the ancestral sampler on the
    subsequence: the prior is a distribution, not a point), the x0-prediction guided classifier-free:
    ``z_hat = f(z^(t), t, "") + s (f(z^(t), t, y) - f(z^(t), t, ""))`` (s = 1: the conditional prior),
    no clipping. As the paper, ``candidates`` samples are drawn per caption and the one with the
    largest dot product with the caption's text embedding ``z_t`` is kept (1: no selection)."""
    captions = check_captions(captions)
    scale = check_scale(scale)
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
    profile = profile or current()
    model, c = prior.model.eval(), prior.config
    diffusion = prior_diffusion(c)
    steps = _check_steps(steps, diffusion.T)
    dev = device_of(model)
    clip.model.to(dev)
    n, P = len(captions), c["clip"]["embed_dim"]
    cond = encode_captions(clip, captions, c["context_length"])
    null = encode_captions(clip, [NULL_CAPTION], c["context_length"])
    cond_k = {k: v.repeat(candidates, *([1] * (v.ndim - 1))) for k, v in cond.items()}   # candidate-major
    g = torch.Generator(device=dev).manual_seed(seed)
    x_T = torch.randn(candidates * n, P, generator=g, device=dev)
    fn = prior_fn(model)

    def guided(x, t):
        # the guided x0-prediction, batched: [null; cond] in one forward pass
        return cfg_eps(lambda xx, tt, cc: fn(xx, tt, **cc).float(), x, t, cond_k, null, scale)

    with profile.autocast():
        z = ddim_sample(guided, diffusion, x_T, steps, eta=1.0, clip_denoised=False, generator=g, progress=progress)
    z = F.normalize(model.post_process_latents(z.float()), dim=-1).view(candidates, n, P)
    # keep the candidate with the largest z_i . z_t
    best = (z * cond["prompt_embeds"][None].to(z)).sum(-1).argmax(0)         # (n,)
    return z[best, torch.arange(n, device=z.device)].cpu()


@torch.no_grad()
def decode(decoder: Stored, clip: ShapesCLIP, image_embeds: torch.Tensor | None, captions: Sequence[str] | None = None,
           *, scale: float = 3.0, steps: int = 25, eta: float = 1.0, seed: int = 0, x_T: torch.Tensor | None = None,
           batch: int = 250, progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """Images (N, 3, R, R) in [-1, 1] decoded from unit CLIP image embeddings ``image_embeds`` (N, P)
    (``None``: the learned null embedding, the decoder given the caption only) and ``captions`` (N)
    (``None``: the empty caption, as for variations of an image).

    DDIM (chapter 03) in ``steps`` steps with ``eta`` (0: deterministic given x_T; 1, the default: the
    ancestral sampler on the subsequence: in a 600-step cpu trial of the decoder, eta = 1 found the
    source's colour in 73% of 100 decodings and its cell in 28%, eta = 0 in 42% and 14%, its
    images keeping a residue of noise), with classifier-free guidance
    ``eps(x_t, null, "") + s (eps(x_t, z_i, y) - eps(x_t, null, ""))`` (s = 1: the conditional
    decoder). ``x_T`` (N, 3, R, R) fixes the starting noise (else drawn from ``seed``)."""
    scale = check_scale(scale)
    eta = check_eta(eta)
    profile = profile or current()
    model, c = decoder.model.eval(), decoder.config
    diffusion = decoder_diffusion(c)
    steps = _check_steps(steps, diffusion.T)
    dev = device_of(model)
    clip.model.to(dev)
    P, R = c["clip"]["embed_dim"], c["resolution"]
    if image_embeds is None and captions is None:
        raise ValueError("decode needs image_embeds, captions, or both")
    n = len(check_captions(captions)) if image_embeds is None else image_embeds.shape[0] if torch.is_tensor(
        image_embeds) else -1
    if image_embeds is not None:
        _check_embeddings(image_embeds, P, "image_embeds")
    if captions is not None and len(check_captions(captions)) != n:
        raise ValueError(f"captions must be one per image embedding: {n} embeddings, {len(captions)} captions")
    if x_T is not None and (not torch.is_tensor(x_T) or x_T.shape != (n, 3, R, R)):
        raise ValueError(f"x_T must be ({n}, 3, {R}, {R}), got "
                         f"{tuple(x_T.shape) if torch.is_tensor(x_T) else type(x_T).__name__}")
    caps = list(captions) if captions is not None else [NULL_CAPTION] * n
    null_z = model.null_image_embedding().float()
    null = {"image_embeddings": null_z, **encode_captions(clip, [NULL_CAPTION], c["context_length"])}
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        z = null_z.expand(m, -1) if image_embeds is None else image_embeds[i:i + m].float().to(dev)
        cond = {"image_embeddings": z, **encode_captions(clip, caps[i:i + m], c["context_length"])}
        x = torch.randn(m, 3, R, R, generator=g, device=dev) if x_T is None else x_T[i:i + m].float().to(dev)

        def eps(xx, tt, cond=cond):
            return cfg_eps(lambda a, b, cc: model(a, b, **cc).float(), xx, tt, cond, null, scale)

        with profile.autocast():
            x0 = ddim_sample(eps, diffusion, x, steps, eta=eta, clip_denoised=True, generator=g, progress=progress)
        out.append(x0.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def slerp(z0: torch.Tensor, z1: torch.Tensor, theta: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit embeddings (the paper's Fig. 4 interpolates CLIP image
    embeddings so): ``z_theta = sin((1 - theta) w) / sin(w) z0 + sin(theta w) / sin(w) z1`` with
    ``cos w = z0 . z1``; ``theta`` in [0, 1] (a number, or (K,) for K points: then (K, ..., P)).
    ``z0``, ``z1``: (P,) or (N, P), normalised here; parallel vectors fall back to the straight line."""
    for name, z in (("z0", z0), ("z1", z1)):
        if not torch.is_tensor(z) or z.ndim not in (1, 2) or not bool(torch.isfinite(z).all()):
            raise ValueError(f"slerp: {name} must be a finite (P,) or (N, P) tensor, got "
                             f"{tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
    if z0.shape != z1.shape:
        raise ValueError(f"slerp: z0 and z1 must have one shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    th = torch.as_tensor(theta, dtype=torch.float32)
    if th.ndim > 1 or not bool(((th >= 0) & (th <= 1)).all()):
        raise ValueError(f"slerp: theta must be a number or a (K,) tensor in [0, 1], got {theta!r}")
    a, b = F.normalize(z0.float(), dim=-1), F.normalize(z1.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))      # (..., 1)
    t = th.reshape(-1, *([1] * a.ndim)) if th.ndim == 1 else th                          # (K, ..., 1) or ()
    so = torch.sin(omega)
    # sin((1 - theta) w) / sin(w) z0 + sin(theta w) / sin(w) z1   (linear where w ~ 0)
    small = so < 1e-4
    w0 = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / so.clamp(min=1e-12))
    w1 = torch.where(small, t + 0 * omega, torch.sin(t * omega) / so.clamp(min=1e-12))
    return w0 * a + w1 * b


def shapes_unclip(profile: Profile | str | None = None, verbose: bool = True) -> tuple[Stored, Stored]:
    """``(prior, decoder)`` from the store (trained on first use)."""
    return load("shapes-unclip-prior", profile, verbose=verbose), load("shapes-unclip-decoder", profile, verbose=verbose)
