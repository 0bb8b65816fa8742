"""The Frechet distance between two sets of features (Heusel et al. 2017, the "FID" formula):

    FD = || mu_1 - mu_2 ||^2 + tr( C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2} )

tr((C_1 C_2)^{1/2}) is computed as the sum of square roots of the eigenvalues of the symmetric
positive semi-definite matrix C_1^{1/2} C_2 C_1^{1/2} (``eigh``, negative round-off clamped to 0),
so a singular covariance (dead feature units, fewer samples than features) never produces a NaN or
a complex residue.
"""

from __future__ import annotations

import numpy as np
import torch


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.asarray(c1, np.float64), np.asarray(c2, np.float64)
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances {c1.shape} and {c2.shape}")
    s1 = _sqrtm_psd((c1 + c1.T) / 2)
    m = s1 @ ((c2 + c2.T) / 2) @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features.detach().cpu().double() if torch.is_tensor(features) else features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinity (did the samples diverge?)")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """FD between two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance_from_stats(*feature_stats(features_a), *feature_stats(features_b))


def paired_bootstrap(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray,
                     reference: tuple[np.ndarray, np.ndarray], reps: int = 500, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """FD of two *paired* sample sets against ``reference`` (mean, covariance), ``reps`` times over
    bootstrap replicates: (reps,) FDs of a and (reps,) of b, where replicate r resamples the *same*
    indices from both sets. Image i of a and image i of b must come from the same starting noise;
    then the spread of FD(a) - FD(b) over replicates is how much the comparison moves with the draw
    of the n starting noises, the part they share cancelling. (Resampling with replacement repeats
    images, which raises both FDs a little: read a difference or a ratio, and its spread, rather than
    either replicate FD.) The model's own training is not resampled: a second training can move both."""
    fa = np.asarray(features_a.detach().cpu().double() if torch.is_tensor(features_a) else features_a, np.float64)
    fb = np.asarray(features_b.detach().cpu().double() if torch.is_tensor(features_b) else features_b, np.float64)
    if fa.shape != fb.shape:
        raise ValueError(f"paired sets must have the same shape, got {fa.shape} and {fb.shape}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int, got {reps!r}")
    g = torch.Generator().manual_seed(seed)
    out_a, out_b = np.empty(reps), np.empty(reps)
    for r in range(reps):
        idx = torch.randint(len(fa), (len(fa),), generator=g).numpy()
        out_a[r] = frechet_distance_from_stats(*feature_stats(fa[idx]), *reference)
        out_b[r] = frechet_distance_from_stats(*feature_stats(fb[idx]), *reference)
    return out_a, out_b


def central_interval(values: np.ndarray, level: float = 0.9) -> tuple[float, float]:
    """The central ``level`` interval of ``values`` (quantiles (1 - level)/2 and (1 + level)/2)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"values must be a non-empty set of finite numbers, got {values.size} values"
                         f"{'' if values.size == 0 else ' with NaN or infinity'}")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
