"""Chapter 12 (unCLIP / DALL·E 2, Ramesh et al. 2022): a prior from captions to CLIP image embeddings
and a decoder that inverts them, in miniature.

The models are the two recipes of :mod:`diffusion_core.recipes.unclip` around chapter 05's frozen
``shapes-clip``. The captions are those of unseen one-object scenes (chapter 11's world). Judges that
never conditioned anything: the **shapes evaluator** (caption accuracy: the sample shows exactly the
object the caption names; per attribute; FD on its features against real 16 px scenes) and
``shapes-clip-judge`` (the cosine of image and caption). Both read 32 px, so every image is brought
there by :func:`~diffusion_core.recipes.glide.judge_resolution`.

1. :func:`embedding_cosines`: how close to the true image embedding ``z_i`` of the caption's scene is
   the prior's sample, against the baseline of the caption's text embedding ``z_t`` used in its place.
2. :func:`decoding_comparison`: the decoder given the caption in every arm and, as its image
   embedding, the prior's sample, the text embedding, nothing (the learned null embedding: the
   caption alone) or the true ``z_i`` (the decoder's fidelity to an embedding it is given).
3. :func:`variations`: an image's ``(z_i, x_T)`` (``x_T`` by DDIM inversion), decoded with DDIM
   ``eta > 0`` several times without a caption: what stays (what CLIP encodes) and what changes.
4. :func:`interpolation`: decoding along the slerp between two images' embeddings, the noise fixed.

The bars were fixed before any measurement (:data:`BARS`); :func:`verdicts` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.shapes import Scenes, ShapesWorld
from ..evaluate.attributes import CAPTION_ATTRIBUTES, shapes_evaluator
from ..evaluate.frechet import feature_stats, frechet_distance_from_stats
from ..profiles import Profile
from ..recipes import unclip as U
from ..recipes.clip import shapes_clip
from ..recipes.glide import judge_resolution
from ..samplers.ddim import ddim_invert
from ..samplers.guidance import cfg_eps
from .memo import SampleMemo

PAPER = {
    "unclip": "DALL·E 2 / unCLIP (Ramesh et al. 2022, arXiv 2204.06125): a prior produces a CLIP image "
              "embedding from a caption, and a diffusion decoder (GLIDE's architecture with the embedding added "
              "to the timestep embedding and as four extra context tokens) produces an image from it; the "
              "diffusion prior is a decoder-only transformer predicting the unnoised image embedding; the "
              "decoder enables variations of an image and interpolations between images' embeddings",
}

PRIOR_SCALE = 2.0      # classifier-free guidance of the prior's x0-prediction (1: the conditional prior)
PRIOR_CANDIDATES = 2   # samples per caption, the one with the larger z_i . z_t kept (the paper's choice)
DECODER_SCALE = 3.0    # classifier-free guidance of the decoder over z_i and the caption together
DECODER_ETA = 1.0      # DDIM eta of the decoder's samples (1: ancestral on the subsequence)
VARIATIONS = 4         # variations per source image
VARIATION_ETA = 1.0    # DDIM eta of the variations
ARMS = ("prior", "text_embedding", "caption_only", "true_embedding")

# fixed before any measurement: the miniature must clear these at the cpu profile
BARS = {
    "prior_cosine_margin": 0.0,      # mean cos(prior sample, true z_i) > mean cos(z_t, true z_i) + 0
    "caption_accuracy_margin": 0.0,  # caption accuracy decoding the prior's z_i >= decoding z_t - 0
}


def sample_count(profile: Profile) -> int:
    return profile.pick(smoke=16, cpu=200, gpu=1000)


def variation_sources(profile: Profile) -> int:
    return profile.pick(smoke=4, cpu=50, gpu=200)


def sampling_steps(profile: Profile) -> tuple[int, int]:
    """(prior steps, decoder DDIM steps)."""
    return profile.pick(smoke=(10, 8), cpu=(50, 25), gpu=(64, 50))


def world(resolution: int) -> ShapesWorld:
    """The one-object world of the recipes (seed 0, canonical captions)."""
    return ShapesWorld(resolution, seed=0, max_objects=U.MAX_OBJECTS, n_paraphrases=0, n_heldout_paraphrases=0)


class Setting(SampleMemo):
    """The prior and decoder, the frozen CLIP, the evaluator and the judge, ``n`` unseen scenes whose
    captions are drawn (``scenes``), real scenes (``real``) and the FD reference (500 more). Their
    true image embeddings ``z_true``, the text embeddings ``z_text`` and the prior's samples
    ``z_prior`` are computed once; decoded samples are memoised by name (:meth:`run`)."""

    def __init__(self, profile: Profile, n: int | None = None, seed: int = 0):
        self.profile, self.seed = profile, seed
        self.prior, self.decoder = U.shapes_unclip(profile)
        self.clip = U.frozen_clip(profile)
        self.evaluator = shapes_evaluator(profile)
        self.judge = shapes_clip(profile, judge=True)
        self.resolution = self.decoder.config["resolution"]
        self.judge_resolution = self.evaluator.resolution
        self.n = n or sample_count(profile)
        self.prior_steps, self.steps = sampling_steps(profile)
        w = world(self.resolution)
        self.scenes = w.fixed(self.n, seed=seed + 1)
        self.real = w.fixed(self.n, seed=seed + 3)
        self.reference = feature_stats(self.evaluator.features(self.up(w.fixed(max(self.n, 500), seed=seed + 2).images)))
        self.samples: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}
        self.z_true = U.image_embeddings(self.clip, self.scenes.images)
        self.z_text = U.encode_captions(self.clip, self.scenes.captions, self.prior.config["context_length"])[
            "prompt_embeds"].cpu()
        self.z_prior = self.run("prior_embeddings", lambda: U.sample_prior(
            self.prior, self.clip, self.scenes.captions, scale=PRIOR_SCALE, steps=self.prior_steps,
            candidates=PRIOR_CANDIDATES, seed=seed, profile=profile))

    def up(self, images: torch.Tensor) -> torch.Tensor:
        """Images brought to the judges' resolution."""
        return judge_resolution(images, self.judge_resolution)

    def embedding(self, arm: str) -> torch.Tensor | None:
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
        return {"prior": self.z_prior, "text_embedding": self.z_text, "caption_only": None,
                "true_embedding": self.z_true}[arm]

    def decode_arm(self, arm: str) -> torch.Tensor:
        """The decoder's samples for the setting's captions with the arm's image embedding, the
        caption in every arm, the same starting noise for every arm."""
        return self.run(arm, lambda: U.decode(self.decoder, self.clip, self.embedding(arm), self.scenes.captions,
                                              scale=DECODER_SCALE, steps=self.steps, eta=DECODER_ETA, seed=self.seed,
                                              profile=self.profile))

    def judge_similarity(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """(N,) the judge CLIP's cosine of each image (at its resolution) and caption."""
        return self.judge.similarity(self.up(images), list(captions))

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance_from_stats(*feature_stats(self.evaluator.features(self.up(images))), *self.reference)

    def scores(self, images: torch.Tensor, scenes: Scenes | None = None) -> dict[str, float]:
        """Caption accuracy (and per attribute), judge cosine, FD of 16 px ``images`` drawn for ``scenes``,
        and ``clip_cosine``: the frozen CLIP's cosine of each image with its scene's true embedding."""
        scenes = self.scenes[:len(images)] if scenes is None else scenes
        up = self.up(images)
        out = {"caption_accuracy": self.evaluator.caption_accuracy(up, scenes)}
        for a in CAPTION_ATTRIBUTES:
            out[f"{a}_accuracy"] = self.evaluator.caption_accuracy(up, scenes, attributes=(a,))
        out["judge_similarity"] = float(self.judge_similarity(images, scenes.captions).mean())
        out["clip_cosine"] = float((U.image_embeddings(self.clip, images)
                                    * U.image_embeddings(self.clip, scenes.images)).sum(-1).mean())
        out["fd"] = self.fd(images)
        return out


# ------------------------------------------------------------------------------------------------
# 1. the prior against the text embedding
# ------------------------------------------------------------------------------------------------
def embedding_cosines(setting: Setting) -> dict[str, float]:
    """Mean cosine with the true image embedding of the caption's scene: the prior's sample
    (``prior_cosine``) and the caption's text embedding (``text_embedding_cosine``); and for scale,
    the mean cosine of each with the *other* scenes' true embeddings (``*_other``), and of two
    different scenes' true embeddings (``true_other``)."""
    s = setting
    n = s.n
    off = ~torch.eye(n, dtype=torch.bool)
    out = {}
    for name, z in (("prior", s.z_prior), ("text_embedding", s.z_text), ("true", s.z_true)):
        sims = z @ s.z_true.T
        if name != "true":
            out[f"{name}_cosine"] = float(sims.diagonal().mean())
        out[f"{name}_other"] = float(sims[off].mean())
    # how often is the caption's own scene the nearest of the n true embeddings (retrieval by z)?
    for name, z in (("prior", s.z_prior), ("text_embedding", s.z_text)):
        out[f"{name}_recall_at_1"] = float(((z @ s.z_true.T).argmax(1) == torch.arange(n)).float().mean())
    return out


# ------------------------------------------------------------------------------------------------
# 2. decoding from each embedding
# ------------------------------------------------------------------------------------------------
def decoding_comparison(setting: Setting, arms: Sequence[str] = ARMS) -> dict[str, Any]:
    """:meth:`Setting.scores` of the decoder's samples for each arm of ``arms``, and of real scenes;
    ``samples``: the first 8 of each arm; ``captions``: their captions."""
    s = setting
    out: dict[str, Any] = {"n": s.n, "steps": s.steps, "samples": {}, "captions": s.scenes.captions[:8]}
    for arm in arms:
        im = s.decode_arm(arm)
        out[arm] = {**s.scores(im), "seconds": s.seconds[arm]}
        out["samples"][arm] = im[:8]
    out["real"] = s.scores(s.real.images, s.real)
    return out


# ------------------------------------------------------------------------------------------------
# 3. variations
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def invert(setting: Setting, images: torch.Tensor, z_i: torch.Tensor) -> torch.Tensor:
    """``x_T`` of ``images`` (N, 3, R, R) under the decoder given their embeddings ``z_i`` and no caption
    (the conditional decoder, s = 1): DDIM inversion (chapter 03), the paper's bipartite latent."""
    s = setting
    model, c = s.decoder.model.eval(), s.decoder.config
    dev = next(model.parameters()).device
    cond = {"image_embeddings": z_i.to(dev),
            **U.encode_captions(s.clip, [U.NULL_CAPTION] * len(images), c["context_length"])}
    with s.profile.autocast():
        x_T = ddim_invert(lambda x, t: cfg_eps(lambda a, b, cc: model(a, b, **cc).float(), x, t, cond, cond, 1.0),
                          U.decoder_diffusion(c), images.float().to(dev), s.steps, progress=False)
    return x_T.float().cpu()


def variations(setting: Setting, m: int | None = None, k: int = VARIATIONS, eta: float = VARIATION_ETA,
               seed: int = 1) -> dict[str, Any]:
    """``k`` variations of each of ``m`` real scenes: their ``(z_i, x_T)`` decoded with DDIM ``eta`` and
    no caption (guidance over z_i at the decoder's scale), and, for comparison, the reconstruction
    (``eta = 0``, ``s = 1``). Returns the evaluator's agreement of the variations with their source
    scenes (``attribute_agreement``: every attribute; and per attribute), the CLIP cosine of the
    variations with the source's embedding, the mean absolute pixel difference from the source and
    between two variations of one source, the same of the reconstructions, and images for the chapter."""
    s = setting
    m = m or variation_sources(s.profile)
    src = world(s.resolution).fixed(m, seed=s.seed + 7)
    z = U.image_embeddings(s.clip, src.images)
    x_T = s.run(f"invert_{m}", lambda: invert(s, src.images, z))
    rec = s.run(f"reconstruct_{m}", lambda: U.decode(s.decoder, s.clip, z, None, scale=1.0, steps=s.steps, eta=0.0,
                                                      x_T=x_T, profile=s.profile))
    rep = torch.arange(m).repeat(k)                       # variation j of source i at j * m + i
    var = s.run(f"variations_{m}_{k}_{eta:g}", lambda: U.decode(
        s.decoder, s.clip, z[rep], None, scale=DECODER_SCALE, steps=s.steps, eta=eta, x_T=x_T[rep], seed=seed,
        profile=s.profile))
    scenes = src[rep.tolist()]
    up = s.up(var)
    out: dict[str, Any] = {"m": m, "k": k, "eta": eta,
                           "attribute_agreement": s.evaluator.caption_accuracy(up, scenes)}
    for a in CAPTION_ATTRIBUTES:
        out[f"{a}_agreement"] = s.evaluator.caption_accuracy(up, scenes, attributes=(a,))
    out["clip_cosine"] = float((U.image_embeddings(s.clip, var) * z[rep]).sum(-1).mean())
    out["pixel_change_from_source"] = float((var - src.images[rep]).abs().mean())
    v = var.view(k, m, *var.shape[1:])
    out["pixel_change_between_variations"] = float((v[0] - v[1]).abs().mean()) if k > 1 else 0.0
    out["reconstruction_agreement"] = s.evaluator.caption_accuracy(s.up(rec), src)
    out["reconstruction_pixel_change"] = float((rec - src.images).abs().mean())
    out["images"] = {"source": src.images[:8], "reconstruction": rec[:8],
                     "variations": v[:, :8].reshape(-1, *var.shape[1:])}
    return out


# ------------------------------------------------------------------------------------------------
# 4. interpolation
# ------------------------------------------------------------------------------------------------
def interpolation(setting: Setting, pairs: int = 3, points: int = 7, seed: int = 2) -> dict[str, Any]:
    """For ``pairs`` pairs of real scenes, decode ``points`` embeddings along the slerp from one's
    ``z_i`` to the other's (theta from 0 to 1), without a caption, every point from the same noise
    (the same x_T and the same noise at every step: one decode per theta from one seed): ``images``
    (pairs, points, 3, R, R), ``thetas``, ``sources`` (pairs, 2, ...)
    and the evaluator's ``attributes`` of every image (per pair and point: shape, colour, size, cell)."""
    s = setting
    a, b = world(s.resolution).fixed(pairs, seed=s.seed + 11), world(s.resolution).fixed(pairs, seed=s.seed + 12)
    za, zb = U.image_embeddings(s.clip, a.images), U.image_embeddings(s.clip, b.images)
    thetas = torch.linspace(0, 1, points)
    z = U.slerp(za, zb, thetas)                                                # (points, pairs, P)
    R = s.resolution
    im = torch.stack([U.decode(s.decoder, s.clip, z[j], None, scale=DECODER_SCALE, steps=s.steps, eta=DECODER_ETA,
                               seed=seed, profile=s.profile) for j in range(points)], 1).reshape(pairs * points, 3, R, R)
    pred = s.evaluator.predict(s.up(im))
    attrs = []
    for i in range(pairs * points):
        cell = int(pred["present"][i].float().argmax())
        attrs.append({k: int(pred[k][i, cell]) for k in ("shape", "color", "size")} | {"cell": cell})
    return {"images": im.view(pairs, points, 3, R, R), "thetas": thetas.tolist(),
            "sources": torch.stack([a.images, b.images], 1), "attributes": attrs,
            "captions": list(zip(a.captions, b.captions))}


# ------------------------------------------------------------------------------------------------
# verdicts and the benchmark's keys
# ------------------------------------------------------------------------------------------------
def verdicts(m: dict[str, Any]) -> dict[str, bool]:
    """Each bar of :data:`BARS` against the measured numbers (True: cleared). ``m`` has
    ``prior_cosine``, ``text_embedding_cosine``, ``caption_accuracy_prior`` and
    ``caption_accuracy_text_embedding``."""
    for key in ("prior_cosine", "text_embedding_cosine", "caption_accuracy_prior", "caption_accuracy_text_embedding"):
        if key not in m:
            raise ValueError(f"verdicts needs {key!r} in the measurements")
    return {
        "prior_closer_than_text_embedding": m["prior_cosine"] > m["text_embedding_cosine"] + BARS["prior_cosine_margin"],
        "prior_at_least_as_accurate": m["caption_accuracy_prior"]
        >= m["caption_accuracy_text_embedding"] - BARS["caption_accuracy_margin"],
    }


def benchmark_metrics(cos: dict[str, float], dec: dict[str, Any], var: dict[str, Any]) -> dict[str, Any]:
    """The issue's keys from :func:`embedding_cosines`, :func:`decoding_comparison` and :func:`variations`,
    and the verdicts."""
    m = {
        "prior_cosine": cos["prior_cosine"],
        "text_embedding_cosine": cos["text_embedding_cosine"],
        "caption_accuracy_prior": dec["prior"]["caption_accuracy"],
        "caption_accuracy_text_embedding": dec["text_embedding"]["caption_accuracy"],
        "judge_similarity_prior": dec["prior"]["judge_similarity"],
        "judge_similarity_text_embedding": dec["text_embedding"]["judge_similarity"],
        "variation_attribute_agreement": var["attribute_agreement"],
    }
    m["verdicts"] = verdicts(m)
    return m
