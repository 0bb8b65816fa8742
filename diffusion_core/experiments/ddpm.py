"""Chapter 01's claim in miniature: L_simple vs the true bound L_vlb at an equal budget.

Ho et al. (2020, Table 2, CIFAR-10): L_simple gives FID 3.17 with NLL <= 3.75 bits/dim; the true
variational bound (fixed isotropic Sigma) gives FID 13.51 with NLL <= 3.70. Better samples from
L_simple, a better likelihood from L_vlb.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..data.digits import digits
from ..evaluate.digits import DigitEvaluator, digit_evaluator
from ..process.gaussian import GaussianDiffusion
from ..process.likelihood import bound_bpd
from ..process.respacing import space_timesteps
from ..profiles import Profile, current
from ..samplers.ancestral import ddpm_sample
from ..store import Stored, load
from . import generation

PAPER = {"l_simple": {"fid": 3.17, "nll_bpd": 3.75}, "l_vlb": {"fid": 13.51, "nll_bpd": 3.70}}


def sampling_steps(profile: Profile) -> int:
    """Ancestral steps used for FD: all 1000 on a GPU; on a CPU, 100 of them (a respaced process,
    chapter 02), since 1000 network calls for each of 1,000 images take too long on a laptop."""
    return profile.pick(smoke=20, cpu=100, gpu=1000)


def fd_sample_count(profile: Profile) -> int:
    return profile.pick(smoke=200, cpu=1000, gpu=1000)


def sampling_process(diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
    """The process respaced to ``steps`` evenly spaced timesteps, both ends included
    (``space_timesteps(T, steps, "uniform")``, as chapters 02 and 03 respace; identity for steps == T)."""
    if steps >= diffusion.T:
        return diffusion
    return diffusion.respace(space_timesteps(diffusion.T, steps, "uniform"))


@torch.no_grad()
def sample_digits(stored: Stored, n: int, steps: int, seed: int = 0, batch: int = 1000,
                  progress: bool = True, profile: Profile | None = None) -> torch.Tensor:
    """``n`` samples (n, 1, R, R) of a stored digit model by ancestral sampling in ``steps`` steps,
    the network under the profile's mixed precision (bf16 where the machine has it)."""
    profile = profile or current()
    model = stored.model.eval()
    dev = next(model.parameters()).device
    process = sampling_process(stored.diffusion, steps)
    R = stored.config["resolution"]
    g = torch.Generator(device=dev).manual_seed(seed)  # x_T per batch, then that batch's sampling noise
    return generation.generate(lambda x_T, _: ddpm_sample(model, process, x_T, generator=g, progress=progress),
                               generation.gaussian(g, (1, R, R), dev), batch=batch, n=n, profile=profile)


def nll_settings(profile: Profile) -> dict[str, Any]:
    """How the bound is measured (chapters 01 and 02 alike): on how many held-out images, and how its
    T terms are summed by :func:`~diffusion_core.process.likelihood.bound_bpd`: the first and the last
    ``exact`` terms one by one (the first hold most of the bound; the last, with the cosine schedule's
    clipped beta, can be large too), the T - 2 ``exact`` between them from ``strata`` stratified draws
    per image. On a GPU every term is summed."""
    return profile.pick(smoke={"images": 32, "exact": 3, "strata": 6},
                        cpu={"images": 300, "exact": 10, "strata": 40},
                        gpu={"images": 500, "exact": 500, "strata": 0})


def heldout_bound(stored: Stored, profile: Profile, diffusion: GaussianDiffusion | None = None, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """:func:`~diffusion_core.process.likelihood.bound_bpd` of a stored model on the held-out digits
    (``nll_settings``), each part (B,), under ``diffusion`` (default: the process it was trained with)."""
    s = nll_settings(profile)
    x, _ = digits("heldout", stored.config["resolution"])
    x = x[: s["images"]].to(next(stored.model.parameters()).device)
    diffusion = stored.diffusion if diffusion is None else diffusion
    return bound_bpd(stored.model.eval(), diffusion, x, s["exact"], s["strata"], seed)


def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean over images and its standard error (which, with per-image timesteps, includes theirs)."""
    return values.mean().item(), (values.std() / values.numel() ** 0.5).item()


def heldout_nll(stored: Stored, profile: Profile, seed: int = 0) -> dict[str, float]:
    """The variational bound on held-out digits, bits/dim: mean and its standard error over images."""
    return dict(zip(("nll_bpd", "nll_stderr"), mean_stderr(heldout_bound(stored, profile, seed=seed)["total"])))


def evaluate_model(name: str, profile: Profile, evaluator: DigitEvaluator | None = None,
                   seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Load (or train) a stored digit model; FD of its samples and its held-out NLL, with timings."""
    evaluator = evaluator or digit_evaluator(profile)
    stored = load(name, profile)
    steps = sampling_steps(profile)
    start = time.perf_counter()
    samples = sample_digits(stored, fd_sample_count(profile), steps, seed=seed, progress=progress, profile=profile)
    sample_seconds = time.perf_counter() - start
    result = {"fd": evaluator.fd(samples), "accuracy_spread": _class_spread(evaluator, samples),
              "sample_seconds": sample_seconds, "sampling_steps": steps, "n_samples": len(samples),
              "train_seconds": stored.metrics.get("train_seconds"), "trained_now": stored.trained_now}
    result.update(heldout_nll(stored, profile, seed))
    result["samples"] = samples[:64]
    return result


def _class_spread(evaluator: DigitEvaluator, samples: torch.Tensor) -> float:
    """Fraction of the 10 classes' expected share covered: 1.0 means every digit equally often."""
    counts = torch.bincount(evaluator.predict(samples), minlength=10).float()
    return (torch.minimum(counts / counts.sum(), torch.full((10,), 0.1)).sum() / 1.0).item()


def loss_comparison(profile: Profile, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """FD and NLL for L_simple and L_vlb at the same budget, with the FD references beside them."""
    evaluator = digit_evaluator(profile)
    refs = evaluator.references(n=fd_sample_count(profile), seed=seed)
    rows = {loss: evaluate_model(name, profile, evaluator, seed, progress)
            for loss, name in (("l_simple", "digits-ddpm"), ("l_vlb", "digits-ddpm-vlb"))}
    return {"rows": rows, "references": refs, "classifier_accuracy": evaluator.accuracy}
