"""Chapter 11 (GLIDE, Nichol et al. 2021): text-to-image in pixels, classifier-free against CLIP
guidance, and inpainting, in miniature.

The models are the three recipes of :mod:`diffusion_core.recipes.glide`: ``shapes-glide`` (the
text-conditional pixel model, 16x16 at ``cpu``), ``shapes-clip-noisy`` (the noise-aware CLIP that
guides it) and ``shapes-glide-inpaint`` (the model fine-tuned with the known pixels and the mask as
inputs). The captions are unseen one-object scenes of the training distribution. The samples are
judged by three things that never guided them, and by the one that did:

* the **shapes evaluator** (chapter 05): caption accuracy, the share of samples showing exactly the
  object the caption names (shape, colour, size and grid cell), and FD against real 16 px scenes on
  its features. It reads the world at 32 px, so every image (samples and real scenes alike) is
  brought there by :func:`~diffusion_core.recipes.glide.judge_resolution`;
* ``shapes-clip-judge``, a CLIP trained on *clean* 32 px scenes with another seed: the cosine of
  image and caption (``judge_similarity``);
* the **guiding** noise-aware CLIP itself, read at t = 0 on the final samples: the cosine
  ``cos(f(x_0, 0), g(c))`` (``guide_similarity``). GLIDE's point is that CLIP guidance can raise
  this number by exploiting its own judge, without the image following the caption any better.

1. :func:`guidance_sweep`: classifier-free guidance over :data:`CFG_SCALES` and CLIP guidance over
   :data:`CLIP_SCALES`, every run from the same noise, beside real scenes (the ceiling of every
   score, the floor of FD).
2. :func:`inpainting`: an edit. Each scene's object is erased (the mask's hole is its bounding box
   and a margin) and the caption asks for the object in another colour, at the same place and size;
   the inpainting model against the naive baseline (the base model with the known region replaced at
   every step): caption accuracy of the edited scene, the seam across the hole's border beside the
   same statistic on the real edited scene, and the change outside the hole.
3. :func:`adversarial_ascent`: the gap made by hand: gradient ascent on the guiding CLIP's score
   of a real image for another caption, with nothing else to hold it back.

The bars were fixed before any measurement (:data:`BARS`); :func:`verdicts` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.shapes import Scenes, ShapesWorld
from ..evaluate.attributes import shapes_evaluator
from ..evaluate.frechet import feature_stats, frechet_distance_from_stats
from ..profiles import Profile
from ..recipes import glide as G
from ..recipes.clip import shapes_clip, trim
from ..store import load
from .memo import SampleMemo

PAPER = {
    "glide": "GLIDE (Nichol et al. 2021): a 3.5 billion parameter text-conditional diffusion model at 64x64 "
             "(with an upsampler to 256x256); classifier-free guidance against CLIP guidance with a noised CLIP; "
             "human evaluators preferred classifier-free guidance for both photorealism and caption similarity, "
             "and the paper notes that CLIP guidance can find adversarial examples for the CLIP model, raising "
             "its CLIP score without producing better samples; fine-tuned for inpainting with four extra input "
             "channels, it edits a region from a caption",
    "parameters": 3_500_000_000,
}

CFG_SCALES = (1.0, 2.0, 3.0, 5.0, 8.0)           # classifier-free guidance s (1: the conditional model)
CLIP_SCALES = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)  # CLIP guidance s (0: the conditional model), in logit units
INPAINT_SCALE = 3.0                               # classifier-free guidance of both inpainting samplers
HOLE_MARGIN = 2                                   # pixels around the object's bounding box (16 px images)

# fixed before any measurement: the miniatures must clear these at the cpu profile
BARS = {
    "cfg_over_clip_accuracy": 0.0,      # best caption accuracy over the CFG scales > best over the CLIP scales + 0
    "guide_rise_over_judge_rise": 0.0,  # over the CLIP scales (smallest to largest): the guiding CLIP's cosine rises
    #                                     more than the independent judge's cosine, by more than 0
    "inpaint_accuracy_margin": 0.0,     # inpainting model's caption accuracy >= replacement's - 0
    "inpaint_seam_margin": 0.0,         # inpainting model's seam < replacement's seam - 0
}


def sample_count(profile: Profile) -> int:
    return profile.pick(smoke=16, cpu=200, gpu=1000)


def sampling_steps(profile: Profile) -> int:
    """Respaced ancestral steps (the learned variance makes few steps work; GLIDE samples in 100 or fewer)."""
    return profile.pick(smoke=10, cpu=50, gpu=100)


def world(resolution: int) -> ShapesWorld:
    """The one-object world of the recipes (seed 0, canonical captions)."""
    return ShapesWorld(resolution, seed=0, max_objects=G.MAX_OBJECTS, n_paraphrases=0, n_heldout_paraphrases=0)


# ------------------------------------------------------------------------------------------------
# the setting: models, judges, captions, real references, and a memo of samples
# ------------------------------------------------------------------------------------------------
class Setting(SampleMemo):
    """The three GLIDE models, the evaluator, the judge CLIP, ``n`` unseen scenes whose captions are
    drawn (``scenes``), other real scenes (``real``: the ceiling of every score) and the FD reference
    statistics (500 more real scenes, or ``n`` if more). Samples are memoised by name (:meth:`run`)."""

    def __init__(self, profile: Profile, n: int | None = None, seed: int = 0):
        self.profile, self.seed = profile, seed
        self.glide = G.shapes_glide(profile)
        self.clip = G.noisy_clip(profile)
        self.inpainter = load("shapes-glide-inpaint", profile)
        self.evaluator = shapes_evaluator(profile)
        self.judge = shapes_clip(profile, judge=True)
        self.resolution = self.glide.config["resolution"]
        self.judge_resolution = self.evaluator.resolution
        if self.judge.config["resolution"] != self.judge_resolution:
            raise ValueError("the judge CLIP and the shapes evaluator read different resolutions")
        self.n = n or sample_count(profile)
        self.steps = sampling_steps(profile)
        w = world(self.resolution)
        self.scenes = w.fixed(self.n, seed=seed + 1)
        self.real = w.fixed(self.n, seed=seed + 3)
        self.reference = feature_stats(self.evaluator.features(self.up(w.fixed(max(self.n, 500), seed=seed + 2).images)))
        self.tokenizer = G.tokenizer_for(self.clip.config)
        self.samples: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}

    def up(self, images: torch.Tensor) -> torch.Tensor:
        """Images brought to the judges' resolution."""
        return G.judge_resolution(images, self.judge_resolution)

    def sample(self, guidance: str, scale: float, n: int | None = None, captions: Sequence[str] | None = None,
               seed: int | None = None) -> torch.Tensor:
        caps = list(self.scenes.captions[:n or self.n] if captions is None else captions)
        return G.sample(self.glide, caps, guidance=guidance, scale=scale, clip=self.clip, steps=self.steps,
                        seed=self.seed if seed is None else seed, profile=self.profile)

    @torch.no_grad()
    def guide_similarity(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """(N,) the guiding CLIP's cosine ``cos(f(x, 0), g(c))`` of each (16 px) image and caption."""
        model = self.clip.model.eval()
        dev = next(model.parameters()).device
        out = []
        for i in range(0, len(images), 500):
            x = images[i:i + 500].float().to(dev)
            ids = trim(self.tokenizer.encode(list(captions[i:i + 500]))).to(dev)
            f = nn.functional.normalize(model.encode_image(x, torch.zeros(len(x), dtype=torch.long, device=dev)), dim=-1)
            g = nn.functional.normalize(model.encode_text(ids), dim=-1)
            out.append((f * g).sum(-1).float().cpu())
        return torch.cat(out)

    def judge_similarity(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """(N,) the independent judge CLIP's cosine of each image (at its resolution) and caption."""
        return self.judge.similarity(self.up(images), list(captions))

    def one_object(self, images: torch.Tensor) -> float:
        """The share of ``images`` in which the evaluator sees exactly one object (whatever it is)."""
        return float((self.evaluator.predict(self.up(images))["count"] == 1).float().mean())

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance_from_stats(*feature_stats(self.evaluator.features(self.up(images))), *self.reference)

    def scores(self, images: torch.Tensor, scenes: Scenes | None = None, fd: bool = True) -> dict[str, float]:
        """Caption accuracy (and per attribute), the share showing one object, judge and guide cosines, FD, of 16 px ``images``
        drawn for ``scenes`` (default: the setting's)."""
        scenes = self.scenes[:len(images)] if scenes is None else scenes
        up = self.up(images)
        out = {"caption_accuracy": self.evaluator.caption_accuracy(up, scenes), "one_object": self.one_object(images)}
        for a in ("shape", "color", "size", "position"):
            out[f"{a}_accuracy"] = self.evaluator.caption_accuracy(up, scenes, attributes=(a,))
        out["judge_similarity"] = float(self.judge_similarity(images, scenes.captions).mean())
        out["guide_similarity"] = float(self.guide_similarity(images, scenes.captions).mean())
        if fd:
            out["fd"] = self.fd(images)
        return out


def _check_scales(guidance: str, scales: Sequence[float]) -> list[float]:
    from ..samplers.clip_guidance import check_clip_scale
    from ..samplers.guidance import check_scale

    check = check_scale if guidance == "cfg" else check_clip_scale
    out = [float(check(s)) for s in scales]
    if not out or sorted(out) != out or len(set(out)) != len(out):
        raise ValueError(f"{guidance} scales must be distinct and ascending, got {list(scales)}")
    return out


# ------------------------------------------------------------------------------------------------
# 1. classifier-free against CLIP guidance, over their scales
# ------------------------------------------------------------------------------------------------
def guidance_sweep(profile: Profile, setting: Setting | None = None, cfg_scales: Sequence[float] = CFG_SCALES,
                   clip_scales: Sequence[float] = CLIP_SCALES) -> dict[str, Any]:
    """Every score of :meth:`Setting.scores` for classifier-free guidance at each of ``cfg_scales`` and
    CLIP guidance at each of ``clip_scales`` (the same captions and starting noise for every run),
    and for real scenes (``real``: other renderings of the world, 16 px as the samples).

    Returns ``{"cfg": {s: row}, "clip": {s: row}, "real": row, "samples": {"cfg": {s: (8, 3, R, R)},
    "clip": {...}}, "captions": first 8, "seconds": {name: s}, "n", "steps", "conditional_max_abs_diff"}``;
    the last is the largest pixel difference between CFG at s = 1 and CLIP guidance at s = 0 (both
    the conditional model from the same noise: 0 up to rounding)."""
    runs = {"cfg": _check_scales("cfg", cfg_scales), "clip": _check_scales("clip", clip_scales)}
    s = setting or Setting(profile)
    out: dict[str, Any] = {"n": s.n, "steps": s.steps, "samples": {"cfg": {}, "clip": {}},
                           "captions": s.scenes.captions[:8]}
    for guidance, scales in runs.items():
        out[guidance] = {}
        for sc in scales:
            im = s.run(f"{guidance}_{sc:g}", lambda g=guidance, sc=sc: s.sample(g, sc))
            out[guidance][sc] = {**s.scores(im), "seconds": s.seconds[f"{guidance}_{sc:g}"]}
            out["samples"][guidance][sc] = im[:8]
    out["real"] = s.scores(s.real.images, s.real)
    if 1.0 in runs["cfg"] and 0.0 in runs["clip"]:
        out["conditional_max_abs_diff"] = float((s.samples["cfg_1"] - s.samples["clip_0"]).abs().max())
    out["seconds"] = dict(s.seconds)
    return out


# ------------------------------------------------------------------------------------------------
# 2. inpainting: an edit from a caption
# ------------------------------------------------------------------------------------------------
def hole_masks(scenes: Scenes, margin: int = HOLE_MARGIN, min_side: int | None = None) -> torch.Tensor:
    """(N, 1, R, R) masks, 1 = known, 0 = the hole: the bounding box of each scene's (first) object,
    grown by ``margin`` pixels on every side, at least ``min_side`` (default R / 4, the smallest
    hole the inpainting model was trained on) along each axis, inside the image."""
    cov = scenes.object_masks[:, 0].cpu() > 0.02          # (N, R, R)
    N, R = cov.shape[0], cov.shape[-1]
    if not bool(cov.flatten(1).any(1).all()):
        raise ValueError("every scene needs an object to erase")
    min_side = max(1, R // 4) if min_side is None else min_side
    masks = torch.ones(N, 1, R, R)
    for i in range(N):
        box = []
        for along in (cov[i].any(1), cov[i].any(0)):       # rows, then columns
            idx = torch.nonzero(along)[:, 0]
            lo, hi = int(idx.min()) - margin, int(idx.max()) + 1 + margin
            while hi - lo < min_side:
                lo, hi = lo - 1, hi + 1
            lo, hi = max(0, lo), min(R, hi)
            box.append((lo, hi))
        (r0, r1), (c0, c1) = box
        masks[i, 0, r0:r1, c0:c1] = 0
    return masks


def edit_scenes(scenes: Scenes, seed: int = 0) -> Scenes:
    """The same scenes with the object in another colour (chapter 09's exact re-colouring; never a
    held-out (shape, colour) pair): what the edit's caption names, and the real edited image."""
    from .ip_adapter import recolor

    return recolor(scenes, seed)


def inpainting(profile: Profile, setting: Setting | None = None, scale: float = INPAINT_SCALE,
               n: int | None = None) -> dict[str, Any]:
    """Edit each scene: erase its object (:func:`hole_masks`) and fill the hole from the caption of
    the same object in another colour (:func:`edit_scenes`), with the inpainting model
    (``method="model"``) and with the base model and replacement (``method="replace"``), both with
    classifier-free guidance at ``scale`` from the same noise. Per method: ``caption_accuracy`` of the
    result against the edited scene (the object is inside the hole and the known region is background,
    so this is the accuracy of the filled region), ``one_object`` (the share in which the evaluator sees
    one object at all: an empty hole is a fill too), ``seam`` (:func:`~diffusion_core.recipes.glide.mask_seam`,
    mean over images), ``outside_mse`` (mean squared change of the known pixels); and for the real
    edited scenes (``real``) and the originals (``original``) the same statistics."""
    s = setting or Setting(profile)
    n = n or s.n
    scenes = s.scenes[:n]
    edit = edit_scenes(scenes, s.seed)
    masks = hole_masks(scenes)
    known = scenes.images.float()
    out: dict[str, Any] = {"n": n, "scale": scale, "steps": s.steps,
                           "hole_fraction": float((1 - masks).mean())}
    runs = {}
    for method, stored in (("model", s.inpainter), ("replace", s.glide)):
        runs[method] = s.run(f"inpaint_{method}", lambda m=method, st=stored: G.inpaint(
            st, known, masks, edit.captions, method=m, scale=scale, steps=s.steps, seed=s.seed, profile=s.profile))
    runs["real"], runs["original"] = edit.images, scenes.images
    for name, im in runs.items():
        out[name] = {"caption_accuracy": s.evaluator.caption_accuracy(s.up(im), edit), "one_object": s.one_object(im),
                     "judge_similarity": float(s.judge_similarity(im, edit.captions).mean()),
                     "seam": float(G.mask_seam(im, masks).nanmean()),
                     "outside_mse": float((((im - known) ** 2) * masks).sum() / (masks.sum() * 3))}
        if name in ("model", "replace"):
            out[name]["seconds"] = s.seconds[f"inpaint_{name}"]
    out["images"] = {"original": scenes.images[:8], "masked": (known * masks + (masks - 1))[:8],
                     "model": runs["model"][:8], "replace": runs["replace"][:8], "real": edit.images[:8]}
    out["captions"] = edit.captions[:8]
    return out


# ------------------------------------------------------------------------------------------------
# 3. the adversarial gap by hand
# ------------------------------------------------------------------------------------------------
def adversarial_ascent(setting: Setting, n: int = 8, steps: int = 30, lr: float = 0.02) -> dict[str, Any]:
    """Take ``n`` real scenes and the captions of ``n`` *other* scenes, and climb the guiding CLIP's
    logit ``e^tau cos(f(x, 0), g(c))`` by signed gradient steps of ``lr`` on the pixels (clamped to
    [-1, 1]): what CLIP guidance does at t = 0 with no diffusion model holding the image on the
    data. Returns the guide and judge cosines (with the other captions) and the evaluator's caption
    accuracy before and after, the largest pixel change, and the images."""
    model = setting.clip.model.eval()
    dev = next(model.parameters()).device
    images = setting.real.images[:n].float().to(dev)
    targets = setting.real[torch.roll(torch.arange(n), 1)]
    with torch.no_grad():
        g = model.encode_text(trim(setting.tokenizer.encode(list(targets.captions))).to(dev)).float()
    t0 = torch.zeros(n, dtype=torch.long, device=dev)
    x = images.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(model.score(x, t0, g).sum(), x)
        x = (x.detach() + lr * grad.sign()).clamp(-1, 1)
    x = x.detach().cpu()

    def row(im: torch.Tensor) -> dict[str, float]:
        return {"guide_similarity": float(setting.guide_similarity(im, targets.captions).mean()),
                "judge_similarity": float(setting.judge_similarity(im, targets.captions).mean()),
                "caption_accuracy": setting.evaluator.caption_accuracy(setting.up(im), targets)}

    return {"before": row(images.cpu()), "after": row(x), "max_abs_change": float((x - images.cpu()).abs().max()),
            "images": images.cpu(), "adversarial": x, "captions": targets.captions}


# ------------------------------------------------------------------------------------------------
# training metrics, verdicts
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def loss_by_noise_level(setting: Setting, ts: Sequence[int] = (50, 150, 300, 500, 700, 900), n: int = 200,
                        seed: int = 0) -> dict[str, dict[int, float]]:
    """The base model's eps error ``|eps - eps_theta(x_t, t, c)|^2`` on unseen scenes at each ``t``,
    with the scene's caption (``caption``) and with the empty caption (``empty``): where in the
    reverse process the caption is worth something (the same x_t for both)."""
    model, c = setting.glide.model.eval(), setting.glide.config
    dev = next(model.parameters()).device
    tok = G.tokenizer_for(c)
    d = G.diffusion_for(c)
    scenes = world(setting.resolution).fixed(n, seed=seed + 5)
    x0 = scenes.images.float().to(dev)
    gen = torch.Generator().manual_seed(seed)
    ids = {"caption": tok.encode(list(scenes.captions)).to(dev),
           "empty": tok.encode([G.NULL_CAPTION] * n).to(dev)}
    out: dict[str, dict[int, float]] = {k: {} for k in ids}
    for t in ts:
        tt = torch.full((n,), t, dtype=torch.long, device=dev)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        xt = d.q_sample(x0, tt, eps=eps)
        for k, v in ids.items():
            pred = model(xt, tt, v).float()[:, :3]
            out[k][t] = float(((pred - eps) ** 2).mean())
    return out


def _by_scale(m: dict) -> dict[float, float]:
    if isinstance(m, dict):
        return {float(k): float(v) for k, v in m.items()}
    raise ValueError("a _by_scale value must be a map from scale to value")


def verdicts(m: dict[str, Any]) -> dict[str, bool]:
    """Each bar of :data:`BARS` against the measured numbers (True: cleared). ``m`` has
    ``caption_accuracy_cfg_by_scale``, ``caption_accuracy_clip_by_scale``,
    ``judge_similarity_clip_by_scale``, ``guide_similarity_clip_by_scale`` (scale -> value),
    ``inpaint_caption_accuracy``, ``inpaint_caption_accuracy_replace``, ``inpaint_seam`` and
    ``inpaint_seam_replace``."""
    cfg, clip = _by_scale(m["caption_accuracy_cfg_by_scale"]), _by_scale(m["caption_accuracy_clip_by_scale"])
    judge, guide = _by_scale(m["judge_similarity_clip_by_scale"]), _by_scale(m["guide_similarity_clip_by_scale"])
    if set(judge) != set(guide):
        raise ValueError("the judge's and the guide's similarities must be measured at the same CLIP scales")
    lo, hi = min(guide), max(guide)
    return {
        "cfg_over_clip_accuracy": max(cfg.values()) > max(clip.values()) + BARS["cfg_over_clip_accuracy"],
        "guide_rises_more_than_judge": (guide[hi] - guide[lo]) - (judge[hi] - judge[lo])
        > BARS["guide_rise_over_judge_rise"],
        "inpaint_at_least_as_accurate": m["inpaint_caption_accuracy"]
        >= m["inpaint_caption_accuracy_replace"] - BARS["inpaint_accuracy_margin"],
        "inpaint_smaller_seam": m["inpaint_seam"] < m["inpaint_seam_replace"] - BARS["inpaint_seam_margin"],
    }


def benchmark_metrics(sweep: dict[str, Any], inpaint: dict[str, Any]) -> dict[str, Any]:
    """The issue's keys (every ``_by_scale`` a map from scale to value) from :func:`guidance_sweep`
    and :func:`inpainting`, and the verdicts."""
    def by(guidance: str, key: str) -> dict[float, float]:
        return {sc: row[key] for sc, row in sweep[guidance].items()}

    m = {
        "caption_accuracy_cfg_by_scale": by("cfg", "caption_accuracy"),
        "caption_accuracy_clip_by_scale": by("clip", "caption_accuracy"),
        "judge_similarity_cfg_by_scale": by("cfg", "judge_similarity"),
        "judge_similarity_clip_by_scale": by("clip", "judge_similarity"),
        "guide_similarity_clip_by_scale": by("clip", "guide_similarity"),
        "guide_similarity_cfg_by_scale": by("cfg", "guide_similarity"),
        "fd_cfg_by_scale": by("cfg", "fd"),
        "fd_clip_by_scale": by("clip", "fd"),
        "inpaint_caption_accuracy": inpaint["model"]["caption_accuracy"],
        "inpaint_caption_accuracy_replace": inpaint["replace"]["caption_accuracy"],
        "inpaint_caption_accuracy_real": inpaint["real"]["caption_accuracy"],
        "inpaint_seam": inpaint["model"]["seam"],
        "inpaint_seam_replace": inpaint["replace"]["seam"],
        "inpaint_seam_real": inpaint["real"]["seam"],
        "inpaint_outside_mse": inpaint["model"]["outside_mse"],
        "inpaint_outside_mse_replace": inpaint["replace"]["outside_mse"],
        "real": sweep["real"],
    }
    m["verdicts"] = verdicts(m)
    return m
