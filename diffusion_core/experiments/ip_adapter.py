"""Chapter 09 (IP-Adapter, Ye et al. 2023): an image prompt for a locked text-to-image model, in miniature.

The base is chapter 04's ``shapes-ldm-t2i`` (locked); the adapters are ``shapes-ip-adapter``
(decoupled cross-attention) and ``shapes-ip-concat`` (image tokens concatenated to the caption's in
the existing cross-attention), trained at one budget (:mod:`diffusion_core.recipes.ip_adapter`).
Every image prompt is a real unseen scene; image similarity is judged by a CLIP trained
independently of the one that encodes the prompts (``shapes-clip-judge``), attributes by the shapes
evaluator (chapter 05).

1. :func:`identity_at_zero`: at ``lambda = 0`` the base with an IP-Adapter (fresh or trained) gives
   the text-only samples bit for bit.
2. :func:`image_prompt` (claim a): the image prompt alone (empty caption): judge-CLIP cosine of
   sample and prompt image, and attribute agreement of the sample with the prompt's scene, for the
   decoupled and the concatenated adapter, beside floors (no prompt at all; the text-only base given
   the prompt's caption; a random other image as the prompt; a real image of another scene) and a
   ceiling (a real image of another rendering of the same caption).
3. :func:`conflict_sweep` (claim b): image and caption DISAGREE on the colour (the prompt image
   shows a red circle, the caption asks for a blue circle at the same place and size): image
   similarity and text accuracy (the sample shows what the caption names) over ``lambda``, and the
   concatenated adapter, which has no lambda, beside them.
4. :func:`with_controlnet` (claim c): the image prompt of one scene and chapter 07's edge ControlNet
   on the edges of another, empty caption: edge F1 against the edges and colour taken from the
   image prompt, beside the ControlNet alone, the image prompt alone, the base and real images.

The bars each miniature must clear were fixed before any measurement (:data:`BARS`); :func:`verdicts`
reads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import CANONICAL_TEMPLATE, COLOR_RGB, COLORS, PAD, Scenes, ShapesWorld, is_heldout_pair
from ..evaluate import control as M
from ..evaluate.attributes import shapes_evaluator
from ..models.ip_adapter import IPAdapter
from ..profiles import Profile
from ..recipes import clip as K
from ..recipes import control as C
from ..recipes import ip_adapter as IP
from ..store import load
from .control import LockedBase

PAPER = {
    "ip_adapter": "IP-Adapter (Ye et al. 2023): decoupled cross-attention, a separate key/value pair per "
                  "cross-attention layer for the image tokens, added to the text attention's output; an "
                  "IP-Adapter with only 22M parameters achieves comparable or even better performance than a "
                  "fully fine-tuned image prompt model; the base stays frozen, so the image prompt works with "
                  "text prompts (weighted by lambda) and with existing controllable tools such as ControlNet",
    "parameters_sd15": 22_319_616,
}

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)   # lambda of claim (b)

# fixed before any measurement: the miniatures must clear these at the cpu profile
BARS = {
    "image_similarity_rise": 0.0,        # conflict: image similarity at the largest lambda > at the smallest + 0
    "text_accuracy_fall": 0.0,           # conflict: text accuracy at the largest lambda < at the smallest - 0
    "not_worse_tolerance": 0.02,         # decoupled vs concatenated (lambda = 1): at least as good on one of image
    #                                      similarity (image prompt alone) and text accuracy (conflict), and no
    #                                      more than 0.02 below on the other
    "controlnet_f1_over_base": 0.2,      # image prompt + edge ControlNet: edge F1 >= the base's + 0.2
    "controlnet_color_over_controlnet": 0.2,  # ... and colour from the image prompt >= the ControlNet alone's + 0.2
}


def sample_count(profile: Profile) -> int:
    return profile.pick(smoke=16, cpu=200, gpu=1000)


def sampling_steps(profile: Profile) -> int:
    return profile.pick(smoke=4, cpu=20, gpu=50)


# ------------------------------------------------------------------------------------------------
# the prompts: recoloured scenes (claim b), real images of the same caption (a ceiling)
# ------------------------------------------------------------------------------------------------
def recolor(scenes: Scenes, seed: int = 0) -> Scenes:
    """The same scenes with every object's colour changed to another one (never into a held-out
    (shape, colour) pair, which the base never saw): the image re-composited exactly (objects never
    overlap, so the world's image is ``background * (1 - mask) + sum_k coverage_k * colour_k``), the
    palette recomputed and the canonical caption re-described. Shape, size, position, background and
    the object's exact outline are unchanged."""
    rng = np.random.default_rng([seed, 9])
    old = scenes.color.cpu()
    new = old.clone()
    for b, k in zip(*torch.nonzero(old != PAD, as_tuple=True)):
        shape = scenes.shape[b, k].cpu()
        choices = [c for c in range(len(COLORS)) if c != int(old[b, k])
                   and not bool(is_heldout_pair(shape, torch.tensor(c)))]
        new[b, k] = int(rng.choice(choices))
    rgb = torch.from_numpy(COLOR_RGB)
    delta = (rgb[new.clamp(min=0)] - rgb[old.clamp(min=0)]) * (old != PAD)[..., None]      # (B, K, 3)
    images = ((scenes.images.cpu() + 1) / 2 + torch.einsum("bkhw,bkc->bchw", scenes.object_masks.cpu(), delta))
    images = images.clamp(0, 1) * 2 - 1
    R = images.shape[-1]
    block = R // 8
    palette = F.avg_pool2d(images, block).repeat_interleave(block, 2).repeat_interleave(block, 3)
    out = replace(scenes.to("cpu"), color=new, images=images, palette=palette)
    return replace(out, captions=out.describe(CANONICAL_TEMPLATE, words="canonical"),
                   paraphrases=[[] for _ in range(len(out))], heldout_paraphrases=[[] for _ in range(len(out))],
                   relations=out.describe(CANONICAL_TEMPLATE, words="canonical"))


def same_caption_images(scenes: Scenes, resolution: int, seed: int = 4242, chunk: int = 2000,
                        max_chunks: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """For each one-object scene, another real rendering with the same caption (the same shape,
    colour, size and grid cell; its own background and jitter), drawn from fresh scenes of the
    world: ``(images (N, 3, R, R), found (N,) bool)``; rows not found (rare) are zeros."""
    key = (scenes.shape[:, 0] * 1000 + scenes.color[:, 0] * 100 + scenes.size[:, 0] * 10 + scenes.position[:, 0]).tolist()
    out = torch.zeros_like(scenes.images.cpu())
    found = torch.zeros(len(scenes), dtype=torch.bool)
    want: dict[int, list[int]] = {}
    for i, k in enumerate(key):
        want.setdefault(k, []).append(i)
    world = ShapesWorld(resolution=resolution, seed=seed, max_objects=1, split="train", n_paraphrases=0,
                        n_heldout_paraphrases=0)
    for j in range(max_chunks):
        pool = world.sample(chunk, seed=j)
        pk = (pool.shape[:, 0] * 1000 + pool.color[:, 0] * 100 + pool.size[:, 0] * 10 + pool.position[:, 0]).tolist()
        for row, k in enumerate(pk):
            if want.get(k):
                i = want[k].pop()
                out[i], found[i] = pool.images[row], True
        if bool(found.all()):
            break
    return out, found


# ------------------------------------------------------------------------------------------------
# the setting: base, prompts, judges, and a memo of samples shared by the claims
# ------------------------------------------------------------------------------------------------
class Setting(LockedBase):
    """The locked base model with its autoencoder, process and tokenizer; a fixed set of unseen
    one-object scenes (the image prompts, the same scenes as chapter 07's); their frozen-CLIP
    embeddings; another scene for each (``other``: the next one, a random other image); the
    recoloured scenes and captions of claim (b) (``conflict``); the judge CLIP and the shapes
    evaluator. Samples are memoised by name (:meth:`run`) so the claims share them."""

    def __init__(self, profile: Profile, n: int | None = None, seed: int = 1):
        super().__init__(profile, n or sample_count(profile), seed)
        self.n = len(self.scenes)
        self.perm = torch.roll(torch.arange(self.n), -1)
        self.other = self.scenes[self.perm]
        self.conflict = recolor(self.scenes, seed)
        self.clip = K.shapes_clip(profile)
        self.judge = K.shapes_clip(profile, judge=True)
        self.evaluator = shapes_evaluator(profile)
        self.embeds = self.clip.encode_image(self.scenes.images)              # (N, P) unit, CPU
        self.judge_prompts = self.judge.encode_image(self.scenes.images)
        with torch.no_grad():
            self.conflict_context = self.encode(self.conflict.captions)
        self.steps = sampling_steps(profile)
        self.samples: dict[str, torch.Tensor] = {}

    def empty(self, n: int | None = None) -> torch.Tensor:
        return self.null.expand(n or self.n, -1, -1)

    def sample(self, adapter=None, embeds: torch.Tensor | None = None, scale: float = 1.0,
               context: torch.Tensor | None = None, controlnet=None, cond: torch.Tensor | None = None,
               seed: int = 0, n: int | None = None) -> torch.Tensor:
        """Samples for the first ``n`` scenes (all by default), from the same noise whatever the
        prompts: ``context`` the caption states (default: the scenes' captions), ``embeds`` the image
        embeddings (default: the scenes' own), ``scale`` IP-Adapter's lambda."""
        n = n or self.n
        ctx = (self.context if context is None else context)[:n]
        if adapter is not None and embeds is None:
            embeds = self.embeds
        return IP.sample(self.base, self.diffusion, self.vae, ctx, self.null, adapter,
                         None if embeds is None else embeds[:n], scale, controlnet,
                         None if cond is None else cond[:n], steps=self.steps, seed=seed, profile=self.profile)

    def run(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The samples called ``name``: made once by ``make()``, then reused."""
        if name not in self.samples:
            self.samples[name] = make()
        return self.samples[name]

    def image_similarity(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) judge-CLIP cosine of each image with its prompt image (or with ``reference`` images)."""
        ref = self.judge_prompts[:len(images)] if reference is None else self.judge.encode_image(reference)
        return (self.judge.encode_image(images) * ref).sum(-1)


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean())


def load_adapter(kind: str, profile: Profile):
    return IP.load_adapter(kind, profile)


# ------------------------------------------------------------------------------------------------
# 1. lambda = 0 is the text-only model
# ------------------------------------------------------------------------------------------------
def identity_at_zero(profile: Profile, setting: Setting | None = None, n: int = 8, seed: int = 0,
                     trained: bool = True) -> dict[str, Any]:
    """Samples of the base with an IP-Adapter at ``lambda = 0`` against the text-only base (the same
    captions and noise, image prompts given): for a fresh adapter (random projection, keys/values
    copied from the text ones) and (``trained``) for the trained one; and at ``lambda = 1`` for contrast."""
    s = setting or Setting(profile)
    fresh = IP.build_adapter(IP.RECIPES["decoupled"].config(profile)).to(s.device)
    IP.init_from_base(fresh, s.base.unet)
    adapters = [("fresh", fresh)]
    if trained:
        adapters.append(("trained", load_adapter("decoupled", profile).model))
    plain = s.sample(seed=seed, n=n)
    out: dict[str, Any] = {"n": n}
    for name, a in adapters:
        zero = s.sample(a, scale=0.0, seed=seed, n=n)
        one = s.sample(a, scale=1.0, seed=seed, n=n)
        out[name] = {"equal_at_zero": bool(torch.equal(plain, zero)),
                     "max_abs_diff_at_zero": float((plain - zero).abs().max()),
                     "max_abs_diff_at_one": float((plain - one).abs().max())}
    return out


# ------------------------------------------------------------------------------------------------
# 2. claim (a): the image prompt alone, decoupled vs concatenated
# ------------------------------------------------------------------------------------------------
def _fidelity(s: Setting, images: torch.Tensor, scenes: Scenes | None = None) -> dict[str, float]:
    scenes = s.scenes if scenes is None else scenes
    return {"image_similarity": _mean(s.image_similarity(images)),
            "attribute_agreement": s.evaluator.caption_accuracy(images, scenes),
            "shape_color_agreement": _mean(s.evaluator.matches(images, scenes, ("shape", "color")))}


def image_prompt(profile: Profile, setting: Setting | None = None, seed: int = 0) -> dict[str, Any]:
    """Claim (a). Every prompt image is an unseen real scene; the samples are scored against it:
    judge-CLIP cosine (``image_similarity``) and the shapes evaluator's agreement of the sample with
    the prompt's scene (shape, colour, size and cell: ``attribute_agreement``; shape and colour
    only, wherever the object is: ``shape_color_agreement``). Rows:

    * ``decoupled`` / ``concat``: the image prompt alone (empty caption, lambda = 1);
    * ``base_empty``: neither prompt (the floor); ``base_text``: the text-only base given the prompt's
      caption (what the caption alone conveys); ``decoupled_other``: IP-Adapter given a random other
      image (scored against the intended one);
    * ``real_same_caption``: another real rendering of the same caption (a ceiling for what a
      caption-perfect image scores); ``real_other``: a real image of another scene (a floor).

    Also ``text_only``: caption accuracy of the text-only base, of IP-Adapter at lambda = 0 (the same
    samples, :func:`identity_at_zero`), and of the concatenated adapter given the caption and the
    zero ("no image") embedding, whose tokens it cannot switch off."""
    s = setting or Setting(profile)
    dec, cat = load_adapter("decoupled", profile), load_adapter("concat", profile)
    zeros = torch.zeros_like(s.embeds)
    runs = {
        "base_empty": s.run("base_empty", lambda: s.sample(context=s.empty(), seed=seed)),
        "base_text": s.run("base_text", lambda: s.sample(seed=seed)),
        "decoupled": s.run("decoupled", lambda: s.sample(dec.model, context=s.empty(), seed=seed)),
        "concat": s.run("concat", lambda: s.sample(cat.model, context=s.empty(), seed=seed)),
        "decoupled_other": s.run("decoupled_other",
                                 lambda: s.sample(dec.model, s.embeds[s.perm], context=s.empty(), seed=seed)),
    }
    out: dict[str, Any] = {"n": s.n, "sampling_steps": s.steps}
    for name, im in runs.items():
        out[name] = _fidelity(s, im)
    same, found = same_caption_images(s.scenes, s.scenes.images.shape[-1])
    out["real_same_caption"] = {"image_similarity": _mean(s.image_similarity(same[found], s.scenes.images[found])),
                                "attribute_agreement": s.evaluator.caption_accuracy(same[found], s.scenes[found]),
                                "shape_color_agreement": _mean(s.evaluator.matches(same[found], s.scenes[found],
                                                                                   ("shape", "color"))),
                                "found": int(found.sum())}
    out["real_other"] = _fidelity(s, s.other.images)
    out["real_prompt"] = _fidelity(s, s.scenes.images)
    concat_text = s.run("concat_text", lambda: s.sample(cat.model, zeros, seed=seed))
    out["text_only"] = {"base": s.evaluator.caption_accuracy(runs["base_text"], s.scenes),
                        "concat_no_image": s.evaluator.caption_accuracy(concat_text, s.scenes),
                        "real": out["real_prompt"]["attribute_agreement"]}
    out["samples"] = {k: v[:16] for k, v in {**runs, "concat_text": concat_text}.items()}
    out["prompts"] = s.scenes.images[:16]
    out["train"] = {k: {m: a.metrics.get(m) for m in ("train_seconds", "cpu_seconds", "steps", "batch_size",
                                                      "parameters", "final_loss")}
                    for k, a in (("decoupled", dec), ("concat", cat))}
    out["fidelity_by_step"] = {k: a.metrics.get("fidelity_by_step", []) for k, a in (("decoupled", dec), ("concat", cat))}
    return out


# ------------------------------------------------------------------------------------------------
# 3. claim (b): image and caption disagree on the colour, over lambda
# ------------------------------------------------------------------------------------------------
def _conflict_scores(s: Setting, images: torch.Tensor) -> dict[str, float]:
    ev = s.evaluator
    return {"image_similarity": _mean(s.image_similarity(images)),
            "text_accuracy": ev.caption_accuracy(images, s.conflict),
            "color_from_image": _mean(ev.matches(images, s.scenes, ("color",))),
            "color_from_text": _mean(ev.matches(images, s.conflict, ("color",)))}


def conflict_sweep(profile: Profile, setting: Setting | None = None, scales: tuple[float, ...] = SCALES,
                   seed: int = 0) -> dict[str, Any]:
    """Claim (b). The prompt image is the real scene (a red circle, say); the caption names the same
    shape, size and place in another colour (a blue circle): :func:`recolor`. For each lambda the
    IP-Adapter's samples get: judge-CLIP similarity to the prompt image, text accuracy (the sample
    shows exactly what the caption names: every attribute, the caption's colour), and which colour
    won (``color_from_image``, ``color_from_text``). ``concat``: the concatenated adapter (no lambda).
    References: ``real_text`` (the recoloured real image: what obeying the caption exactly scores)
    and ``real_image`` (the prompt image itself)."""
    s = setting or Setting(profile)
    dec, cat = load_adapter("decoupled", profile).model, load_adapter("concat", profile).model
    ctx = s.conflict_context
    by_scale = {}
    for sc in scales:
        im = s.run(f"conflict_{sc:g}", lambda sc=sc: s.sample(dec, scale=sc, context=ctx, seed=seed))
        by_scale[float(sc)] = _conflict_scores(s, im)
    concat = s.run("conflict_concat", lambda: s.sample(cat, context=ctx, seed=seed))
    out: dict[str, Any] = {"n": s.n, "scales": [float(x) for x in scales], "by_scale": by_scale,
                           "concat": _conflict_scores(s, concat),
                           "real_text": _conflict_scores(s, s.conflict.images),
                           "real_image": _conflict_scores(s, s.scenes.images)}
    out["samples"] = {**{f"{sc:g}": s.samples[f"conflict_{sc:g}"][:8] for sc in scales}, "concat": concat[:8]}
    out["prompts"], out["captions"] = s.scenes.images[:8], s.conflict.captions[:8]
    return out


# ------------------------------------------------------------------------------------------------
# 4. claim (c): image prompt + chapter 07's edge ControlNet
# ------------------------------------------------------------------------------------------------
def with_controlnet(profile: Profile, setting: Setting | None = None, seed: int = 0) -> dict[str, Any]:
    """Claim (c). The edges of scene A (chapter 07's edge ControlNet) and the image prompt of another
    scene B (``other``), the empty caption: does the sample keep A's outline (edge F1 against A's
    edges) and take B's colour (the evaluator sees one object of B's colour: ``color_from_image``)?
    Rows: the base (neither), the ControlNet alone, IP-Adapter alone, both; real images of A."""
    s = setting or Setting(profile)
    dec = load_adapter("decoupled", profile).model
    cn = load(C.controlnet_recipe_name("edges"), profile, device=profile.device).model
    edges = C.conditions(s.scenes, "edges")
    other = s.embeds[s.perm]
    runs = {
        "base": s.run("base_empty", lambda: s.sample(context=s.empty(), seed=seed)),
        "controlnet": s.run("controlnet", lambda: s.sample(context=s.empty(), controlnet=cn, cond=edges, seed=seed)),
        "ip_adapter": s.run("decoupled_other", lambda: s.sample(dec, other, context=s.empty(), seed=seed)),
        "ip_adapter_controlnet": s.run("decoupled_other_controlnet", lambda: s.sample(
            dec, other, context=s.empty(), controlnet=cn, cond=edges, seed=seed)),
        "real": s.scenes.images,
    }
    out: dict[str, Any] = {"n": s.n}
    for name, im in runs.items():
        f1 = M.edge_scores(M.edge_map(im), edges, tolerance=1)
        out[name] = {"edge_f1": _mean(f1["f1"]),
                     "color_from_image": _mean(s.evaluator.matches(im, s.other, ("color",))),
                     "image_similarity_to_prompt": _mean(s.image_similarity(im, s.other.images))}
    out["samples"] = {k: v[:8] for k, v in runs.items()}
    out["edges"], out["prompts"] = edges[:8], s.other.images[:8]
    return out


# ------------------------------------------------------------------------------------------------
# cost, parameters, verdicts
# ------------------------------------------------------------------------------------------------
def step_overhead(profile: Profile, batch: int = 64, steps: int = 10, repeats: int | None = None,
                  seed: int = 0) -> dict[str, float]:
    """Sampling time per step with the IP-Adapter (image prompt and caption, lambda = 1) over the
    text-only base: the same batch, guidance and steps; runs interleave; medians."""
    s = Setting(profile, n=batch)
    dec = load_adapter("decoupled", profile).model
    repeats = repeats or profile.pick(smoke=1, cpu=5, gpu=5)
    s.steps = steps
    plain, with_ip = [], []
    s.sample(n=batch, seed=seed)  # warm-up
    for _ in range(repeats):
        for runs, a in ((plain, None), (with_ip, dec)):
            start = time.perf_counter()
            s.sample(a, n=batch, seed=seed)
            runs.append(time.perf_counter() - start)
    p, w = sorted(plain)[len(plain) // 2], sorted(with_ip)[len(with_ip) // 2]
    return {"ratio": w / p, "seconds_per_step_base": p / steps, "seconds_per_step_ip_adapter": w / steps}


def parameters(profile: Profile) -> dict[str, int]:
    """Trainable parameters of each adapter, the locked UNet's, and the SD 1.5 IP-Adapter's."""
    from .. import presets

    dec, cat = (IP.build_adapter(IP.RECIPES[k].config(profile)) for k in IP.KINDS)
    stored = load(C.BASE, profile, verbose=False)
    assert isinstance(dec, IPAdapter)
    return {"decoupled": sum(p.numel() for p in dec.parameters()),
            "decoupled_projection": sum(p.numel() for p in dec.image_proj.parameters()),
            "concat": sum(p.numel() for p in cat.parameters()),
            "base_unet": sum(p.numel() for p in stored.model.unet.parameters()),
            "sd15_ip_adapter": presets.count_parameters(presets.build("ip-adapter-sd15")),
            "sd15_unet": presets.count_parameters(presets.build("sd15-unet"))}


def verdicts(m: dict[str, Any]) -> dict[str, bool]:
    """Each bar of :data:`BARS` against the measured numbers (True: cleared). ``m`` has
    ``image_similarity_by_scale`` and ``text_accuracy_by_scale`` (lambda -> value), the decoupled and
    concatenated ``image_similarity_*`` and ``text_accuracy_*``, and the ControlNet numbers."""
    sims = {float(k): v for k, v in m["image_similarity_by_scale"].items()}
    texts = {float(k): v for k, v in m["text_accuracy_by_scale"].items()}
    lo, hi = min(sims), max(sims)
    tol = BARS["not_worse_tolerance"]
    sd, sc = m["image_similarity_decoupled"], m["image_similarity_concat"]
    td, tc = m["text_accuracy_decoupled"], m["text_accuracy_concat"]
    return {
        "image_similarity_rises_with_scale": sims[hi] > sims[lo] + BARS["image_similarity_rise"],
        "text_accuracy_falls_with_scale": texts[hi] < texts[lo] - BARS["text_accuracy_fall"],
        "decoupled_at_least_concat": (sd >= sc and td >= tc - tol) or (td >= tc and sd >= sc - tol),
        "controlnet_f1_over_base": m["edge_f1_with_controlnet"] >= m["edge_f1_base"] + BARS["controlnet_f1_over_base"],
        "controlnet_color_from_image": m["color_from_image_with_controlnet"]
        >= m["color_from_image_controlnet_only"] + BARS["controlnet_color_over_controlnet"],
    }
