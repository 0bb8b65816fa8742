"""Chapter 09's stored models: image prompts for chapter 04's locked text-to-image model.

Two ways to give the locked ``shapes-ldm-t2i`` model (its UNet and caption encoder never updated)
an *image* prompt, trained by one loop at one budget (:func:`ip_budget`) so that chapter 09
compares them at equal training compute:

* ``shapes-ip-adapter``: IP-Adapter (Ye et al. 2023), an
  :class:`~diffusion_core.models.ip_adapter.IPAdapter`: an :class:`ImageProjection` from the image
  embedding to ``num_tokens`` image tokens, and in every cross-attention layer a new key/value pair
  ``W'_k, W'_v`` (``to_k_ip``, ``to_v_ip``) for them: *decoupled* cross-attention (the paper's eq. 5),
  ``Z = Attention(Q, K_text, V_text) + lambda * Attention(Q, K'_img, V'_img)``. As in the paper's
  code, ``W'_k, W'_v`` start as copies of the layer's text ``W_k, W_v``.
* ``shapes-ip-concat``: the naive alternative, a :class:`ConcatImagePrompt`: the same projection,
  its image tokens appended to the caption's tokens in the *existing* cross-attention (frozen
  ``W_k, W_v`` for both); only the projection is trained.

The image prompt is the frozen chapter 05 CLIP's (``shapes-clip``) unit image embedding of the
training image itself, as the paper trains (the target image is its own prompt), after a light
augmentation of ours (:func:`augment`: a shift by up to one pixel, and a colour jitter too small to
change any colour's name). Each training example drops the image (to the zero embedding) with
probability 0.05 and both prompts with 0.05, the paper's rates, and the caption alone (to the empty
caption) with 0.5 where the paper has 0.05. The reason: web captions like those of the paper's
training data name only part of what their image shows, so the image branch has work to do in nearly
every example; a caption of the shapes world names *everything* the image shows but the background,
so with the caption present the image branch has almost nothing to add and learns little. In development runs
(400 steps, 64 unseen scenes, image prompt alone) the judge-CLIP similarity of samples to their
prompt reached 0.14 with the paper's 0.05 and 0.50 with 0.5 (lr 3e-4; 0.58 with the lr of 1e-3 kept
here). Half of the examples with no caption recreate the paper's regime, in which the image prompt
must carry the content; the other drops keep classifier-free guidance working with either prompt.

While training, every ``eval_every`` steps the recipe samples a fixed batch of unseen scenes from
their image prompt alone (empty caption, ``lambda = 1``) and records the image fidelity: the cosine
of the independent judge CLIP's (``shapes-clip-judge``) embeddings of sample and prompt image, and
the attribute agreement of the sample with the prompt's scene (the shapes evaluator), so the stored
metrics hold the curve over training steps (``fidelity_by_step``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..distributed import batch_rand, batch_randint, batch_randn
from ..evaluate.attributes import shapes_evaluator
from ..models.controlnet import ControlNet
from ..models.ip_adapter import ImageProjection, IPAdapter, attach_ip_adapters, cross_attention_slots
from ..models.text_to_image import TextToImageUNet
from ..models.unet_cond import UNet2DCondition
from ..models.vae import AutoencoderKL
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile, current
from ..samplers.ddim import ddim_sample
from ..samplers.guidance import cfg_eps
from ..store import Recipe, load, register
from ..train import TrainConfig, train
from . import clip as K
from . import control as C
from . import latent as L

BASE = C.BASE
CLIP = "shapes-clip"            # the frozen image encoder of the image prompts (chapter 05)
JUDGE = "shapes-clip-judge"     # an independently trained CLIP: the judge of image similarity
KINDS = ("decoupled", "concat")
GUIDANCE = C.GUIDANCE
NUM_TOKENS = 4                  # image tokens, as the paper's SD 1.5 adapter


def ip_budget(p: Profile) -> dict[str, Any]:
    """The training budget shared by both image-prompt adapters (equal compute in chapter 09).

    ``p_drop_text``, ``p_drop_image``, ``p_drop_both``: condition dropout (the paper's 0.05 for the
    image and for both; 0.5 for the caption, see the module's docstring for why).
    ``shift`` (pixels), ``gain`` and ``offset`` (in [0, 1] colour units): the augmentation of the
    prompt image (:func:`augment`)."""
    return {"steps": p.pick(smoke=24, cpu=1500, gpu=4000), "batch_size": p.pick(smoke=8, cpu=32, gpu=64),
            "lr": 1e-3, "weight_decay": 0.01, "p_drop_text": 0.5, "p_drop_image": 0.05, "p_drop_both": 0.05,
            "shift": 1, "gain": 0.05, "offset": 0.03, "seed": 0,
            "eval_every": p.pick(smoke=12, cpu=100, gpu=250), "eval_n": p.pick(smoke=8, cpu=48, gpu=64),
            "eval_steps": p.pick(smoke=4, cpu=10, gpu=20)}


def _clip_ref(p: Profile) -> dict[str, Any]:
    r = K.SHAPES_CLIP
    return {"recipe": r.name, "version": r.version, **r.config(p)}


# ------------------------------------------------------------------------------------------------
# the image prompt: augmentation, embedding, dropout
# ------------------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 1, gain: float = 0.05,
            offset: float = 0.03) -> torch.Tensor:
    """A light augmentation of prompt images (B, 3, R, R) in [-1, 1] (ours; the paper's training
    code only resizes and crops):

    * a shift by up to ``shift`` pixels in x and in y (the border pixels repeated: the world's
      backgrounds are constant along a row). A grid cell is R/3 pixels wide (about 11 at 32x32) and
      an object's position is its cell, so one pixel never moves an object to another cell;
    * a colour jitter: each channel's [0, 1] value times ``1 + u`` (u uniform in +-``gain``, per
      image and channel) plus ``v`` (uniform in +-``offset``, per image). With 0.05 and 0.03 a
      channel moves by at most 0.08, less than half of the smallest gap between two of the world's
      colours (yellow and orange differ by 0.35 in green), so no colour changes its name.

    ``generator`` is a CPU generator; the result is on the images' device."""
    B, _, R, _ = images.shape
    dev = images.device
    padded = F.pad(images, (shift,) * 4, mode="replicate")
    dx = batch_randint(0, 2 * shift + 1, (B,), generator=generator).to(dev)
    dy = batch_randint(0, 2 * shift + 1, (B,), generator=generator).to(dev)
    ar = torch.arange(R, device=dev)
    rows, cols = dy[:, None] + ar, dx[:, None] + ar                       # (B, R) each
    out = padded[torch.arange(B, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    scale = 1 + (batch_rand((B, 3, 1, 1), generator=generator) * 2 - 1).to(dev) * gain
    shift_v = (batch_rand((B, 1, 1, 1), generator=generator) * 2 - 1).to(dev) * offset
    return (((out + 1) / 2) * scale + shift_v).clamp(0, 1) * 2 - 1


def image_embeds(clip: K.ShapesCLIP, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1] -> (B, P) the frozen CLIP's unit image embeddings, on the images' device."""
    return clip.encode_image(images).to(images.device)


def drop_prompts(ids: torch.Tensor, embeds: torch.Tensor, null_ids: torch.Tensor, c: dict[str, Any],
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition dropout (the paper's scheme): per example, with probability ``p_drop_text`` the caption
    becomes the empty caption, with ``p_drop_image`` the image embedding becomes zero, with
    ``p_drop_both`` both (one uniform draw per example picks at most one of the three)."""
    B = ids.shape[0]
    r = batch_rand((B,), generator=generator).to(ids.device)
    pt, pi, pb = c["p_drop_text"], c["p_drop_image"], c["p_drop_both"]
    no_text = (r < pt) | ((r >= pt + pi) & (r < pt + pi + pb))
    no_image = (r >= pt) & (r < pt + pi + pb)
    ids = torch.where(no_text[:, None], null_ids.to(ids.device)[None], ids)
    embeds = torch.where(no_image[:, None].to(embeds.device), torch.zeros_like(embeds), embeds)
    return ids, embeds


# ------------------------------------------------------------------------------------------------
# the two adapters and how they join the base model
# ------------------------------------------------------------------------------------------------
class ConcatImagePrompt(nn.Module):
    """The naive image prompt: ``num_tokens`` image tokens ``c_i`` appended to the caption's tokens
    ``c_t``, attended to by the locked model's *own* cross-attention:

        Z = Attention(Q, [c_t; c_i] W_k, [c_t; c_i] W_v)          (one softmax over both)

    ``forward(context (B, L, d), image_embeds (B, P)) -> (B, L + num_tokens, d)``. Only
    ``image_proj`` (an :class:`ImageProjection`, the same as IP-Adapter's) has weights."""

    def __init__(self, image_proj: ImageProjection):
        super().__init__()
        self.image_proj = image_proj

    @property
    def num_tokens(self) -> int:
        return self.image_proj.num_tokens

    def forward(self, context: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.image_proj(image_embeds.to(self.image_proj.image_embeds.weight.dtype))
        return torch.cat([context, tokens.to(context.dtype)], dim=1)


Adapter = IPAdapter | ConcatImagePrompt


@contextlib.contextmanager
def joined(base: TextToImageUNet, adapter: Adapter | None, scale: float = 1.0) -> Iterator[None]:
    """``base`` with ``adapter`` installed for the duration of the ``with`` block: an
    :class:`IPAdapter`'s processors in every cross-attention layer at ``lambda = scale``
    (:func:`~diffusion_core.models.ip_adapter.attach_ip_adapters`); nothing for a
    :class:`ConcatImagePrompt` or ``None``. Whatever was installed before is restored afterwards
    (so blocks nest), and the base's own weights are never touched."""
    if not isinstance(adapter, IPAdapter):
        yield
        return
    unet = base.unet
    saved = [(attn, attn.processor) for _, attn in unet.cross_attentions()]
    saved_proj = unet.encoder_hid_proj
    attach_ip_adapters(unet, [adapter], scale)
    try:
        yield
    finally:
        for attn, proc in saved:
            attn.set_processor(proc)
        unet.encoder_hid_proj = saved_proj


def prompt_kwargs(adapter: Adapter | None, context: torch.Tensor,
                  embeds: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments of the base model for a caption state ``context`` (B, L, d) and image
    embeddings ``embeds`` (B, P): the caption alone (no adapter), the caption and
    ``added_cond_kwargs={"image_embeds": [embeds[:, None]]}`` (IP-Adapter, installed by
    :func:`joined`), or the caption's tokens with the image tokens appended (concatenation)."""
    if adapter is None:
        return {"context": context}
    if embeds is None:
        raise ValueError("an image-prompt adapter needs image embeddings (zeros for 'no image')")
    if isinstance(adapter, ConcatImagePrompt):
        return {"context": adapter(context, embeds)}
    return {"context": context, "added_cond_kwargs": {"image_embeds": [embeds[:, None]]}}


@torch.no_grad()
def sample(base: TextToImageUNet, diffusion: GaussianDiffusion, vae: AutoencoderKL, context: torch.Tensor,
           null_context: torch.Tensor, adapter: Adapter | None = None, embeds: torch.Tensor | None = None,
           scale: float = 1.0, controlnet: ControlNet | None = None, cond: torch.Tensor | None = None,
           conditioning_scale: float = 1.0, guidance: float = GUIDANCE, steps: int = 20, seed: int = 0,
           batch: int = 128, profile: Profile | None = None, progress: bool = False) -> torch.Tensor:
    """Images (B, 3, R, R) in [-1, 1]: DDIM (eta = 0) with classifier-free guidance, decoded.

    The conditional branch gets the caption states ``context`` and the image embeddings ``embeds``;
    the unconditional one the empty caption ``null_context`` and the zero embedding (what training
    dropped to). ``scale`` is IP-Adapter's lambda. A ``controlnet`` (chapter 07) with its condition
    ``cond`` adds its residuals in both branches, reading the caption states only. The noise is
    fixed by ``seed`` exactly as in :func:`diffusion_core.recipes.control.sample`: without an
    adapter (or at ``scale = 0``) this gives that function's samples bit for bit."""
    profile = profile or current()
    dev = next(base.parameters()).device
    n = context.shape[0]
    c = base.unet.config
    shape = (c.out_channels, c.sample_size, c.sample_size)
    g = torch.Generator().manual_seed(seed)
    x_T_all = torch.randn(n, *shape, generator=g)
    out = []
    with joined(base, adapter, scale):
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            cond_c: dict[str, torch.Tensor] = {"context": context[sl].to(dev)}
            cond_u: dict[str, torch.Tensor] = {"context": null_context.to(dev)}
            if adapter is not None:
                e = embeds[sl].to(dev).float()
                cond_c["image"], cond_u["image"] = e, torch.zeros_like(e[:1])
            edges = None if cond is None else cond[sl].to(dev)

            def eps(x, t, cc, edges=edges):
                kw = prompt_kwargs(adapter, cc["context"], cc.get("image"))
                if controlnet is not None:
                    reps = edges.repeat(x.shape[0] // edges.shape[0], 1, 1, 1)
                    kw.update(C.unet_kwargs(base, controlnet, x, t, cc["context"], reps, conditioning_scale))
                return base(x, t, **kw).float()

            def guided(x, t, cond_c=cond_c, cond_u=cond_u):
                return cfg_eps(eps, x, t, cond_c, cond_u, guidance)

            with profile.autocast():
                z0 = ddim_sample(guided, diffusion, x_T_all[sl].to(dev), steps, eta=0.0, clip_denoised=False,
                                 progress=progress).float()
            out.append(L.decode_latents(vae, z0.cpu()))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# the recipes
# ------------------------------------------------------------------------------------------------
def _config(kind: str):
    def config(p: Profile) -> dict[str, Any]:
        return {"kind": kind, "num_tokens": NUM_TOKENS, "base": C._base_ref(p), "clip": _clip_ref(p), **ip_budget(p)}
    return config


def build_adapter(c: dict[str, Any]) -> Adapter:
    """A fresh adapter of the config's kind (the same projection, by the same seed, for both kinds)."""
    torch.manual_seed(c["seed"])
    proj = ImageProjection(c["clip"]["embed_dim"], c["base"]["text_width"], c["num_tokens"])
    if c["kind"] == "concat":
        return ConcatImagePrompt(proj)
    with torch.device("meta"):  # only to list the base UNet's cross-attention layers
        unet = UNet2DCondition(L.t2i_unet_config(c["base"]))
    return IPAdapter.for_unet(unet, proj)


@torch.no_grad()
def init_from_base(adapter: IPAdapter, unet: UNet2DCondition) -> IPAdapter:
    """``W'_k <- W_k``, ``W'_v <- W_v`` in every cross-attention layer (the paper's code does this
    "to speed up convergence"): at the start the image branch reads the image tokens the way the text
    branch reads the caption's."""
    for i, _, attn in cross_attention_slots(unet):
        kv = adapter.ip_adapter[str(i)]
        kv.to_k_ip.weight.copy_(attn.to_k.weight)
        kv.to_v_ip.weight.copy_(attn.to_v.weight)
    return adapter


def _train_adapter(adapter: Adapter, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    stored, vae, diffusion = C.load_base(p)
    base = stored.model.to(p.device)
    clip = K.shapes_clip(p)
    clip.model.to(p.device)
    judge = K.shapes_clip(p, judge=True)
    evaluator = shapes_evaluator(p)
    if isinstance(adapter, IPAdapter):
        init_from_base(adapter, base.unet)
    data = L.training_set(p, c["base"]["max_objects"])
    tok = L.tokenizer_for(c["base"])
    codes = L.LatentCodes(data.pixels, vae)
    ids = L.caption_ids(data, tok, c["base"]["paraphrases"])
    null_ids = tok.encode([L.NULL_CAPTION])[0]
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    g_cpu = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, batch):
        z0, batch_ids, images = batch
        with torch.no_grad():
            e = image_embeds(clip, augment(images, g_cpu, c["shift"], c["gain"], c["offset"]))
            batch_ids, e = drop_prompts(batch_ids, e, null_ids, c, g_cpu)
            ctx = base.encode_text(batch_ids)
        t = batch_randint(0, diffusion.T, (z0.shape[0],), device=z0.device, generator=g)
        noise = batch_randn(z0.shape, device=z0.device, generator=g)
        xt = diffusion.q_sample(z0, t, noise)
        eps = base(xt, t, **prompt_kwargs(m, ctx, e))
        return (eps.float() - noise).square().mean()

    # the fixed evaluation batch: unseen scenes, each its own image prompt, the empty caption
    world = L.world_for(p, text=True, max_objects=c["base"]["max_objects"])
    ev = world.fixed(c["eval_n"], seed=7, split="train")
    ev_embeds = image_embeds(clip, ev.images.to(p.device))
    ev_judge = judge.encode_image(ev.images)
    with torch.no_grad():
        null_ctx = base.encode_text(tok.encode([L.NULL_CAPTION]).to(p.device))
    curve: list[list[float]] = []

    def callback(step, model, ema):
        if step % c["eval_every"] and step != c["steps"] - 1:
            return
        model.eval()
        images = sample(base, diffusion, vae, null_ctx.expand(len(ev), -1, -1), null_ctx, model, ev_embeds,
                        steps=c["eval_steps"], seed=c["seed"], profile=p)
        sim = float((judge.encode_image(images) * ev_judge).sum(-1).mean())
        agree = evaluator.caption_accuracy(images, ev)
        curve.append([step, round(sim, 4), round(agree, 4)])
        tqdm.write(f"[{c['kind']}] step {step}: image similarity {sim:.3f}, attribute agreement {agree:.3f}")
        model.train()

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], weight_decay=c["weight_decay"], ema_decay=0.0, warmup_steps=0,
                      final_lr_fraction=1.0, log_every=min(c["eval_every"], 50), desc=f"image prompt ({c['kind']})")
    start = time.process_time()
    batches = L.caption_batches(codes, ids, c["batch_size"], c["seed"], lambda i: data.images(i))
    with joined(base, adapter, 1.0):
        res = train(adapter, loss_fn, batches, cfg, p, callback=callback)
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
            "cpu_seconds": round(time.process_time() - start, 1), "steps": c["steps"],
            "batch_size": c["batch_size"], "fidelity_by_step": curve,
            "parameters": sum(q.numel() for q in adapter.parameters())}


def recipe_name(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"image-prompt kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return "shapes-ip-adapter" if kind == "decoupled" else "shapes-ip-concat"


IP_ADAPTER = register(Recipe(
    recipe_name("decoupled"), 1, _config("decoupled"), build_adapter, _train_adapter,
    "IP-Adapter on the locked shapes-ldm-t2i: an image projection of the frozen shapes-clip image embedding to 4 "
    "tokens and decoupled cross-attention (new to_k_ip/to_v_ip per layer, initialised from to_k/to_v); the "
    "caption dropped 50% of the time, the image and both 5% each"))
IP_CONCAT = register(Recipe(
    recipe_name("concat"), 1, _config("concat"), build_adapter, _train_adapter,
    "the naive image prompt at IP-Adapter's budget: the same projection's 4 tokens appended to the caption's "
    "tokens in the locked model's own cross-attention; only the projection is trained"))
RECIPES = {"decoupled": IP_ADAPTER, "concat": IP_CONCAT}


def load_adapter(kind: str, profile: Profile | None = None, verbose: bool = True):
    """The stored adapter of ``kind`` (``"decoupled"``: ``shapes-ip-adapter``, ``"concat"``:
    ``shapes-ip-concat``), trained on first use."""
    profile = profile or current()
    return load(recipe_name(kind), profile, device=profile.device, verbose=verbose)
