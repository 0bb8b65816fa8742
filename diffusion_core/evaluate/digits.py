"""The digit evaluator: a classifier trained by the package whose penultimate features give "FD".

Every FD on digits in the book is measured with these features against the 500 held-out digits,
and reported beside three references computed the same way:

- the floor: 1,000 training digits (real images the models learn from) against the held-out ones;
- blurred: those 1,000 digits blurred by a 3x3 box filter, a small visible degradation;
- Gaussian: 1,000 samples of one Gaussian fitted to the training pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.digits import box_blur, digits, gaussian_baseline
from ..profiles import Profile
from ..store import Recipe, Stored, load
from ..train import TrainConfig, train
from .frechet import feature_stats, frechet_distance_from_stats


class DigitClassifier(nn.Module):
    """A small CNN for (B, 1, R, R) digits in [-1, 1]; ``features(x)`` is its penultimate layer."""

    def __init__(self, resolution: int = 16, width: int = 32, feature_dim: int = 128, classes: int = 10):
        super().__init__()
        self.resolution = resolution
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, classes)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"the digit classifier takes (B, 1, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(f"the digit classifier was trained at {self.resolution}x{self.resolution}, "
                             f"got {x.shape[-2]}x{x.shape[-1]}; resize the images first")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (replicate-padded); the same shift for the whole batch."""
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    R = x.shape[-1]
    return pad[:, :, dy:dy + R, dx:dx + R]


def _config(p: Profile) -> dict[str, Any]:
    return {"resolution": 16, "width": 32, "feature_dim": 128, "steps": p.pick(smoke=300, cpu=600, gpu=600),
            "batch_size": 128, "lr": 2e-3, "seed": 1}


def _build(c: dict[str, Any]) -> DigitClassifier:
    return DigitClassifier(c["resolution"], c["width"], c["feature_dim"])


def _train(model: DigitClassifier, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    x, y = digits("train", c["resolution"])
    g = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def stream():
        while True:
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0] - c["batch_size"] + 1, c["batch_size"]):
                idx = perm[i:i + c["batch_size"]]
                yield _augment(x[idx], g), y[idx]

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], weight_decay=1e-4, warmup_steps=50, ema_decay=0.0,
                      final_lr_fraction=0.01, desc="digit classifier")
    res = train(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=0.05), stream(), cfg, p)
    model.eval()
    return {"heldout_accuracy": round(accuracy(model.cpu(), *digits("heldout", c["resolution"])), 4),
            "train_seconds": round(res.seconds, 1)}


DIGIT_CLASSIFIER = Recipe("digit-classifier", 1, _config, _build, _train,
                          "a small CNN on 16x16 digits; its penultimate features define FD")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    dev = next(model.parameters()).device
    pred = torch.cat([model(x[i:i + batch].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch)])
    return (pred == y).float().mean().item()


@dataclass
class DigitEvaluator:
    """Measures FD (and class accuracy) of digit samples against the held-out digits."""

    classifier: DigitClassifier
    stored: Stored | None = None
    _heldout: tuple | None = field(default=None, init=False, repr=False)

    @property
    def resolution(self) -> int:
        return self.classifier.resolution

    @property
    def accuracy(self) -> float:
        return float(self.stored.metrics["heldout_accuracy"]) if self.stored else float("nan")

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        self.classifier.eval()
        dev = next(self.classifier.parameters()).device
        x = x.clamp(-1, 1)
        return torch.cat([self.classifier.features(x[i:i + batch].to(dev)).cpu() for i in range(0, len(x), batch)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.classifier.parameters()).device
        return torch.cat([self.classifier(x[i:i + 500].clamp(-1, 1).to(dev)).argmax(1).cpu() for i in range(0, len(x), 500)])

    def heldout_stats(self) -> tuple:
        """Mean and covariance of the held-out digits' features (computed once)."""
        if self._heldout is None:
            self._heldout = feature_stats(self.features(digits("heldout", self.resolution)[0]))
        return self._heldout

    def fd(self, samples: torch.Tensor) -> float:
        """FD of ``samples`` (N, 1, R, R) in [-1, 1] against the held-out digits."""
        if samples.ndim != 4 or samples.shape[1:] != (1, self.resolution, self.resolution):
            raise ValueError(f"FD takes digit images (N, 1, {self.resolution}, {self.resolution}), "
                             f"got shape {tuple(samples.shape)}")
        if not torch.isfinite(samples).all():
            raise ValueError("the samples contain NaN or infinity")
        return frechet_distance_from_stats(*feature_stats(self.features(samples)), *self.heldout_stats())

    def references(self, n: int = 1000, seed: int = 0) -> dict[str, float]:
        """FD of the floor (n training digits), of those digits blurred 3x3, and of the Gaussian baseline."""
        train_x, _ = digits("train", self.resolution)
        g = torch.Generator().manual_seed(seed)
        real = train_x[torch.randperm(len(train_x), generator=g)[:n]]
        return {"fd_floor": self.fd(real), "fd_blurred": self.fd(box_blur(real)),
                "fd_gaussian": self.fd(gaussian_baseline(train_x, n, seed))}


def digit_evaluator(profile: Profile | str | None = None, verbose: bool = True) -> DigitEvaluator:
    """The digit evaluator from the store (trained on first use, about a minute on a laptop)."""
    stored = load("digit-classifier", profile, device="cpu", verbose=verbose)
    return DigitEvaluator(stored.model.eval(), stored)
