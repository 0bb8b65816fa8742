"""Chapter 06's claim in miniature: classifier-free guidance trades diversity for fidelity as s grows.

Ho & Salimans (2021, Sec. 4, ImageNet 64x64 and 128x128): one model trained with condition dropout
and sampled with eps_u + s (eps_c - eps_u) reaches the FID/IS trade-off of classifier guidance
without a classifier. A little guidance improves FID; more guidance keeps raising the Inception
Score (samples look more like their class) while FID worsens (they become less diverse); p_uncond
of 0.1 or 0.2 does better than 0.5.

The miniature measures, over the guidance scale s (GLIDE's convention, s = 1 + w):

* digits, one model per p_uncond in {0.1, 0.2, 0.5}: FD against held-out digits (the digit
  evaluator, chapter 01) and condition accuracy, the fraction of samples the digit classifier reads
  as the class that was asked for (the analogue of Inception Score's "confidently of a class");
* shapes scenes from captions: FD against real scenes (features of the shapes evaluator, chapter 05)
  and caption accuracy, the fraction of samples showing exactly what their caption names.

Sampling uses DDIM with eta = 0 (chapter 03) in a few steps, the usual way guided models are sampled
today; every scale starts from the same noise, so the pictures differ by s alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..evaluate.digits import DigitEvaluator, digit_evaluator
from ..evaluate.frechet import feature_stats, frechet_distance_from_stats
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile, current
from ..recipes.digits import diffusion_for
from ..recipes.guidance import (
    DIGIT_P_UNCONDS,
    SHAPES_CFG,
    caption_tokenizer,
    digits_recipe_name,
    model_resolution,
    null_caption_ids,
    shapes_diffusion,
    shapes_world,
    to_model,
    to_world,
)
from ..samplers.ddim import ddim_sample
from ..samplers.guidance import cfg_eps
from ..store import Stored, load

SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
SHAPES_ATTRIBUTES = ("color", "shape", "size", "position")


def sampling_steps(profile: Profile) -> int:
    """DDIM steps (eta = 0) for every guided sample of the chapter."""
    return profile.pick(smoke=8, cpu=20, gpu=50)


def digit_sample_count(profile: Profile) -> int:
    """Samples per (model, scale): 30 of each digit at ``cpu``."""
    return profile.pick(smoke=60, cpu=300, gpu=1000)


def shapes_sample_count(profile: Profile) -> int:
    return profile.pick(smoke=32, cpu=200, gpu=1000)


# --------------------------------------------------------------------------------------------------
# Guided sampling
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def guided_sample(model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], diffusion: GaussianDiffusion,
                  x_T: torch.Tensor, cond: Any, null_cond: Any, scale: float, steps: int, eta: float = 0.0,
                  generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM from ``x_T`` with the guided noise prediction eps_u + s (eps_c - eps_u) at every step
    (``cfg_eps``: one batched forward of [null; cond])."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cfg_eps(model_fn, x, t, cond, null_cond, scale)

    return ddim_sample(eps_fn, diffusion, x_T, steps, eta, generator=generator, progress=progress)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _float_out(model_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``model_fn`` with its output cast to float32: under bf16 autocast the network runs in bf16,
    and the guided combination eps_u + s (eps_c - eps_u), which multiplies a difference by s, is
    then done in float32 rather than rounded to bf16 once more."""

    def fn(*args: Any) -> torch.Tensor:
        return model_fn(*args).float()

    return fn


@torch.no_grad()
def sample_digits(stored: Stored, labels: torch.Tensor, scale: float, steps: int, seed: int = 0,
                  batch: int = 500, progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """Digits (N, 1, R, R) of the requested ``labels`` (N,) from a stored class-conditional model,
    guided at ``scale``, the network under the profile's mixed precision (bf16 where the machine
    has it). The noise depends only on ``seed`` and N, so every scale starts from the same x_T."""
    profile = profile or current()
    model = stored.model.eval()
    dev = _device(model)
    R = stored.config["resolution"]
    g = torch.Generator(device=dev).manual_seed(seed)
    x_T = torch.randn(len(labels), 1, R, R, generator=g, device=dev)
    null = torch.tensor(stored.config["null_class"], device=dev)
    diffusion = diffusion_for(stored.config)
    out = []
    for i in range(0, len(labels), batch):
        y = labels[i:i + batch].to(dev)
        with profile.autocast():
            x0 = guided_sample(_float_out(model), diffusion, x_T[i:i + batch], y, null, scale, steps,
                               progress=progress)
        out.append(x0.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_captions(stored: Stored, captions: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(captions, null caption) encoded by a stored caption model, each ``{"tokens": (B, N, D),
    "pooled": (B, D)}`` (the null caption with B = 1; ``cfg_eps`` broadcasts it): the text encoder
    runs once per caption, not once per sampling step."""
    model = stored.model.eval()
    dev = _device(model)
    ids = caption_tokenizer(stored.config).encode(list(captions)).to(dev)
    return model.encode(ids), model.encode(null_caption_ids(stored.config)[None].to(dev))


@torch.no_grad()
def sample_shapes(stored: Stored, captions: Sequence[str], scale: float, steps: int, seed: int = 0,
                  batch: int = 250, progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """Scenes (N, 3, R, R) for ``captions`` from a stored caption model, guided at ``scale`` (the
    UNet under the profile's mixed precision; the captions are encoded once, in float32). The
    model draws them at its own resolution r = R / k; they are returned at the world's R (each pixel
    a k x k block), as the shapes evaluator reads them."""
    profile = profile or current()
    model = stored.model.eval()
    dev = _device(model)
    r = model_resolution(stored.config)
    g = torch.Generator(device=dev).manual_seed(seed)
    x_T = torch.randn(len(captions), 3, r, r, generator=g, device=dev)
    context, null = encode_captions(stored, captions)
    diffusion = shapes_diffusion(stored.config)
    out = []
    for i in range(0, len(captions), batch):
        with profile.autocast():
            part = {k: v[i:i + batch] for k, v in context.items()}
            x0 = guided_sample(_float_out(model.denoise), diffusion, x_T[i:i + batch], part, null, scale, steps,
                               progress=progress)
        out.append(x0.float().cpu())
    return to_world(torch.cat(out), stored.config)


# --------------------------------------------------------------------------------------------------
# The sweeps
# --------------------------------------------------------------------------------------------------

def digits_sweep(profile: Profile, scales: Sequence[float] = SCALES, p_unconds: Sequence[float] = DIGIT_P_UNCONDS,
                 evaluator: DigitEvaluator | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """FD and condition accuracy over ``scales`` for the digit model of each p_uncond.

    Returns ``{"rows": {p: {s: {"fd", "accuracy", "seconds"}}}, "samples": {p: {s: (40, 1, R, R)}}
    (the first 40 samples: digits 0-9 four times, the same noise at every s), "references",
    "classifier_accuracy", "n_samples", "steps", "train_seconds": {p: s}}``.
    """
    evaluator = evaluator or digit_evaluator(profile)
    n, steps = digit_sample_count(profile), sampling_steps(profile)
    labels = torch.arange(n) % 10
    rows: dict[float, dict[float, dict[str, float]]] = {}
    samples: dict[float, dict[float, torch.Tensor]] = {}
    train_seconds = {}
    for p in p_unconds:
        stored = load(digits_recipe_name(p), profile)
        train_seconds[p] = stored.metrics.get("train_seconds")
        rows[p], samples[p] = {}, {}
        for s in scales:
            start = time.perf_counter()
            x = sample_digits(stored, labels, s, steps, seed=seed, progress=progress, profile=profile)
            seconds = time.perf_counter() - start
            rows[p][s] = {"fd": evaluator.fd(x), "accuracy": (evaluator.predict(x) == labels).float().mean().item(),
                          "seconds": seconds}
            samples[p][s] = x[:40]
    return {"rows": rows, "samples": samples, "references": evaluator.references(n=n, seed=seed),
            "classifier_accuracy": evaluator.accuracy, "n_samples": n, "steps": steps, "train_seconds": train_seconds}


def shapes_sweep(profile: Profile, scales: Sequence[float] = SCALES, seed: int = 0, progress: bool = True
                 ) -> dict[str, Any]:
    """Caption accuracy (all of an object's attributes, and each attribute alone) and FD over
    ``scales`` for the caption-conditional shapes model.

    FD is measured with the shapes evaluator's features against real scenes of the same world the
    model learns (one object per scene), seen as the model sees them (2x2 means, shown as 2x2
    blocks), beside the floor (other such real scenes); ``caption_accuracy_real`` is the evaluator's
    caption accuracy on those real scenes, the ceiling for the samples.
    Returns ``{"rows": {s: {"fd", "accuracy", "color", "shape", "size", "position", "seconds"}},
    "samples": {s: (16, 3, R, R)}, "captions", "references", "evaluator_accuracy", ...}``.
    """
    from ..evaluate.attributes import shapes_evaluator

    evaluator = shapes_evaluator(profile)
    stored = load(SHAPES_CFG.name, profile)
    c = stored.config
    n, steps = shapes_sample_count(profile), sampling_steps(profile)
    world = shapes_world(c)
    scenes = world.fixed(n, seed=seed)  # the captions to draw: never seen in training
    def as_model_sees(images: torch.Tensor) -> torch.Tensor:
        return to_world(to_model(images, c), c)

    reference = as_model_sees(world.fixed(max(n, 500), seed=seed + 1).images)
    ref_stats = feature_stats(evaluator.features(reference))

    def fd(images: torch.Tensor) -> float:
        return frechet_distance_from_stats(*feature_stats(evaluator.features(images)), *ref_stats)

    real = world.fixed(n, seed=seed + 2)
    real_images = as_model_sees(real.images)
    references = {"fd_floor": fd(real_images), "caption_accuracy_real": evaluator.caption_accuracy(real_images, real)}
    rows: dict[float, dict[str, float]] = {}
    samples: dict[float, torch.Tensor] = {}
    for s in scales:
        start = time.perf_counter()
        x = sample_shapes(stored, scenes.captions, s, steps, seed=seed, progress=progress, profile=profile)
        seconds = time.perf_counter() - start
        row = {"fd": fd(x), "accuracy": evaluator.caption_accuracy(x, scenes)}
        for a in SHAPES_ATTRIBUTES:
            row[a] = evaluator.caption_accuracy(x, scenes, attributes=(a,))
        row["seconds"] = seconds
        rows[s], samples[s] = row, x[:16]
    return {"rows": rows, "samples": samples, "captions": scenes.captions[:16], "references": references,
            "evaluator_accuracy": evaluator.accuracy, "n_samples": n, "steps": steps, "p_uncond": c["p_uncond"],
            "train_seconds": stored.metrics.get("train_seconds")}


def guidance_sweep(profile: Profile, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Both sweeps: ``{"digits": digits_sweep(...), "shapes": shapes_sweep(...)}``, plus the
    benchmark's flat tables ``fd_by_scale``, ``accuracy_by_scale`` ({p_uncond: {s: value}}),
    ``shapes_fd_by_scale`` and ``shapes_accuracy_by_scale`` ({s: value})."""
    digits = digits_sweep(profile, seed=seed, progress=progress)
    shapes = shapes_sweep(profile, seed=seed, progress=progress)
    return {
        "digits": digits, "shapes": shapes,
        "fd_by_scale": {p: {s: r["fd"] for s, r in row.items()} for p, row in digits["rows"].items()},
        "accuracy_by_scale": {p: {s: r["accuracy"] for s, r in row.items()} for p, row in digits["rows"].items()},
        "shapes_fd_by_scale": {s: r["fd"] for s, r in shapes["rows"].items()},
        "shapes_accuracy_by_scale": {s: r["accuracy"] for s, r in shapes["rows"].items()},
    }


# --------------------------------------------------------------------------------------------------
# Speed: one batched forward of 2B against two forwards of B
# --------------------------------------------------------------------------------------------------

def _expand_null(null: Any, cond: Any, device: torch.device) -> Any:
    if isinstance(cond, dict):
        return {k: _expand_null(null[k], v, device) for k, v in cond.items()}
    null = torch.as_tensor(null, device=device)
    return null.expand_as(cond) if null.ndim == cond.ndim else null.expand(cond.shape)


@torch.no_grad()
def batched_vs_two_forwards(model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], x: torch.Tensor,
                            t: torch.Tensor, cond: Any, null_cond: Any, scale: float = 3.0, repeats: int = 10
                            ) -> dict[str, float]:
    """Median seconds of one guided step done as ``cfg_eps`` does it (one forward of batch 2B) and
    as two forwards of batch B, interleaved; ``ratio`` = batched / two (below 1: batching wins).
    ``cond`` is a tensor or a dict of tensors (batch B), ``null_cond`` the same with batch 1."""
    null_b = _expand_null(null_cond, cond, x.device)  # the null condition, batch B

    def batched() -> torch.Tensor:
        return cfg_eps(model_fn, x, t, cond, null_cond, scale)

    def two() -> torch.Tensor:
        eps_c, eps_u = model_fn(x, t, cond), model_fn(x, t, null_b)
        return eps_u + scale * (eps_c - eps_u)

    batched(), two()  # warm up
    times: dict[str, list[float]] = {"batched": [], "two": []}
    for _ in range(repeats):
        for name, fn in (("batched", batched), ("two", two)):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"batched_s": med["batched"], "two_s": med["two"], "ratio": med["batched"] / med["two"]}
