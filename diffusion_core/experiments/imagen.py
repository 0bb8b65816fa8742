"""Chapter 13 (Imagen, Saharia et al. 2022): the paper's three findings in miniature.

The models are the recipes of :mod:`diffusion_core.recipes.imagen`: three base models that differ
only in their text encoder (``shapes-imagen-minilm``: the frozen pretrained MiniLM, the stand-in for
Imagen's frozen T5; ``shapes-imagen-clip``: chapter 05's frozen CLIP text tower; ``shapes-imagen-scratch``:
a text transformer trained with the model), 16x16 at ``cpu``, and two super-resolution models 16 -> 32
(``shapes-imagen-sr`` with noise conditioning augmentation, ``shapes-imagen-sr-noaug`` without). The
texts are unseen one-object scenes of the world's fixed evaluation stream, each with its caption, a
training paraphrase and a *held-out* paraphrase (templates and synonyms no training text uses). The
judge is the shapes evaluator (chapter 05), which never guided anything: caption accuracy (shape,
colour, size and grid cell all right) and FD on its features against real scenes at the same
resolution, brought to its 32 px the same way as the samples.

1. :func:`encoder_comparison`: caption accuracy of each base model on captions, training
   paraphrases and held-out paraphrases (classifier-free guidance at :data:`ENCODER_SCALE`), and a
   text-only check of what each encoder makes of a held-out paraphrase (:func:`paraphrase_retrieval`).
2. :func:`cascade`: the MiniLM base model's samples, super-resolved by both SR models; FD of the
   cascade's 32 px output against real 32 px scenes, over the sampling-time augmentation level.
3. :func:`thresholding_sweep`: the MiniLM base model at guidance weights :data:`GUIDANCE_WEIGHTS`
   with no clipping, static clipping and dynamic thresholding, from the same noise: FD, caption
   accuracy and the fraction of saturated values before the final clip.

The bars were fixed before any measurement (:data:`BARS`); :func:`verdicts` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.shapes import Scenes
from ..evaluate.attributes import shapes_evaluator
from ..evaluate.frechet import feature_stats, frechet_distance_from_stats
from ..process.thresholding import METHODS
from ..profiles import Profile
from ..recipes import glide as G
from ..recipes import imagen as R
from ..store import load
from .memo import SampleMemo

PAPER = {
    "imagen": "Imagen (Saharia et al. 2022): a frozen T5-XXL text encoder (4.6B parameters) conditioning a 64x64 "
              "text-to-image diffusion model, then two text-conditional super-resolution models (64 -> 256 -> 1024) "
              "trained with noise conditioning augmentation; sampled with classifier-free guidance and dynamic "
              "thresholding. Zero-shot FID-30K on COCO 7.27; scaling the text encoder improved image-text alignment "
              "and fidelity more than scaling the UNet did",
    "coco_fid_30k": 7.27,
    "t5_xxl_parameters": 4_600_000_000,
}

ENCODER_KEYS = {"minilm": "frozen_lm", "clip": "clip", "scratch": "scratch"}  # the benchmark's names
ENCODER_SCALE = 3.0                   # classifier-free guidance weight of findings 1 and 2 (w = 1: no guidance)
ENCODER_THRESHOLD = "static"          # and their clipping of x0_hat
GUIDANCE_WEIGHTS = (1.0, 3.0, 5.0, 10.0, 20.0)   # finding 3 (the weights)
AUG_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5)           # sampling-time augmentation levels of finding 2
AUG_LEVEL = 0.2                       # the level fd_cascade_aug is read at: fixed before measuring (cosine
#                                       alpha_bar 0.90, noise std 0.31 on the upsampled image)

# fixed before any measurement: the miniatures must clear these at the cpu profile
BARS = {
    "paraphrase_frozen_over_scratch": 0.0,  # held-out paraphrase accuracy: frozen LM >= scratch - 0
    "cascade_aug_over_no_aug": 0.0,         # FD of the cascade: with augmentation (at AUG_LEVEL) < without - 0
    "dynamic_over_static_fd": 0.0,          # at the largest w: FD dynamic < FD static - 0
    "dynamic_over_none_saturated": 0.0,     # at the largest w: saturated fraction dynamic < none - 0
}


def sample_count(profile: Profile) -> int:
    """Scenes per run. The chapter samples 23 base-model runs (with guidance: two forward passes a step)
    and 8 SR runs; at ``cpu`` 128 scenes of 30 steps keep them to about 5 minutes on two cores."""
    return profile.pick(smoke=16, cpu=128, gpu=1000)


def sampling_steps(profile: Profile) -> int:
    """Respaced ancestral steps (the learned variance keeps few steps good: Improved DDPM, chapter 02)."""
    return profile.pick(smoke=10, cpu=30, gpu=100)


class Setting(SampleMemo):
    """The five Imagen models, the evaluator, ``n`` unseen scenes (``scenes``: at the base resolution;
    ``scenes_high``: the same scenes at the SR resolution), other real scenes of both resolutions
    (``real`` / ``real_high``: the ceiling of every score, the floor of FD) and the FD references
    (500 more real scenes each, or ``n`` if more). Samples are memoised by name (:meth:`run`)."""

    def __init__(self, profile: Profile, n: int | None = None, seed: int = 0,
                 encoders: Sequence[str] = R.ENCODERS):
        bad = [e for e in encoders if e not in R.ENCODERS]
        if bad or not len(encoders):
            raise ValueError(f"encoders must be among {R.ENCODERS}, got {list(encoders)}")
        self.profile, self.seed = profile, seed
        self.bases = {e: R.imagen_base(e, profile) for e in encoders}
        self.sr = load("shapes-imagen-sr", profile)
        self.sr_noaug = load("shapes-imagen-sr-noaug", profile)
        self.evaluator = shapes_evaluator(profile)
        self.resolution = next(iter(self.bases.values())).config["resolution"]
        self.high_resolution = self.sr.config["resolution"]
        self.n = n or sample_count(profile)
        self.steps = sampling_steps(profile)
        self.scenes = R.evaluation_scenes(self.n, seed + 1, self.resolution)
        self.scenes_high = R.evaluation_scenes(self.n, seed + 1, self.high_resolution)
        self.real = R.evaluation_scenes(self.n, seed + 3, self.resolution)
        self.real_high = R.evaluation_scenes(self.n, seed + 3, self.high_resolution)
        m = max(self.n, 500)
        self.reference = {r: feature_stats(self.evaluator.features(self.up(R.evaluation_scenes(m, seed + 2, r).images)))
                          for r in (self.resolution, self.high_resolution)}
        self.samples: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}
        self.extra: dict[str, Any] = {}

    def up(self, images: torch.Tensor) -> torch.Tensor:
        """Images brought to the evaluator's resolution."""
        return G.judge_resolution(images, self.evaluator.resolution)

    def texts(self, kind: str) -> list[str]:
        return R.evaluation_texts(self.scenes, kind)

    def base_samples(self, encoder: str = "minilm", kind: str = "caption", scale: float = ENCODER_SCALE,
                     threshold: str = ENCODER_THRESHOLD, clamp: bool = True) -> torch.Tensor:
        """The base model's samples for the scenes' ``kind`` texts (memoised unclamped; ``clamp`` clips
        the copy returned)."""
        raw = self.run(f"base_{encoder}_{kind}_w{scale:g}_{threshold}",
                       lambda: R.sample(self.bases[encoder], self.texts(kind), scale=scale, threshold=threshold,
                                        steps=self.steps, seed=self.seed, clamp=False, profile=self.profile))
        return raw.clamp(-1, 1) if clamp else raw

    def fd(self, images: torch.Tensor) -> float:
        """FD of ``images`` against real scenes of their own resolution (both brought to the evaluator's)."""
        stats = self.reference[images.shape[-1]]
        return frechet_distance_from_stats(*feature_stats(self.evaluator.features(self.up(images))), *stats)

    def scores(self, images: torch.Tensor, scenes: Scenes | None = None, fd: bool = True) -> dict[str, float]:
        """Caption accuracy (and per attribute) and FD of ``images`` drawn for ``scenes`` (default: the setting's)."""
        scenes = self.scenes[:len(images)] if scenes is None else scenes
        up = self.up(images.clamp(-1, 1))
        out = {"caption_accuracy": self.evaluator.caption_accuracy(up, scenes)}
        for a in ("shape", "color", "size", "position"):
            out[f"{a}_accuracy"] = self.evaluator.caption_accuracy(up, scenes, attributes=(a,))
        if fd:
            out["fd"] = self.fd(images.clamp(-1, 1))
        return out


# ------------------------------------------------------------------------------------------------
# 1. the text encoder: frozen language model, frozen CLIP, trained from scratch
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sentence_vectors(stored, texts: Sequence[str]) -> torch.Tensor:
    """(N, D) the mean over the caption's tokens of the token states a base model reads (its frozen
    encoder's, or its own text transformer's), L2-normalised: what the encoder makes of each text."""
    kw = R.encode_captions(stored, list(texts))
    if "input_ids" in kw:
        tokens, mask = stored.model.eval().encode_text(kw["input_ids"])
    else:
        tokens, mask = kw["tokens"], kw["mask"]
    m = mask.to(tokens.dtype)[..., None]
    v = (tokens.float() * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(v.cpu(), dim=-1)


def paraphrase_retrieval(setting: Setting, encoder: str, kind: str = "heldout") -> float:
    """The share of scenes whose ``kind`` paraphrase lies nearer (cosine of :func:`sentence_vectors`) to
    its own scene's caption than to any other distinct caption of the setting's scenes: does the
    encoder put a new phrasing next to the training phrasing of the same scene?"""
    captions = list(setting.scenes.captions)
    distinct = list(dict.fromkeys(captions))
    stored = setting.bases[encoder]
    sims = sentence_vectors(stored, setting.texts(kind)) @ sentence_vectors(stored, distinct).T
    want = torch.tensor([distinct.index(c) for c in captions])
    return float((sims.argmax(1) == want).float().mean())


def encoder_comparison(profile: Profile, setting: Setting | None = None,
                       kinds: Sequence[str] = R.TEXT_KINDS) -> dict[str, Any]:
    """For every base model and text kind, the scores of its samples at :data:`ENCODER_SCALE`, and the
    text-only :func:`paraphrase_retrieval` of the held-out and training paraphrases.

    Returns ``{encoder: {kind: row}}``, ``retrieval`` ``{encoder: {kind: share}}``, ``real`` (the
    evaluator on other real scenes), ``samples`` ``{encoder: {kind: first 8}}``, ``texts`` ``{kind: first 8}``."""
    s = setting or Setting(profile)
    out: dict[str, Any] = {"samples": {}, "retrieval": {}, "texts": {k: s.texts(k)[:8] for k in kinds}}
    for e in s.bases:
        out[e], out["samples"][e] = {}, {}
        for k in kinds:
            im = s.base_samples(e, k)
            out[e][k] = s.scores(im)
            out["samples"][e][k] = im[:8]
        out["retrieval"][e] = {k: paraphrase_retrieval(s, e, k) for k in kinds if k != "caption"}
    out["real"] = s.scores(s.real.images, s.real)
    return out


# ------------------------------------------------------------------------------------------------
# 2. the cascade, with and without noise conditioning augmentation
# ------------------------------------------------------------------------------------------------
def cascade(profile: Profile, setting: Setting | None = None, levels: Sequence[float] = AUG_LEVELS,
            encoder: str = "minilm") -> dict[str, Any]:
    """The base model's samples (the scenes' captions, :data:`ENCODER_SCALE`) super-resolved by
    ``shapes-imagen-sr`` at every sampling-time augmentation level in ``levels`` and by
    ``shapes-imagen-sr-noaug`` (level 0: it was never told of another), each scored at 32 px. Beside
    them: the base samples upsampled bicubically (no SR model), both SR models given the *real*
    low-resolution scenes (what they do when their input is right), and real 32 px scenes.

    Returns ``aug`` ``{level: row}``, ``no_aug`` row, ``bicubic`` row, ``real_low_aug`` (at
    :data:`AUG_LEVEL`), ``real_low_no_aug``, ``real`` rows and ``samples`` (first 8 of each)."""
    levels = [R.check_aug_level(a) for a in levels]
    if not levels or sorted(levels) != levels or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct and ascending, got {list(levels)}")
    s = setting or Setting(profile)
    low = s.base_samples(encoder, "caption")
    R_high = s.high_resolution
    real_low = torch.nn.functional.avg_pool2d(s.scenes_high.images.float(), R_high // s.resolution)
    sr_kw = {"steps": s.steps, "seed": s.seed + 1, "profile": s.profile}
    out: dict[str, Any] = {"aug": {}, "samples": {"low": low[:8]}}
    for a in levels:
        im = s.run(f"sr_aug_{a:g}", lambda a=a: R.super_resolve(s.sr, low, a, **sr_kw))
        out["aug"][a] = s.scores(im, s.scenes_high)
        out["samples"][f"aug_{a:g}"] = im[:8]
    im = s.run("sr_noaug", lambda: R.super_resolve(s.sr_noaug, low, 0.0, **sr_kw))
    out["no_aug"] = s.scores(im, s.scenes_high)
    out["samples"]["no_aug"] = im[:8]
    out["bicubic"] = s.scores(R.upsample(low, R_high).clamp(-1, 1), s.scenes_high)
    for name, sr, a in (("real_low_aug", s.sr, AUG_LEVEL), ("real_low_no_aug", s.sr_noaug, 0.0)):
        im = s.run(name, lambda sr=sr, a=a: R.super_resolve(sr, real_low, a, **sr_kw))
        out[name] = s.scores(im, s.scenes_high)
        out["samples"][name] = im[:8]
    out["samples"]["real_low"] = real_low[:8]
    out["samples"]["real"] = s.scenes_high.images[:8]
    out["real"] = s.scores(s.real_high.images, s.real_high)
    return out


# ------------------------------------------------------------------------------------------------
# 3. dynamic thresholding against static clipping and none, over the guidance weight
# ------------------------------------------------------------------------------------------------
def thresholding_sweep(profile: Profile, setting: Setting | None = None, weights: Sequence[float] = GUIDANCE_WEIGHTS,
                       methods: Sequence[str] = METHODS, encoder: str = "minilm") -> dict[str, Any]:
    """For every method in ``methods`` and guidance weight in ``weights``, the scores of the base
    model's samples for the scenes' captions (the same noise throughout) and ``saturated``: the fraction
    of values at or beyond +-1 before the final clip (:func:`~diffusion_core.recipes.imagen.saturated_fraction`).

    Returns ``{method: {w: row}}``, ``real`` (real scenes' scores and saturated fraction), ``samples``
    ``{method: {w: first 8}}``, and ``alpha_bar_T`` with ``x0_error_gain_first_step`` = 1 / sqrt(alpha_bar_T): how
    much the first reverse step's x0_hat magnifies an error in eps_hat."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not len(methods):
        raise ValueError(f"methods must be among {METHODS}, got {list(methods)}")
    from ..samplers.guidance import check_scale

    weights = [float(check_scale(w)) for w in weights]
    if not weights or sorted(weights) != weights or len(set(weights)) != len(weights):
        raise ValueError(f"weights must be distinct and ascending, got {list(weights)}")
    s = setting or Setting(profile)
    out: dict[str, Any] = {"samples": {}}
    for m in methods:
        out[m], out["samples"][m] = {}, {}
        for w in weights:
            raw = s.base_samples(encoder, "caption", scale=w, threshold=m, clamp=False)
            out[m][w] = {**s.scores(raw), "saturated": R.saturated_fraction(raw)}
            out["samples"][m][w] = raw[:8].clamp(-1, 1)
    out["real"] = {**s.scores(s.real.images, s.real), "saturated": R.saturated_fraction(s.real.images)}
    # why no thresholding can diverge: x0_hat = (x_T - sqrt(1 - alpha_bar_T) eps_hat) / sqrt(alpha_bar_T) multiplies
    # the first step's error in eps_hat by 1 / sqrt(alpha_bar_T)
    ab_T = float(R.diffusion_for(s.bases[encoder].config).alpha_bar[-1])
    out["alpha_bar_T"], out["x0_error_gain_first_step"] = ab_T, ab_T ** -0.5
    return out


# ------------------------------------------------------------------------------------------------
# the benchmark's keys and the bars
# ------------------------------------------------------------------------------------------------
def benchmark_metrics(enc: dict[str, Any], cas: dict[str, Any], thr: dict[str, Any]) -> dict[str, Any]:
    """The issue's keys (``caption_accuracy_by_encoder`` ..., ``saturated_fraction_by_w``) and the verdicts."""
    encs = [e for e in R.ENCODERS if e in enc]
    methods = [m for m in METHODS if m in thr]
    m: dict[str, Any] = {
        "caption_accuracy_by_encoder": {ENCODER_KEYS[e]: enc[e]["caption"]["caption_accuracy"] for e in encs},
        "paraphrase_accuracy_by_encoder": {ENCODER_KEYS[e]: enc[e]["heldout"]["caption_accuracy"] for e in encs},
        "training_paraphrase_accuracy_by_encoder": {ENCODER_KEYS[e]: enc[e]["paraphrase"]["caption_accuracy"]
                                                    for e in encs if "paraphrase" in enc[e]},
        "paraphrase_retrieval_by_encoder": {ENCODER_KEYS[e]: enc["retrieval"][e]["heldout"] for e in encs},
        "fd_cascade_aug": cas["aug"][AUG_LEVEL]["fd"] if AUG_LEVEL in cas["aug"] else None,
        "fd_cascade_no_aug": cas["no_aug"]["fd"],
        "fd_by_aug_level": {a: r["fd"] for a, r in cas["aug"].items()},
        "fd_by_w": {mt: {w: r["fd"] for w, r in thr[mt].items()} for mt in methods},
        "caption_accuracy_by_w": {mt: {w: r["caption_accuracy"] for w, r in thr[mt].items()} for mt in methods},
        "saturated_fraction_by_w": {mt: {w: r["saturated"] for w, r in thr[mt].items()} for mt in methods},
    }
    m["verdicts"] = verdicts(m)
    return m


def verdicts(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each bar of :data:`BARS` against the benchmark's keys: ``{bar: {"value", "bar", "passed"}}``
    (a bar whose numbers are missing is not passed)."""
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float | None, ok: bool) -> None:
        out[name] = {"value": value, "bar": BARS[name], "passed": bool(ok) if value is not None else False}

    p = m["paraphrase_accuracy_by_encoder"]
    v = p["frozen_lm"] - p["scratch"] if {"frozen_lm", "scratch"} <= p.keys() else None
    put("paraphrase_frozen_over_scratch", v, v is not None and v >= -BARS["paraphrase_frozen_over_scratch"])
    a, na = m["fd_cascade_aug"], m["fd_cascade_no_aug"]
    v = na - a if a is not None else None
    put("cascade_aug_over_no_aug", v, v is not None and v > BARS["cascade_aug_over_no_aug"])
    fd, sat = m["fd_by_w"], m["saturated_fraction_by_w"]
    if {"dynamic", "static"} <= fd.keys():
        w = max(fd["dynamic"])
        v = fd["static"][w] - fd["dynamic"][w]
        put("dynamic_over_static_fd", v, v > BARS["dynamic_over_static_fd"])
    else:
        put("dynamic_over_static_fd", None, False)
    if {"dynamic", "none"} <= sat.keys():
        w = max(sat["dynamic"])
        v = sat["none"][w] - sat["dynamic"][w]
        put("dynamic_over_none_saturated", v, v > BARS["dynamic_over_none_saturated"])
    else:
        put("dynamic_over_none_saturated", None, False)
    return out
