"""Chapter 03's claims in miniature: DDIM (Song, Meng & Ermon 2021).

What the paper found (CIFAR-10 and CelebA, one DDPM-trained model each, never retrained):

* Table 1: FID over the number of steps S and eta. With eta = 0 (deterministic DDIM) 20-50 steps
  come close to 1000; eta = 1 (DDPM's posterior variance beta_tilde on the subsequence) and sigma_hat
  (DDPM's larger variance beta) degrade badly with few steps. CIFAR-10 (:data:`PAPER_TABLE1`).
* Sec. 5.2-5.4: with eta = 0, x_T alone decides the image ("consistency": the same x_T sampled with
  different S gives the same image, at different detail); interpolating x_T (slerp) interpolates
  images; running the ODE backwards encodes an image into x_T, and decoding it reconstructs the image
  with an error that falls as S grows (their Table 2).

The miniature reuses chapter 01's ``digits-ddpm`` (linear schedule, T = 1000, L_simple), as the
paper reuses a DDPM-trained model. :func:`fd_table` measures the table: every cell on the same ``n``
samples from the same x_T, the network under the profile's bf16 autocast. Two rows are DDPM's
1000-step ancestral sampler, with its two fixed variances:

* eta = 1 at S = T *is* DDPM's ancestral sampler with the fixed-small variance beta_tilde_t (the
  step's mean is mu_tilde_t(x_t, x0_hat) and its variance beta_tilde_t), so that cell is computed once;
* the ``"ddpm"`` row (the paper's sigma_hat) is DDPM's ancestral sampler with the fixed-large variance
  beta_t, the variance ``digits-ddpm`` was trained with and chapter 01 samples with. Its S = T cell
  costs a quarter of the table and is left out at ``cpu`` (:func:`rows_at_T`).

The chapter's claim (:func:`ddim50_over_ddpm1000`): DDIM with eta = 0 and 50 steps against DDPM's
1000-step ancestral sampler (the better of the two variances where both are measured).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..data.digits import digits
from ..evaluate.digits import DigitEvaluator, digit_evaluator
from ..evaluate.frechet import central_interval, paired_bootstrap
from ..process.respacing import space_timesteps
from ..profiles import Profile, current
from ..recipes.digits import diffusion_for
from ..samplers.ancestral import ddpm_sample
from ..samplers.ddim import ddim_invert, ddim_sample
from ..store import Stored, device_of, load
from . import generation

MODEL = "digits-ddpm"
ETAS = (0.0, 0.5, 1.0)
ANCESTRAL = "ddpm"  # the sigma_hat row: DDPM's ancestral sampler with the fixed-large variance beta_t
ROWS: tuple[float | str, ...] = (*ETAS, ANCESTRAL)

#: DDIM Table 1, CIFAR-10 FID (S = 10, 20, 50, 100, 1000); "ddpm" is their sigma_hat row
PAPER_TABLE1: dict[float | str, dict[int, float]] = {
    0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    0.5: {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    1.0: {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
    ANCESTRAL: {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17},
}
#: DDIM Table 2: reconstruction error (per dimension) of CIFAR-10 test images encoded and decoded in S steps
PAPER_RECONSTRUCTION = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 1000: 0.0001}


def row_name(row: float | str) -> str:
    """How a table row is printed: ``eta = 0.5``, or the fixed-large ancestral row."""
    return "DDPM, beta_t" if row == ANCESTRAL else f"eta = {row:g}"


def table_steps(profile: Profile) -> tuple[int, ...]:
    """The S of the table; S = 1000 (= T, every step) at every profile."""
    return profile.pick(smoke=(10, 50, 1000), cpu=(10, 20, 50, 100, 1000), gpu=(10, 20, 50, 100, 1000))


def rows_at_T(profile: Profile) -> tuple[float | str, ...]:
    """The rows measured with all T steps, 1000 network calls per image each. ``cpu``: the three eta
    rows (the eta = 1 one is DDPM's fixed-small ancestral sampler, the claim's reference); the
    fixed-large cell would cost another quarter of the table. ``smoke``: only the reference (the code
    path is the same at any S). ``gpu``: every row."""
    return profile.pick(smoke=(1.0,), cpu=ETAS, gpu=ROWS)


def sizes(profile: Profile) -> dict[str, int]:
    """``n``: samples behind every FD of the table (every cell, both 1000-step references and the
    floor); ``batch``: images per sampler call."""
    return profile.pick(smoke={"n": 32, "batch": 32}, cpu={"n": 300, "batch": 300},
                        gpu={"n": 1000, "batch": 1000})



def noise(stored: Stored, n: int, seed: int = 0) -> torch.Tensor:
    """x_T ~ N(0, I), (n, 1, R, R), from a generator seeded with ``seed`` (equal seeds, equal x_T)."""
    R = stored.config["resolution"]
    return torch.randn(n, 1, R, R, generator=torch.Generator().manual_seed(seed)).to(device_of(stored))


@torch.no_grad()
def generate(stored: Stored, x_T: torch.Tensor, steps: int, eta: float | str, seed: int = 0, batch: int = 500,
             progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """Samples (B, 1, R, R), float32 on the CPU, from x_T in ``steps`` evenly spaced steps: DDIM with
    ``eta`` (a number), or, for ``eta = "ddpm"``, DDPM's ancestral sampler with the fixed-large
    variance beta_t on the same subsequence (all T steps when ``steps = T``). The network runs under
    the profile's autocast (bf16 where the machine has it); the noise z comes from ``seed``."""
    profile = profile or current()
    diffusion = stored.diffusion
    tau = space_timesteps(diffusion.T, steps, "uniform")
    g = torch.Generator(device=x_T.device).manual_seed(seed + 1)  # the sampling noise, apart from x_T's
    model = stored.model.eval()

    def sample(x: torch.Tensor, _: Any) -> torch.Tensor:
        if eta == ANCESTRAL:
            large = diffusion_for({**stored.config, "variance": "fixed_large"})
            process = large if steps >= large.T else large.respace(tau)
            return ddpm_sample(model, process, x, generator=g, progress=progress)
        return ddim_sample(model, diffusion, x, eta=float(eta), timesteps=tau, generator=g, progress=progress)

    return generation.generate(sample, x_T, batch=batch, profile=profile)


def fd_table(profile: Profile, seed: int = 0, progress: bool = True, evaluator: DigitEvaluator | None = None
             ) -> dict[str, Any]:
    """The table: FD for every row of :data:`ROWS` over :func:`table_steps`, each cell on the same
    ``n`` samples (:func:`sizes`) from the same x_T.

    Returns ``fd_table`` {row: {S: FD}}, ``seconds`` {row: {S: sampling seconds for all n}},
    ``samples`` {row: {S: the first 32 images}}, ``claim`` (:func:`ddim50_over_ddpm1000`), the floor
    and the other references at ``n`` (``references``), the floor's spread over 5 draws of n real
    digits (``floor_spread``: how much an FD on n samples moves by chance), ``n``, ``steps``, ``T``.
    """
    stored = load(MODEL, profile)
    evaluator = evaluator or digit_evaluator(profile)
    sz = sizes(profile)
    T = stored.config["T"]
    steps = table_steps(profile)
    x_T = noise(stored, sz["n"], seed)
    generate(stored, x_T[:2], 1, 0.0, profile=profile)  # warm-up: one-time kernel set-up is not timed
    fd, seconds, shown, kept = {}, {}, {}, {}
    for row in ROWS:
        fd[row], seconds[row], shown[row] = {}, {}, {}
        for S in steps:
            if S >= T and row not in rows_at_T(profile):
                continue
            start = time.perf_counter()
            x = generate(stored, x_T, S, row, seed=seed, batch=sz["batch"], progress=progress, profile=profile)
            seconds[row][S] = time.perf_counter() - start
            fd[row][S] = evaluator.fd(x)
            shown[row][S] = x[:32]
            if (row, S) in ((0.0, 50), (1.0, T), (ANCESTRAL, T)):
                kept[(row, S)] = x
    claim = ddim50_over_ddpm1000(fd, T)
    reference = kept[(1.0, T) if claim["reference"] == "fixed_small" else (ANCESTRAL, T)]
    claim["interval"] = fd_ratio_interval(evaluator, kept[(0.0, 50)], reference, seed=seed)
    floors = [evaluator.references(n=sz["n"], seed=seed + k)["fd_floor"] for k in range(5)]
    return {"fd_table": fd, "seconds": seconds, "samples": shown, "steps": steps, "T": T, **sz,
            "claim": claim,
            "references": evaluator.references(n=sz["n"], seed=seed),
            "floor_spread": {"min": min(floors), "max": max(floors),
                             "std": float(torch.tensor(floors, dtype=torch.float64).std())},
            "train_seconds": stored.metrics.get("train_seconds"), "trained_now": stored.trained_now}


def ddim50_over_ddpm1000(fd: dict[float | str, dict[int, float]], T: int = 1000) -> dict[str, Any]:
    """The claim: FD of DDIM (eta = 0, 50 steps) over the FD of DDPM's T-step ancestral sampler:
    with the fixed-small variance (= the table's eta = 1 cell at S = T), and, where the table has it,
    with the fixed-large one (the ``"ddpm"`` row at S = T). ``ratio`` is against the better of the
    references measured; ``ratios`` {variance: ratio} and ``fd_references`` {variance: FD} hold each."""
    ddim50 = fd[0.0][50]
    refs = {"fixed_small": fd[1.0][T]}
    if T in fd.get(ANCESTRAL, {}):
        refs["fixed_large"] = fd[ANCESTRAL][T]
    best = min(refs, key=refs.get)
    return {"fd_ddim50": ddim50, "fd_ddpm1000": refs[best], "reference": best, "ratio": ddim50 / refs[best],
            "ratios": {k: ddim50 / v for k, v in refs.items()}, "fd_references": refs}


def fd_ratio_interval(evaluator: DigitEvaluator, a: torch.Tensor, b: torch.Tensor, reps: int = 500, seed: int = 0,
                      level: float = 0.9) -> tuple[float, float]:
    """A bootstrap interval (``level``, central) for FD(a) / FD(b), two sample sets of equal size whose
    i-th images start from the same x_T: each replicate resamples the same indices from both (paired).
    It shows how much the ratio moves with the draw of n images; resampling with replacement repeats
    images, which raises both FDs a little, so read its width rather than its centre."""
    if len(a) != len(b):
        raise ValueError(f"paired sets must have the same size, got {len(a)} and {len(b)}")
    fd_a, fd_b = paired_bootstrap(evaluator.features(a), evaluator.features(b), evaluator.heldout_stats(), reps, seed)
    return central_interval(fd_a / fd_b, level)


# --------------------------------------------------------------------------------------------------
# Consistency, interpolation, inversion
# --------------------------------------------------------------------------------------------------

def consistency(stored: Stored, x_T: torch.Tensor, steps: Sequence[int], eta: float = 0.0, seed: int = 0,
                profile: Profile | None = None) -> dict[str, Any]:
    """The same x_T sampled with each number of steps: images {S: (B, 1, R, R)} and the mean absolute
    pixel difference of each from the one with the most steps (pixels in [-1, 1])."""
    images = {S: generate(stored, x_T, S, eta, seed=seed, profile=profile) for S in steps}
    finest = images[max(steps)]
    return {"images": images, "distance": {S: (x - finest).abs().mean().item() for S, x in images.items()}}


@torch.no_grad()
def reconstruction_error(stored: Stored, x0: torch.Tensor, steps: Sequence[int], progress: bool = False
                         ) -> dict[int, dict[str, Any]]:
    """Encode x0 into x_T with :func:`ddim_invert` in S steps and decode it with eta = 0 in the same S
    steps (no clipping, so the two are inverse up to discretisation): per S, the mean squared error
    per dimension (pixels in [-1, 1]), the latents and the reconstructions. In float32 (no autocast):
    the error measured is the ODE's discretisation, not bf16 rounding."""
    diffusion = stored.diffusion
    model = stored.model.eval()
    x0 = x0.to(device_of(stored))
    out = {}
    for S in steps:
        x_T = ddim_invert(model, diffusion, x0, S, progress=progress)
        rec = ddim_sample(model, diffusion, x_T, S, eta=0.0, clip_denoised=False, progress=progress)
        out[S] = {"mse": ((rec - x0) ** 2).mean().item(), "x_T": x_T.cpu(), "reconstruction": rec.cpu()}
    return out


def inversion_steps(profile: Profile) -> tuple[int, ...]:
    return profile.pick(smoke=(10, 20), cpu=(10, 20, 50, 100), gpu=(10, 20, 50, 100, 1000))


def inversion_images(profile: Profile) -> torch.Tensor:
    """Held-out digits to encode and decode: 5 of each class at ``cpu``."""
    x, y = digits("heldout", 16)
    per_class = profile.pick(smoke=2, cpu=5, gpu=20)
    idx = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
    return x[idx]
