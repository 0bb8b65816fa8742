"""Chapter 06's claim in miniature: classifier-free guidance trades diversity for fidelity as s grows.

Ho & Salimans (2021, Sec. 4, ImageNet 64x64 and 128x128): one model trained with condition dropout
and sampled with eps_u + s (eps_c - eps_u) reaches the FID/IS trade-off of classifier guidance
without a classifier. A little guidance improves FID; more guidance keeps raising the Inception
Score (samples look more like their class) while FID worsens (they become less diverse); p_uncond
of 0.1 or 0.2 does better than 0.5. Their Table 1 (ImageNet 64x64) is :data:`PAPER_TABLE1`.

The miniature measures, over the guidance scale s (GLIDE's convention, s = 1 + w):

* digits, one model per p_uncond in {0.1, 0.2, 0.5}: FD against held-out digits (the digit
  evaluator, chapter 01) and condition accuracy, the fraction of samples the digit classifier reads
  as the class that was asked for (the analogue of Inception Score's "confidently of a class");
* shapes scenes from captions, one text-to-image model per p_uncond in {0.1, 0.2, 0.5} (chapter
  04's latent diffusion model, ``shapes-ldm-t2i``, and the same recipe with captions dropped 20% and
  50% of the time): FD against real one-object scenes (features of the shapes evaluator, chapter
  05) and caption accuracy, the fraction of samples showing exactly what their caption names (and
  each attribute alone).

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
from ..profiles import Profile, current
from ..recipes import latent as latent_recipes
from ..recipes.guidance import DIGIT_P_UNCONDS, digits_recipe_name
from ..samplers.guidance import cfg_eps, check_scale, float_output, guided_sample  # noqa: F401 (chapter 06 prints guided_sample)
from ..store import Stored, device_of, load
from . import generation

SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)

#: Ho & Salimans Table 1 (class-conditional ImageNet 64x64, 400K training steps, FID and Inception Score
#: on 50,000 samples): p_uncond -> {w: (FID, IS)}, in the paper's w; this book's s is 1 + w, so w = 0
#: is s = 1 (the conditional model, no guidance). Beside them the paper lists ADM (FID 2.07) and CDM
#: (FID 1.48, IS 67.95).
PAPER_TABLE1: dict[float, dict[float, tuple[float, float]]] = {
    0.1: {0.0: (1.8, 53.71), 0.1: (1.55, 66.11), 0.2: (2.04, 78.91), 0.3: (3.03, 92.8), 0.4: (4.3, 106.2),
          0.5: (5.74, 119.3), 0.6: (7.19, 131.1), 0.7: (8.62, 141.8), 0.8: (10.08, 151.6), 0.9: (11.41, 161.0),
          1.0: (12.6, 170.1), 2.0: (21.03, 225.5), 3.0: (24.83, 250.4), 4.0: (26.22, 260.2)},
    0.2: {0.0: (1.8, 52.9), 0.1: (1.62, 64.58), 0.2: (2.1, 76.99), 0.3: (2.93, 88.64), 0.4: (4.0, 101.11),
          0.5: (5.19, 112.15), 0.6: (6.48, 122.13), 0.7: (7.73, 131.6), 0.8: (8.9, 140.82), 0.9: (10.09, 150.26),
          1.0: (11.21, 158.29), 2.0: (18.79, 212.98), 3.0: (22.36, 237.65), 4.0: (23.84, 248.97)},
    0.5: {0.0: (2.21, 47.61), 0.1: (1.91, 56.1), 0.2: (2.08, 65.6), 0.3: (2.65, 74.92), 0.4: (3.44, 84.27),
          0.5: (4.34, 92.95), 0.6: (5.27, 102.0), 0.7: (6.23, 109.8), 0.8: (7.25, 116.9), 0.9: (8.21, 124.6),
          1.0: (9.13, 131.1), 2.0: (16.16, 183.0), 3.0: (19.75, 208.9), 4.0: (21.48, 225.1)},
}
PAPER = {
    "best_fid": "the best FID at a small weight (w = 0.1, s = 1.1, on ImageNet 64x64; w = 0.3 on 128x128), "
                "the best IS at the largest (w = 4); in between FID worsens as IS rises (their Sec. 4.1)",
    "p_uncond": "p_uncond = 0.5 is worse than 0.1 and 0.2 along the whole IS/FID frontier; 0.1 and 0.2 "
                "are about equally good (their Sec. 4.2, Table 1)",
}


def paper_table1_at(s: float) -> dict[float, tuple[float, float]] | None:
    """The paper's Table 1 row at this book's scale s (w = s - 1) for each p_uncond, or None where the
    table has no such w (s = 0, the unconditional model; s > 5)."""
    w = round(s - 1.0, 6)
    if w not in PAPER_TABLE1[0.1]:
        return None
    return {p: row[w] for p, row in PAPER_TABLE1.items()}
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
def sample_digits(stored: Stored, labels: torch.Tensor, scale: float, steps: int, seed: int = 0,
                  batch: int = 500, progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """Digits (N, 1, R, R) of the requested ``labels`` (N,) from a stored class-conditional model,
    guided at ``scale``, the network under the profile's mixed precision (bf16 where the machine
    has it). The noise depends only on ``seed`` and N, so every scale starts from the same x_T."""
    profile = profile or current()
    scale = check_scale(scale)
    num_classes = stored.config["num_classes"]
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"sample_digits: labels must be a (N,) tensor of class indices, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"sample_digits: labels must lie in 0..{num_classes - 1} (class {stored.config['null_class']} "
                         f"is the null class), got values in {int(labels.min())}..{int(labels.max())}")
    model = stored.model.eval()
    dev = device_of(model)
    R = stored.config["resolution"]
    x_T = generation.gaussian(torch.Generator(device=dev).manual_seed(seed), (1, R, R), dev)(len(labels))
    null = torch.tensor(stored.config["null_class"], device=dev)
    diffusion = stored.diffusion

    def sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return guided_sample(float_output(model), diffusion, x, y, null, scale, steps, clip_denoised=True,
                             progress=progress)

    return generation.generate(sample, x_T, batch=batch, profile=profile,
                               condition=lambda i, j: labels[i:j].to(dev))


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
    scales = [check_scale(s) for s in scales]  # before any model is trained or loaded
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


def shapes_sweep(profile: Profile, scales: Sequence[float] = SCALES,
                 p_unconds: Sequence[float] | None = None, seed: int = 0, progress: bool = True
                 ) -> dict[str, Any]:
    """Caption accuracy (every attribute of the object right and nothing extra; and each attribute
    alone) and FD over ``scales`` for the text-to-image model of each p_uncond (chapter 04's recipe,
    :func:`~diffusion_core.recipes.latent.t2i_recipe_name`; None: the profile's,
    :func:`~diffusion_core.recipes.latent.t2i_p_unconds`).

    The captions are unseen one-object scenes of the training distribution; every model and scale
    draws them from the same noise. FD is measured with the shapes evaluator's features against
    other real one-object scenes, beside its floor (real scenes against real scenes, the same
    number); ``caption_accuracy_real`` is the evaluator's caption accuracy on real scenes, the
    ceiling for the samples.
    Returns ``{"rows": {p: {s: {"fd", "accuracy", "color", "shape", "size", "position", "seconds"}}},
    "samples": {p: {s: (16, 3, R, R)}}, "captions", "references", "train_seconds": {p: s}, ...}``.
    """
    from ..evaluate.attributes import shapes_evaluator
    from . import latent

    scales = [check_scale(s) for s in scales]  # before any model is trained or loaded
    if p_unconds is None:
        p_unconds = latent_recipes.t2i_p_unconds(profile)
    p_unconds = tuple(p_unconds)
    unknown = [p for p in p_unconds if p not in latent_recipes.T2I_P_UNCONDS]
    if not p_unconds or unknown:
        raise ValueError(f"p_unconds must be a non-empty choice of {latent_recipes.T2I_P_UNCONDS} (the rates with a "
                         f"recipe), got {p_unconds!r}")
    evaluator = shapes_evaluator(profile)
    n, steps = shapes_sample_count(profile), sampling_steps(profile)
    world = latent_recipes.world_for(profile, text=True, max_objects=latent_recipes.T2I_MAX_OBJECTS)
    scenes = world.fixed(n, seed=seed + 1, split="train")   # the captions to draw: never seen in training
    ref_stats = feature_stats(evaluator.features(world.fixed(max(n, 500), seed=seed + 2, split="train").images))

    def fd(images: torch.Tensor) -> float:
        return frechet_distance_from_stats(*feature_stats(evaluator.features(images)), *ref_stats)

    real = world.fixed(n, seed=seed + 3, split="train")
    references = {"fd_floor": fd(real.images), "caption_accuracy_real": evaluator.caption_accuracy(real.images, real)}
    rows: dict[float, dict[float, dict[str, float]]] = {}
    samples: dict[float, dict[float, torch.Tensor]] = {}
    train_seconds = {}
    for p in p_unconds:
        stored = load(latent_recipes.t2i_recipe_name(p), profile)
        vae = latent_recipes.load_vae(stored.config["f"], profile).model
        train_seconds[p] = stored.metrics.get("train_seconds")
        rows[p], samples[p] = {}, {}
        for s in scales:
            start = time.perf_counter()
            x = latent.generate_from_captions(stored, vae, scenes.captions, steps, s, seed=seed, progress=progress,
                                              profile=profile)
            row = {"seconds": time.perf_counter() - start, "fd": fd(x),
                   "accuracy": evaluator.caption_accuracy(x, scenes)}
            for a in SHAPES_ATTRIBUTES:
                row[a] = evaluator.caption_accuracy(x, scenes, attributes=(a,))
            rows[p][s], samples[p][s] = row, x[:16]
    return {"rows": rows, "samples": samples, "captions": scenes.captions[:16], "references": references,
            "evaluator_accuracy": evaluator.accuracy, "n_samples": n, "steps": steps, "train_seconds": train_seconds}


def guidance_sweep(profile: Profile, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Both sweeps: ``{"digits": digits_sweep(...), "shapes": shapes_sweep(...)}``, plus the
    benchmark's flat tables ``fd_by_scale``, ``accuracy_by_scale`` ({p_uncond: {s: value}}),
    ``shapes_fd_by_scale`` and ``shapes_accuracy_by_scale`` (the same for the caption models)."""
    digits = digits_sweep(profile, seed=seed, progress=progress)
    shapes = shapes_sweep(profile, seed=seed, progress=progress)
    return {
        "digits": digits, "shapes": shapes,
        "fd_by_scale": {p: {s: r["fd"] for s, r in row.items()} for p, row in digits["rows"].items()},
        "accuracy_by_scale": {p: {s: r["accuracy"] for s, r in row.items()} for p, row in digits["rows"].items()},
        "shapes_fd_by_scale": {p: {s: r["fd"] for s, r in row.items()} for p, row in shapes["rows"].items()},
        "shapes_accuracy_by_scale": {p: {s: r["accuracy"] for s, r in row.items()}
                                     for p, row in shapes["rows"].items()},
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
    scale = check_scale(scale)
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
