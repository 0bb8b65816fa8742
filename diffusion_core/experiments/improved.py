"""Chapter 02's claims in miniature: Improved DDPM (Nichol & Dhariwal 2021).

What the paper found (ImageNet 64x64 and CIFAR-10):

* the cosine schedule destroys information more slowly than the linear one, whose last steps add
  noise to what is already almost pure noise (at 64x64 and below); with it the NLL improves;
* learning the variance, Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), with
  L_hybrid = L_simple + 0.001 L_vlb improves the NLL over L_simple with fixed variances;
* with learned variances, sampling in K evenly spaced steps (the respaced process) keeps the FID
  with 50-100 steps ("100 sampling steps is sufficient to achieve near-optimal FIDs for our fully
  trained models"), while the models with fixed variances lose more as K shrinks.

The miniature, on 16x16 digits, with models trained at one budget (``recipes.improved``):

* :func:`fd_vs_steps`: FD of samples against held-out digits over K for fixed-small and fixed-large
  (the L_simple model ``digits-ddpm``) and learned variance (``digits-iddpm-hybrid-linear``, the same
  linear schedule, so the curves differ only by the variance and the loss that trains it). Every K,
  K = T = 1000 included, is measured on the same number of samples, and the floor (real digits) is
  given at that number: FD grows as the sample shrinks, so only equal counts compare. The network
  runs in bfloat16 where the machine has it (``profile.autocast()``), which is what makes 1000-step
  ancestral sampling of a few hundred digits affordable on a laptop CPU;
* :func:`skip_prefix`: the paper's Fig. 4, skipping the start of the reverse process per schedule;
* :func:`nll_comparison`: the bound on held-out digits in bits/dim (float32) for L_simple (both fixed
  variances) vs L_hybrid (linear) and linear vs cosine (L_hybrid), with paired differences; the paper's
  Tables 1-2 are :data:`PAPER_ABLATIONS`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..evaluate.digits import DigitEvaluator, digit_evaluator
from ..evaluate.frechet import central_interval, feature_stats, frechet_distance_from_stats, paired_bootstrap
from ..process.gaussian import GaussianDiffusion
from ..process.respacing import space_timesteps
from ..process.schedules import cosine_betas, linear_betas
from ..profiles import Profile, current
from ..samplers.ancestral import ddpm_sample
from ..store import Stored, device_of, load
from . import generation
from .ddpm import heldout_bound, mean_stderr, nll_settings

#: the three ways of sampling compared over K: variance -> the stored model that is sampled
SAMPLERS: dict[str, tuple[str, str]] = {
    "fixed_small": ("digits-ddpm", "fixed_small"),      # sigma_t^2 = beta_tilde_t, L_simple model
    "fixed_large": ("digits-ddpm", "fixed_large"),      # sigma_t^2 = beta_t,       L_simple model
    "learned": ("digits-iddpm-hybrid-linear", "learned_range"),  # Sigma_theta, L_hybrid model
}

#: the NLL comparison: label -> (stored model, the variance its reverse process uses)
NLL_MODELS: dict[str, tuple[str, str]] = {
    "L_simple, linear, fixed small": ("digits-ddpm", "fixed_small"),
    "L_simple, linear, fixed large": ("digits-ddpm", "fixed_large"),   # as trained (Ho et al.'s sigma^2 = beta)
    "L_hybrid, linear, learned": ("digits-iddpm-hybrid-linear", "learned_range"),
    "L_hybrid, cosine, learned": ("digits-iddpm-hybrid", "learned_range"),
}

#: the paired differences the paper's ablation speaks to: name -> (model label, baseline label)
NLL_DIFFERENCES: dict[str, tuple[str, str]] = {
    "hybrid_minus_simple": ("L_hybrid, linear, learned", "L_simple, linear, fixed large"),
    "hybrid_minus_simple_fixed_small": ("L_hybrid, linear, learned", "L_simple, linear, fixed small"),
    "cosine_minus_linear": ("L_hybrid, cosine, learned", "L_hybrid, linear, learned"),
}

PAPER = {
    "fid_steps": "learned variances (L_hybrid) keep near-optimal FID with 50-100 sampling steps; "
                 "fixed variances (L_simple) degrade more as the number of steps falls (their Fig. 8)",
    "nll_schedule": "the cosine schedule improves NLL over the linear one (their Tables 1-2)",
    "nll_loss": "L_hybrid (learned variance) improves NLL over L_simple (fixed variance) (their Tables 1-2)",
    "skip_prefix": "skipping up to about 20% of the linear schedule's reverse process costs little FID (their Fig. 4)",
    "best_nll": {"CIFAR-10": 2.94, "ImageNet 64x64": 3.53},  # their best models, trained on L_vlb
}

#: Improved DDPM Table 1 (ImageNet 64x64) and Table 2 (CIFAR-10): (dataset, training iterations, T,
#: schedule, objective) -> (NLL in bits/dim, FID), one run each. The L_simple rows have a fixed reverse
#: variance, the L_hybrid and L_vlb rows a learned one.
PAPER_ABLATIONS: dict[tuple[str, str, str, str, str], tuple[float, float]] = {
    ("ImageNet 64x64", "200K", "1K", "linear", "L_simple"): (3.99, 32.5),
    ("ImageNet 64x64", "200K", "4K", "linear", "L_simple"): (3.77, 31.3),
    ("ImageNet 64x64", "200K", "4K", "linear", "L_hybrid"): (3.66, 32.2),
    ("ImageNet 64x64", "200K", "4K", "cosine", "L_simple"): (3.68, 27.0),
    ("ImageNet 64x64", "200K", "4K", "cosine", "L_hybrid"): (3.62, 28.0),
    ("ImageNet 64x64", "200K", "4K", "cosine", "L_vlb"): (3.57, 56.7),
    ("ImageNet 64x64", "1.5M", "4K", "cosine", "L_hybrid"): (3.57, 19.2),
    ("ImageNet 64x64", "1.5M", "4K", "cosine", "L_vlb"): (3.53, 40.1),
    ("CIFAR-10", "500K", "1K", "linear", "L_simple"): (3.73, 3.29),
    ("CIFAR-10", "500K", "4K", "linear", "L_simple"): (3.37, 2.90),
    ("CIFAR-10", "500K", "4K", "linear", "L_hybrid"): (3.26, 3.07),
    ("CIFAR-10", "500K", "4K", "cosine", "L_simple"): (3.26, 3.05),
    ("CIFAR-10", "500K", "4K", "cosine", "L_hybrid"): (3.17, 3.19),
    ("CIFAR-10", "500K", "4K", "cosine", "L_vlb"): (2.94, 11.47),
}

#: the paper's row for each model of :data:`NLL_MODELS`, as (schedule, objective) at T = 4K and the
#: shorter training (200K iterations on ImageNet, 500K on CIFAR-10). The paper's L_simple rows have one
#: fixed variance, so both of ours map to the same row.
PAPER_NLL_ROWS: dict[str, tuple[str, str]] = {
    "L_simple, linear, fixed small": ("linear", "L_simple"),
    "L_simple, linear, fixed large": ("linear", "L_simple"),
    "L_hybrid, linear, learned": ("linear", "L_hybrid"),
    "L_hybrid, cosine, learned": ("cosine", "L_hybrid"),
}
PAPER_DATASETS: dict[str, tuple[str, str]] = {"ImageNet 64x64": ("200K", "4K"), "CIFAR-10": ("500K", "4K")}
PAPER_FID_DECIMALS = {"ImageNet 64x64": 1, "CIFAR-10": 2}   # as the tables print them


def paper_ablation(dataset: str, schedule: str, objective: str) -> tuple[float, float]:
    """(NLL bits/dim, FID) of the paper's Table 1 (``"ImageNet 64x64"``) or Table 2 (``"CIFAR-10"``)
    row with T = 4K, the shorter training, and this schedule and objective."""
    iters, T = PAPER_DATASETS[dataset]
    return PAPER_ABLATIONS[(dataset, iters, T, schedule, objective)]


def paper_nll_differences() -> dict[str, dict[str, float]]:
    """The paper's NLL differences for the comparisons of :data:`NLL_DIFFERENCES` that it has (bits/dim,
    T = 4K, shorter training): {comparison: {dataset: difference}}. The paper has one L_simple row, so
    ``hybrid_minus_simple_fixed_small`` has the same numbers as ``hybrid_minus_simple``."""
    out: dict[str, dict[str, float]] = {}
    for key, (a, b) in NLL_DIFFERENCES.items():
        out[key] = {ds: round(paper_ablation(ds, *PAPER_NLL_ROWS[a])[0] - paper_ablation(ds, *PAPER_NLL_ROWS[b])[0], 4)
                    for ds in PAPER_DATASETS}
    return out


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------

def schedules(T: int = 1000, s: float = 0.008, beta_start: float = 1e-4, beta_end: float = 0.02
              ) -> dict[str, GaussianDiffusion]:
    """The linear schedule (beta from ``beta_start`` to ``beta_end`` over T steps) and the cosine one
    (offset ``s``), as processes."""
    return {"linear": GaussianDiffusion(linear_betas(T, beta_start, beta_end)),
            "cosine": GaussianDiffusion(cosine_betas(T, s))}


def noise_fraction(alpha_bar: torch.Tensor, threshold: float = 1e-3) -> float:
    """The fraction of steps whose x_t keeps less than ``threshold`` of the signal's power
    (alpha_bar_t < threshold): steps that add noise to what is already almost pure noise."""
    return (alpha_bar < threshold).double().mean().item()


def noised(x0: torch.Tensor, diffusion: GaussianDiffusion, fractions: Sequence[float], seed: int = 0) -> torch.Tensor:
    """x0 (B, C, H, W) at t = round(f (T - 1)) for each fraction f, with the same noise eps for every t
    (so only alpha_bar_t changes along the row): (len(fractions), B, C, H, W)."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for f in fractions:
        t = torch.full((x0.shape[0],), int(round(f * (diffusion.T - 1))), dtype=torch.long)
        out.append(diffusion.q_sample(x0, t, eps))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# Looking inside the trained models
# --------------------------------------------------------------------------------------------------

def _outputs_at(stored: Stored, diffusion: GaussianDiffusion, x0: torch.Tensor, ts: Sequence[int], seed: int):
    """For each t in ``ts``: (t, x_t ~ q(x_t | x_0), the network's output at x_t), noise from ``seed``."""
    model, dev = stored.model.eval(), x0.device
    g = torch.Generator().manual_seed(seed)
    for t_int in ts:
        t = torch.full((x0.shape[0],), int(t_int), device=dev, dtype=torch.long)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(dev))
        yield t, xt, model(xt, diffusion.model_t(t))


@torch.no_grad()
def bound_terms(stored: Stored, x0: torch.Tensor, ts: Sequence[int], seed: int = 0) -> torch.Tensor:
    """L_t for each t in ``ts`` (bits/dim), averaged over the images x0: (len(ts),) float64. The bound
    is the sum over all T of these (plus L_T), so their size says which steps the likelihood cares about."""
    diffusion = stored.diffusion
    x0 = x0.to(device_of(stored))
    return torch.stack([diffusion.vb_terms_bpd(out, x0, xt, t).mean().double().cpu()
                        for t, xt, out in _outputs_at(stored, diffusion, x0, ts, seed)])


@torch.no_grad()
def learned_interpolation(stored: Stored, x0: torch.Tensor, ts: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Where the learned variance sits between its bounds: the mean over images and pixels of
    v' = (v + 1) / 2 in log Sigma = v' log beta_t + (1 - v') log beta_tilde_t, for each t: (len(ts),).
    0 is beta_tilde_t (fixed small), 1 is beta_t (fixed large)."""
    diffusion = stored.diffusion
    if diffusion.variance != "learned_range":
        raise ValueError(f"{stored.name} has no learned variance")
    x0 = x0.to(device_of(stored))
    return torch.stack([((diffusion.split_output(out, xt)[1] + 1) / 2).mean().double().cpu()
                        for _, xt, out in _outputs_at(stored, diffusion, x0, ts, seed)])


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def steps_grid(profile: Profile) -> tuple[int, ...]:
    """The K of the sweep; K = T (all 1000 steps) at every profile."""
    return profile.pick(smoke=(10, 25, 1000), cpu=(10, 25, 50, 100, 1000), gpu=(10, 25, 50, 100, 1000))


def sizes(profile: Profile) -> dict[str, int]:
    """Samples per FD (``n``, the same for every K, K = T included) and the sampling batch."""
    return profile.pick(smoke={"n": 8, "batch": 8}, cpu={"n": 200, "batch": 200}, gpu={"n": 1000, "batch": 1000})


def respaced(stored: Stored, variance: str, K: int) -> GaussianDiffusion:
    """The process of a stored model with its variance set to ``variance`` (fixed_small, fixed_large
    or learned_range), restricted to K evenly spaced timesteps (Improved DDPM Sec. 4):
    alpha_bar is kept on those steps and beta_k = 1 - alpha_bar_{s_k} / alpha_bar_{s_{k-1}}."""
    base = stored.diffusion
    if (variance == "learned_range") != (base.variance == "learned_range"):
        raise ValueError(f"{stored.name} was trained with {base.variance} variance; it cannot be sampled with {variance}")
    process = GaussianDiffusion(base.betas, base.prediction, variance)
    return process if K >= process.T else process.respace(space_timesteps(process.T, K, "uniform"))


@torch.no_grad()
def ancestral(stored: Stored, process: GaussianDiffusion, n: int, seed: int = 0, batch: int = 500,
              progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """n samples (n, 1, R, R), float32 on the CPU, by ancestral sampling of ``process`` with the stored
    network, under the profile's mixed precision (bfloat16 where the machine has it). The noise x_T
    comes first from a generator seeded with ``seed``, so equal seeds give equal x_T whatever the
    process."""
    profile = profile or current()
    model, dev = stored.model.eval(), device_of(stored)
    R = stored.config["resolution"]
    g = torch.Generator(device=dev).manual_seed(seed)  # all of x_T first, then the sampling noise
    x_T = generation.gaussian(g, (1, R, R), dev)(n)
    return generation.generate(lambda x, _: ddpm_sample(model, process, x, generator=g, progress=progress),
                               x_T, batch=batch, profile=profile)


def sample(stored: Stored, variance: str, K: int, n: int, seed: int = 0, batch: int = 500,
           progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """n samples of a stored model with ``variance`` in K respaced steps (:func:`respaced`, :func:`ancestral`)."""
    return ancestral(stored, respaced(stored, variance, K), n, seed, batch, progress, profile)


def fd_vs_steps(profile: Profile, seed: int = 0, progress: bool = True, evaluator: DigitEvaluator | None = None
                ) -> dict[str, Any]:
    """FD against held-out digits for each sampler of :data:`SAMPLERS` and each K of :func:`steps_grid`,
    every cell on the same ``n`` samples from the same x_T.

    Returns ``fd_by_steps`` {sampler: {K: FD}}, ``seconds`` {sampler: {K: s}}, ``references`` (floor,
    blurred, Gaussian) at that n, ``floor_spread`` (mean and standard deviation of the floor over 10
    random sets of n real digits: how much an FD of n samples moves by chance alone), ``n``, ``steps``,
    ``amp`` (bf16 sampling), a few samples of each cell, how the models were obtained, and ``paired``:
    for learned against each fixed variance at every K, FD(learned) - FD(fixed) on the full sets, its
    central 90% interval over paired bootstrap replicates of the n starting noises
    (:func:`~diffusion_core.evaluate.frechet.paired_bootstrap`) and the fraction of replicates in
    which learned scores lower. The replicates resample the samples, not the trainings.
    """
    evaluator = evaluator or digit_evaluator(profile)
    sz = sizes(profile)
    grid = steps_grid(profile)
    models = {name: load(name, profile) for name in dict.fromkeys(m for m, _ in SAMPLERS.values())}
    fd, seconds, shown, feats = {}, {}, {}, {}
    held = evaluator.heldout_stats()
    for key, (name, variance) in SAMPLERS.items():
        fd[key], seconds[key], shown[key], feats[key] = {}, {}, {}, {}
        for K in grid:
            start = time.perf_counter()
            x = sample(models[name], variance, K, sz["n"], seed=seed, batch=sz["batch"], progress=progress,
                       profile=profile)
            seconds[key][K] = time.perf_counter() - start
            if not torch.isfinite(x).all():
                raise ValueError(f"{key} at K = {K} produced NaN or infinite samples")
            feats[key][K] = evaluator.features(x)
            fd[key][K] = frechet_distance_from_stats(*feature_stats(feats[key][K]), *held)
            shown[key][K] = x[:32]
    reps = profile.pick(smoke=20, cpu=300, gpu=500)
    paired: dict[str, dict[int, dict[str, Any]]] = {}
    for fixed in ("fixed_small", "fixed_large"):
        paired[f"learned_vs_{fixed}"] = {}
        for K in grid:
            a, b = paired_bootstrap(feats["learned"][K], feats[fixed][K], held, reps=reps, seed=seed)
            paired[f"learned_vs_{fixed}"][K] = {"difference": fd["learned"][K] - fd[fixed][K],
                                                "interval": central_interval(a - b, 0.9),
                                                "p_lower": float((a < b).mean()), "reps": reps}
    floors = torch.tensor([evaluator.references(n=sz["n"], seed=seed + i)["fd_floor"] for i in range(10)])
    return {"fd_by_steps": fd, "paired": paired, "seconds": seconds, "samples": shown, "steps": grid, "n": sz["n"],
            "amp": bool(profile.amp), "references": evaluator.references(n=sz["n"], seed=seed),
            "floor_spread": {"mean": floors.mean().item(), "sd": floors.std().item()},
            "train": {name: {"train_seconds": s.metrics.get("train_seconds"), "trained_now": s.trained_now}
                      for name, s in models.items()}}


#: the schedule comparison of :func:`skip_prefix`: two L_hybrid models that differ only by the schedule
SCHEDULE_MODELS: dict[str, str] = {"linear": "digits-iddpm-hybrid-linear", "cosine": "digits-iddpm-hybrid"}


def skip_prefix(profile: Profile, fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3), K: int = 25, seed: int = 0,
                evaluator: DigitEvaluator | None = None) -> dict[str, Any]:
    """Improved DDPM's Fig. 4 in miniature: skip the first fraction f of the reverse process, i.e. start
    from x ~ N(0, I) at t0 = (1 - f)(T - 1) as if it were x_T, and sample the rest (K evenly spaced
    steps over the whole range, those at or below t0 kept). If alpha_bar_t0 is already ~0 the skipped
    steps were wasted and FD barely moves; if not, starting from pure noise there is wrong and FD rises.
    Returns {schedule: {f: FD}}, the alpha_bar at each t0 and the sample count (``sizes(profile)``)."""
    evaluator = evaluator or digit_evaluator(profile)
    sz = sizes(profile)
    fd: dict[str, dict[float, float]] = {}
    alpha_bar: dict[str, dict[float, float]] = {}
    for schedule, name in SCHEDULE_MODELS.items():
        stored = load(name, profile)
        base = stored.diffusion
        tau = space_timesteps(base.T, K, "uniform")
        fd[schedule], alpha_bar[schedule] = {}, {}
        for f in fractions:
            t0 = int(round((1.0 - f) * (base.T - 1)))
            x = ancestral(stored, base.respace(tau[tau <= t0]), sz["n"], seed, sz["batch"], profile=profile)
            fd[schedule][f] = evaluator.fd(x)
            alpha_bar[schedule][f] = base.alpha_bar[t0].item()
    return {"fd": fd, "alpha_bar_at_start": alpha_bar, "n": sz["n"], "K": K}


# --------------------------------------------------------------------------------------------------
# NLL: L_simple vs L_hybrid, linear vs cosine
# --------------------------------------------------------------------------------------------------

def heldout_bpd(stored: Stored, profile: Profile, variance: str | None = None, seed: int = 0
                ) -> dict[str, torch.Tensor]:
    """:func:`~diffusion_core.process.likelihood.bound_bpd` of a stored model on the held-out digits,
    exactly as chapter 01 scores it (``ddpm.heldout_bound``, ``nll_settings``), with its reverse
    variance set to ``variance`` (default: as trained)."""
    base = stored.diffusion
    diffusion = base if variance is None else GaussianDiffusion(base.betas, base.prediction, variance)
    if (diffusion.variance == "learned_range") != (base.variance == "learned_range"):
        raise ValueError(f"{stored.name} was trained with {base.variance} variance; it has no {variance} bound")
    return heldout_bound(stored, profile, diffusion, seed)


def nll_comparison(profile: Profile, seed: int = 0) -> dict[str, Any]:
    """The bound on held-out digits (bits/dim) for each of :data:`NLL_MODELS`: ``rows`` {label: nll_bpd,
    nll_stderr (over images), and the mean of each part of
    :func:`~diffusion_core.process.likelihood.bound_bpd` (``decoder``, ``final_step``,
    ...)}, and the paired differences of :data:`NLL_DIFFERENCES` with their standard errors."""
    parts = {label: heldout_bpd(load(name, profile), profile, variance, seed)
             for label, (name, variance) in NLL_MODELS.items()}
    rows = {label: {**dict(zip(("nll_bpd", "nll_stderr"), mean_stderr(p["total"]))),
                    **{k: v.mean().item() for k, v in p.items() if k != "total"}} for label, p in parts.items()}
    diffs = {key: dict(zip(("mean", "stderr"), mean_stderr(parts[a]["total"] - parts[b]["total"])))
             for key, (a, b) in NLL_DIFFERENCES.items()}
    return {"rows": rows, "differences": diffs, "settings": nll_settings(profile)}
