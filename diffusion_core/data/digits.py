"""scikit-learn's handwritten digits (1,797 images of 8x8, shipped with the package), resized.

The split is fixed (it does not depend on a chapter's seed) so that every chapter's Frechet
distances are measured against the same held-out digits: 500 held-out, 1,297 for training,
stratified by class.
"""

from __future__ import annotations

import numbers
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "heldout", "all")
HELDOUT = 500
_SPLIT_SEED = 20200619  # the DDPM paper's arXiv date; fixed forever so numbers stay comparable


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    _, y = _raw()
    rng = np.random.default_rng(_SPLIT_SEED)
    held = []
    for c in range(10):  # stratified: 50 of each class held out
        idx = np.flatnonzero(y == c)
        held.extend(rng.choice(idx, HELDOUT // 10, replace=False).tolist())
    held = np.sort(np.array(held))
    train = np.setdiff1d(np.arange(len(y)), held)
    return {"train": train, "heldout": held, "all": np.arange(len(y))}


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def quantize(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round images in [-1, 1] to 2^bits levels (the discretised decoder's data); ``bits`` >= 1."""
    if not _is_int(bits) or bits < 1:
        raise ValueError(f"quantize: bits must be an integer >= 1 (2^bits levels), got {bits!r}")
    levels = 2**bits - 1
    return torch.round((x.clamp(-1, 1) + 1) / 2 * levels) / levels * 2 - 1


def digits(split: str = "train", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as images (N, 1, R, R) in [-1, 1], quantised to 8 bits, and labels (N,).

    Resized from 8x8 with bilinear interpolation; ``resolution=8`` gives the originals.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
    images, labels = _raw()
    idx = _split_indices()[split]
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return quantize(x * 2 - 1), torch.from_numpy(labels[idx])


def gaussian_baseline(train: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Samples of one Gaussian fitted to the training pixels (full covariance), clipped to [-1, 1]:
    the weakest 'generative model' there is, a baseline every FD is reported beside."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"gaussian_baseline: n must be a positive integer, got {n!r}")
    if train.ndim < 2 or train.shape[0] < 2:
        raise ValueError(f"gaussian_baseline: train must hold at least 2 examples (B, ...) to fit a covariance, "
                         f"got shape {tuple(train.shape)}")
    flat = train.reshape(train.shape[0], -1).double()
    mean = flat.mean(0)
    cov = torch.cov(flat.T) + 1e-6 * torch.eye(flat.shape[1], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, flat.shape[1], generator=g, dtype=torch.float64)
    samples = mean + z @ torch.linalg.cholesky(cov).T
    return samples.float().reshape(n, *train.shape[1:]).clamp(-1, 1)


def box_blur(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """A size x size box filter (replicate padding): a mild, visible degradation for calibrating FD.

    ``x`` is (B, C, H, W), floating point; the result has its shape for every ``size`` >= 1 (an even
    box is padded one pixel more after than before, so it is centred half a pixel off)."""
    if not _is_int(size) or size < 1:
        raise ValueError(f"box_blur: size must be a positive integer, got {size!r}")
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"box_blur: x must be a floating-point (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
                         f"{' of ' + str(x.dtype) if torch.is_tensor(x) else ''}")
    C = x.shape[1]
    k = torch.ones(C, 1, size, size, dtype=x.dtype, device=x.device) / size**2
    before, after = (size - 1) // 2, size // 2
    return F.conv2d(F.pad(x, [before, after, before, after], mode="replicate"), k, groups=C)


def batches(x: torch.Tensor, batch_size: int, seed: int = 0, *tensors: torch.Tensor):
    """An infinite iterator of shuffled minibatches (reshuffled every epoch, deterministic for a seed).

    Each epoch yields ``len(x) // batch_size`` full batches (the remainder is dropped), so
    ``batch_size`` must lie in 1..len(x); ``tensors`` (labels, ...) are indexed alongside ``x`` and
    must have as many rows."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batches: batch_size must be a positive integer, got {batch_size!r}")
    n = x.shape[0]
    if batch_size > n:
        raise ValueError(f"batches: batch_size {batch_size} is larger than the data ({n} examples); "
                         f"no full batch could ever be drawn")
    for i, t in enumerate(tensors):
        if t.shape[0] != n:
            raise ValueError(f"batches: tensors[{i}] has {t.shape[0]} rows but x has {n}; they are indexed together")
    return _batches(x, batch_size, seed, tensors)


def _batches(x: torch.Tensor, batch_size: int, seed: int, tensors: tuple[torch.Tensor, ...]):
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield (x[idx], *[t[idx] for t in tensors]) if tensors else x[idx]
