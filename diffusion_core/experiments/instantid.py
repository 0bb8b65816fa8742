"""Chapter 10 (InstantID, Wang et al. 2024): a person's identity from one photo, in miniature.

The base is the locked faces text-to-image model ``faces-ldm-t2i`` (chapter 04's recipe on faces);
the models are ``faces-instantid`` (face embedding -> Resampler -> decoupled cross-attention, and
IdentityNet on the landmarks) and ``faces-ip-clip`` (IP-Adapter with the faces CLIP's image
embedding), trained at one budget (:mod:`diffusion_core.recipes.instantid`). Every test person is a
*held-out* identity: no model of the chapter has seen them. Identity is judged by
``faces-identity-judge``, an ArcFace encoder trained with another seed than the one InstantID
conditions on; landmarks and nuisances by ``faces-evaluator``.

1. :func:`identity_at_zero`: with the image adapter at ``lambda = 0`` and IdentityNet at scale 0,
   the base's samples come back bit for bit (the seams add nothing when turned off).
2. :func:`identity_claim`: for ``n`` held-out people, one reference photo each and a *target* (the
   same person under other nuisances: its caption, and its landmarks for IdentityNet): judge cosine
   of sample and reference, landmark error of the sample against the target's landmarks, and the
   caption's nuisances read back from the sample, for InstantID, InstantID without IdentityNet,
   IP-Adapter with CLIP and the base alone; beside the real ceiling (another real photo of the same
   person), the same photo through the autoencoder (what any model sampling in its latent space can at
   best reach) and the floor (a real photo of another person).
3. :func:`scale_sweep`: identity and landmarks over IdentityNet's scale (and the adapter's lambda).

The bars were fixed before any measurement (:data:`BARS`); :func:`verdicts` reads them.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..data.faces import landmark_map
from ..evaluate.faces import faces_evaluator
from ..evaluate.identity import embed, identity_encoder
from ..profiles import Profile
from ..recipes import faces as FR
from ..recipes import instantid as R
from ..recipes import latent as L

BARS = {
    "identity_over_ip_clip": 0.0,          # InstantID's judge similarity > IP-Adapter-with-CLIP's + 0
    "identity_over_other_person": 0.0,     # ... and > the real other-person floor + 0
    "landmark_gain": 0.0,                  # landmark error with IdentityNet < without - 0 (pixels)
    "verification_accuracy": 0.9,          # the identity encoder on held-out identities
    "text_control_fraction": 0.5,          # InstantID's expression and background accuracy at least half-way
    #                                        from chance to the base model's own (the text still controls them)
}
TEXT_NUISANCES = ("expression", "background")   # what the caption says and the identity does not decide


def sample_count(profile: Profile) -> int:
    return profile.pick(smoke=16, cpu=200, gpu=1000)


def sampling_steps(profile: Profile) -> int:
    return profile.pick(smoke=4, cpu=20, gpu=50)


class Setting:
    """Everything the chapter's experiments load once: the locked base, its autoencoder and process,
    the tokenizer, the two trained models, their prompt encoders, the judge and the evaluator."""

    def __init__(self, profile: Profile):
        self.profile = profile
        stored, self.vae, self.diffusion = FR.load_base(profile)
        self.base = stored.model.to(profile.device)
        self.tok = FR.tokenizer()
        self.stored = {k: R.load_model(k, profile) for k in R.KINDS}
        self.models = {k: s.model.eval().requires_grad_(False) for k, s in self.stored.items()}
        self.encoders = {k: R.PromptEncoder(k, profile) for k in R.KINDS}
        self.judge = identity_encoder(profile, judge=True).model.eval()
        self.encoder_metrics = identity_encoder(profile, verbose=False).metrics
        self.evaluator = faces_evaluator(profile)
        self.null = self.text([L.NULL_CAPTION])

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
        """``D(E(x))`` with the posterior mean: what the latent space keeps of ``images``."""
        dev = next(self.vae.parameters()).device
        return torch.cat([self.vae.decode(self.vae.encode(images[i:i + batch].to(dev)).mode()).clamp(-1, 1).cpu()
                          for i in range(0, len(images), batch)])

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        return self.base.encode_text(self.tok.encode(captions).to(self.profile.device))

    def sample(self, kind: str | None, ref: Any, target: Any, ip_scale: float = 1.0, identitynet_scale: float = 1.0,
               seed: int = 0, steps: int | None = None) -> torch.Tensor:
        """Samples for ``target``'s captions, with the model of ``kind`` (None: the base alone) given
        ``ref``'s images as the image prompt and (InstantID) ``target``'s landmarks."""
        model = None if kind is None else self.models[kind]
        embeds = None if kind is None else self.encoders[kind](ref.images)
        marks = target.landmarks if kind == "instantid" and identitynet_scale != 0 else None
        return R.sample(self.base, self.diffusion, self.vae, self.text(target.captions), self.null, model, embeds,
                        marks, ip_scale, identitynet_scale, steps=steps or sampling_steps(self.profile), seed=seed,
                        profile=self.profile)

    def similarity(self, images: torch.Tensor, ref: Any) -> torch.Tensor:
        """(N,) the judge's cosine of each image with its reference photo."""
        return (embed(self.judge, images) * embed(self.judge, ref.images)).sum(-1)

    def scores(self, images: torch.Tensor, ref: Any, target: Any) -> dict[str, float]:
        acc = self.evaluator.nuisance_accuracy(images, {k: getattr(target, k) for k in FR.NUISANCES})
        return {"identity_similarity": self.similarity(images, ref).mean().item(),
                "landmark_error": self.evaluator.landmark_error(images, target.landmarks).mean().item(),
                **{f"{k}_accuracy": v for k, v in acc.items()}}


def identity_at_zero(profile: Profile, setting: Setting, n: int = 4) -> dict[str, Any]:
    """InstantID at ``lambda = 0`` and IdentityNet scale 0 against the base alone (same noise)."""
    ref, target = R.reference_and_target(profile, n, seed=3)
    base = setting.sample(None, ref, target, steps=3)
    off = setting.sample("instantid", ref, target, ip_scale=0.0, identitynet_scale=0.0, steps=3)
    on = setting.sample("instantid", ref, target, steps=3)
    return {"equal_at_zero": bool(torch.equal(base, off)), "max_abs_diff_at_one": (on - base).abs().max().item()}


def identity_claim(profile: Profile, setting: Setting, n: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Claims 1-3 of the chapter on ``n`` held-out people (see the module docstring)."""
    n = n or sample_count(profile)
    ref, target = R.reference_and_target(profile, n, seed=100 + seed)
    out: dict[str, Any] = {"n": n, "sampling_steps": sampling_steps(profile)}
    timing = {}
    for name, kind, kw in (("instantid", "instantid", {}), ("no_identitynet", "instantid", {"identitynet_scale": 0.0}),
                           ("ip_clip", "ip-clip", {}), ("base", None, {})):
        start = time.perf_counter()
        images = setting.sample(kind, ref, target, seed=seed, **kw)
        timing[name] = round(time.perf_counter() - start, 1)
        out[name] = setting.scores(images, ref, target)
        if name == "instantid":
            out["images"] = images[:8]
    # the real references: the target photo itself (same person), and another person's photo; and the
    # target photo through the autoencoder, the best any model sampling in its latent space can do
    out["real_same_person"] = setting.scores(target.images, ref, target)
    out["autoencoder_same_person"] = setting.scores(setting.reconstruct(target.images), ref, target)
    other = target[torch.roll(torch.arange(n), 1)]
    out["real_other_person"] = {"identity_similarity": setting.similarity(other.images, ref).mean().item()}
    out["chance"] = {f"{k}_accuracy": 1 / len(FR.NUISANCE_NAMES[k]) for k in FR.NUISANCES}
    out["seconds"] = timing
    out["reference_images"], out["target_images"] = ref.images[:8], target.images[:8]
    out["target_landmark_maps"] = landmark_map(target.landmarks[:8], ref.images.shape[-1])
    return out


def scale_sweep(profile: Profile, setting: Setting, scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5),
                n: int | None = None, seed: int = 0) -> dict[float, dict[str, float]]:
    """Identity similarity and landmark error of InstantID over IdentityNet's conditioning scale."""
    n = n or profile.pick(smoke=8, cpu=64, gpu=200)
    ref, target = R.reference_and_target(profile, n, seed=200 + seed)
    res = {}
    for s in scales:
        images = setting.sample("instantid", ref, target, identitynet_scale=s, seed=seed)
        sc = setting.scores(images, ref, target)
        res[s] = {"identity_similarity": sc["identity_similarity"], "landmark_error": sc["landmark_error"]}
    return res


def parameters(setting: Setting) -> dict[str, int]:
    m = setting.models["instantid"]
    return {"instantid": sum(p.numel() for p in m.parameters()),
            "instantid_adapter": sum(p.numel() for p in m.adapter.parameters()),
            "identitynet": sum(p.numel() for p in m.identitynet.parameters()),
            "ip_clip": sum(p.numel() for p in setting.models["ip-clip"].parameters()),
            "base_unet": sum(p.numel() for p in setting.base.unet.parameters())}


def verdicts(m: dict[str, Any]) -> dict[str, bool]:
    """Each bar of :data:`BARS` against the measured numbers (True: cleared)."""
    frac = BARS["text_control_fraction"]
    text_ok = all(m["nuisance_accuracy_instantid"][k] >= m["chance"][k] + frac * (m["nuisance_accuracy_base"][k]
                                                                                  - m["chance"][k])
                  for k in TEXT_NUISANCES)
    return {
        "identity_over_ip_clip": m["identity_similarity_instantid"]
        > m["identity_similarity_ip_clip"] + BARS["identity_over_ip_clip"],
        "identity_over_other_person": m["identity_similarity_instantid"]
        > m["identity_similarity_other_person_real"] + BARS["identity_over_other_person"],
        "landmarks_better_with_identitynet": m["landmark_error_instantid"]
        < m["landmark_error_no_identitynet"] - BARS["landmark_gain"],
        "verification_accuracy": m["verification_accuracy"] >= BARS["verification_accuracy"],
        "text_still_controls": text_ok,
    }
