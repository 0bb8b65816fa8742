"""The shapes-world evaluator: an attribute classifier trained by the package (store recipe
``shapes-attributes``), whose penultimate features also give "FD" on shapes images.

Defined for chapter 05 (CLIP); chapters 04 (text-to-image), 06 (guidance) and later ones judge their
samples with it.

The classifier reads a scene the way its caption describes it: for each of the 9 cells of the 3x3
grid (:data:`~diffusion_core.data.shapes.POSITIONS`, index ``3 * row + col``) it predicts whether an
object is there and, if so, its shape, color and size; for the whole image, the background. Objects
of a scene sit in distinct cells, so "cell" is the object's position and the predicted count is the
number of occupied cells. Single-object scenes are the special case of one occupied cell.

:meth:`ShapesEvaluator.predict` returns, per image, a ``(B, 9)`` tensor per attribute (``PAD`` in
empty cells); :meth:`ShapesEvaluator.caption_accuracy` says whether a generated image shows what its
caption names: the same set of objects, each with the named shape, color, size and position.

FD is measured with the classifier's penultimate features against a fixed set of real scenes of the
world (1,000 scenes, 1-3 objects, training split), beside three references computed the same way:
the floor (other real scenes), the same scenes blurred 3x3, and one Gaussian fitted to the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.digits import box_blur, gaussian_baseline
from ..data.shapes import BACKGROUNDS, COLORS, PAD, POSITIONS, SHAPES, SIZES, Scenes, ShapesWorld
from ..profiles import Profile
from ..store import Recipe, Stored, load
from ..train import TrainConfig, train
from .frechet import feature_stats, frechet_distance_from_stats

CELLS = len(POSITIONS)  # 9
CELL_ATTRIBUTES = ("shape", "color", "size")  # predicted per occupied cell
CELL_CLASSES = {"present": 2, "shape": len(SHAPES), "color": len(COLORS), "size": len(SIZES)}
CAPTION_ATTRIBUTES = ("shape", "color", "size", "position")  # what a canonical caption names
# the world the evaluator trains on and measures FD against (its own seeds: never a chapter's data)
TRAIN_WORLD_SEED, REFERENCE_WORLD_SEED, TEST_WORLD_SEED = 9001, 9002, 9003


class AttributeClassifier(nn.Module):
    """A small CNN for (B, 3, R, R) shapes images in [-1, 1].

    ``features(x)`` (B, feature_dim) is the penultimate layer (FD is measured on it); ``forward(x)``
    returns a dict of logits: ``present`` (B, 9, 2), ``shape`` (B, 9, 6), ``color`` (B, 9, 8),
    ``size`` (B, 9, 2) per grid cell, and ``background`` (B, 3).
    """

    def __init__(self, resolution: int = 32, width: int = 32, feature_dim: int = 256):
        super().__init__()
        if resolution not in (32, 64):
            raise ValueError(f"the attribute classifier works at 32 or 64 px (the worlds of the profiles), got {resolution}")
        self.resolution = resolution
        w = width

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            # BatchNorm: several times faster than GroupNorm on CPU; in eval mode a fixed affine map,
            # so an image's features never depend on the rest of its batch
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU()]

        layers = block(3, w)
        for _ in range(resolution // 32 - 1):  # 64 px: one more halving, so the map below is 8x8 again
            layers += block(w, w, 2)
        layers += [*block(w, 2 * w, 2), *block(2 * w, 2 * w),           # R/2
                   *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w)]       # R/4 = 8: ~3 px per grid cell
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * w * 64, feature_dim), nn.SiLU())
        self.cell_head = nn.Linear(feature_dim, CELLS * sum(CELL_CLASSES.values()))
        self.background_head = nn.Linear(feature_dim, len(BACKGROUNDS))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the attribute classifier takes (B, 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"the attribute classifier was trained at {self.resolution}x{self.resolution}, "
                             f"got {x.shape[-2]}x{x.shape[-1]}; resize the images (or use the evaluator of "
                             "the profile whose world has that resolution)")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.body(x)

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.cell_head(h).view(h.shape[0], CELLS, -1)
        logits, start = {}, 0
        for name, n in CELL_CLASSES.items():
            logits[name] = out[..., start:start + n]
            start += n
        logits["background"] = self.background_head(h)
        return logits

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(x))


def cell_targets(scenes: Scenes) -> dict[str, torch.Tensor]:
    """The classifier's targets for a batch of scenes: ``present`` (B, 9) in {0, 1}; ``shape``,
    ``color``, ``size`` (B, 9) with ``PAD`` in empty cells; ``background`` (B,)."""
    B = len(scenes)
    dev = scenes.shape.device
    out = {"present": torch.zeros(B, CELLS, dtype=torch.long, device=dev)}
    for name in CELL_ATTRIBUTES:
        out[name] = torch.full((B, CELLS), PAD, dtype=torch.long, device=dev)
    rows, slots = scenes.present.nonzero(as_tuple=True)
    cells = scenes.position[rows, slots]
    out["present"][rows, cells] = 1
    for name in CELL_ATTRIBUTES:
        out[name][rows, cells] = getattr(scenes, name)[rows, slots]
    out["background"] = scenes.background.clone()
    return out


def attribute_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on presence (every cell), on shape/color/size (occupied cells only), background."""
    loss = F.cross_entropy(logits["present"].flatten(0, 1), targets["present"].flatten())
    for name in CELL_ATTRIBUTES:
        loss = loss + F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten(), ignore_index=PAD)
    return loss + F.cross_entropy(logits["background"], targets["background"])


def decode(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits -> predictions: ``present`` (B, 9) in {0, 1}; ``shape``, ``color``, ``size``,
    ``position`` (B, 9) with ``PAD`` in cells predicted empty (``position`` is the cell index);
    ``count`` (B,) the number of occupied cells; ``background`` (B,)."""
    present = logits["present"].argmax(-1)
    empty = present == 0
    out = {"present": present}
    for name in CELL_ATTRIBUTES:
        out[name] = logits[name].argmax(-1).masked_fill(empty, PAD)
    cells = torch.arange(CELLS, device=present.device).expand_as(present)
    out["position"] = cells.masked_fill(empty, PAD)
    out["count"] = present.sum(1)
    out["background"] = logits["background"].argmax(-1)
    return out


def _objects(attrs: dict[str, torch.Tensor], attributes: Sequence[str]) -> list[list[tuple[int, ...]]]:
    """Per image, the sorted list of its objects as tuples of ``attributes`` (from (B, K) tensors with
    ``PAD`` for absent objects; K = 9 cells for predictions, the world's slots for scenes)."""
    present = (attrs["position"] != PAD).cpu()
    table = torch.stack([attrs[a].cpu() for a in attributes], -1).tolist()
    return [sorted(tuple(o) for o, p in zip(row, keep) if p) for row, keep in zip(table, present.tolist())]


def scene_attributes(scenes: Scenes) -> dict[str, torch.Tensor]:
    """The attributes a caption of ``scenes`` names, as (B, K) tensors (``PAD`` where absent)."""
    return {"shape": scenes.shape, "color": scenes.color, "size": scenes.size, "position": scenes.position}


# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------

def _config(p: Profile) -> dict[str, Any]:
    # cpu: 1,000 steps of 128 fresh scenes reach 99.95% scene accuracy (shape 99.98%, the rest 100%)
    return {"resolution": p.pick(smoke=32, cpu=32, gpu=64), "width": p.pick(smoke=16, cpu=16, gpu=32),
            "feature_dim": 256, "steps": p.pick(smoke=200, cpu=1000, gpu=3000),
            "batch_size": p.pick(smoke=64, cpu=128, gpu=256), "lr": 2e-3, "seed": 3,
            "test_scenes": p.pick(smoke=500, cpu=2000, gpu=4000)}


def _build(c: dict[str, Any]) -> AttributeClassifier:
    torch.manual_seed(c["seed"])
    return AttributeClassifier(c["resolution"], c["width"], c["feature_dim"])


def _world(c: dict[str, Any], seed: int, split: str = "all") -> ShapesWorld:
    return ShapesWorld(resolution=c["resolution"], seed=seed, max_objects=3, split=split,
                       n_paraphrases=0, n_heldout_paraphrases=0)


def _train(model: AttributeClassifier, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    # every (shape, color) pair, held-out ones included: the judge must read what a model was never taught
    world = _world(c, TRAIN_WORLD_SEED)
    torch.manual_seed(c["seed"])

    def stream():
        for scenes in world.batches(c["batch_size"], seed=c["seed"]):
            yield scenes.images, cell_targets(scenes)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], weight_decay=1e-4, warmup_steps=min(100, c["steps"] // 5),
                      ema_decay=0.0, final_lr_fraction=0.01, desc="shapes attribute classifier")
    res = train(model, lambda m, b: attribute_loss(m(b[0]), b[1]), stream(), cfg, p)
    model.eval()
    metrics = {f"heldout_{k}": round(v, 4) for k, v in
               measure_accuracy(model.cpu(), _world(c, TEST_WORLD_SEED).fixed(c["test_scenes"], seed=0)).items()}
    metrics["train_seconds"] = round(res.seconds, 1)
    return metrics


SHAPES_ATTRIBUTES = Recipe("shapes-attributes", 1, _config, _build, _train,
                           "a small CNN reading a shapes scene per 3x3 cell (presence, shape, color, size) "
                           "and its background; its penultimate features define FD on shapes images")


@torch.no_grad()
def _predict(model: AttributeClassifier, images: torch.Tensor, batch: int = 500) -> dict[str, torch.Tensor]:
    model.eval()
    dev = next(model.parameters()).device
    parts = [decode(model(images[i:i + batch].clamp(-1, 1).to(dev))) for i in range(0, len(images), batch)]
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


def measure_accuracy(model: AttributeClassifier, scenes: Scenes) -> dict[str, float]:
    """Accuracy on real scenes: ``present`` (per cell), ``shape``/``color``/``size`` (per object, in
    its true cell), ``count``, ``background`` (per image), ``scene`` (every object right and none
    extra: the caption match of a real image, the ceiling of :meth:`ShapesEvaluator.caption_accuracy`)."""
    pred = _predict(model, scenes.images)
    target = cell_targets(scenes.to("cpu"))
    occupied = target["present"] == 1
    acc = {"present": (pred["present"] == target["present"]).float().mean().item()}
    for name in CELL_ATTRIBUTES:
        acc[name] = (pred[name][occupied] == target[name][occupied]).float().mean().item()
    acc["count"] = (pred["count"] == scenes.count.cpu()).float().mean().item()
    acc["background"] = (pred["background"] == target["background"]).float().mean().item()
    acc["scene"] = _match(pred, scene_attributes(scenes), CAPTION_ATTRIBUTES).float().mean().item()
    return acc


def _match(pred: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], attributes: Sequence[str]) -> torch.Tensor:
    keys = tuple(attributes)
    got, want = _objects(pred, keys), _objects(truth, keys)
    return torch.tensor([g == w for g, w in zip(got, want)], dtype=torch.bool)


# --------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------

@dataclass
class ShapesEvaluator:
    """Judges shapes-world images: attributes (:meth:`predict`), caption agreement
    (:meth:`caption_accuracy`) and FD against real scenes (:meth:`fd`, :meth:`references`)."""

    classifier: AttributeClassifier
    stored: Stored | None = None
    reference_scenes: int = 1000
    _reference: tuple | None = field(default=None, init=False, repr=False)

    @property
    def resolution(self) -> int:
        return self.classifier.resolution

    @property
    def accuracy(self) -> dict[str, float]:
        """Held-out accuracy per attribute, measured when the classifier was trained (on fresh scenes
        of 1-3 objects with every (shape, color) pair): ``present``, ``shape``, ``color``, ``size``,
        ``count``, ``background``, ``scene``. Empty for an unstored classifier."""
        if self.stored is None:
            return {}
        return {k[len("heldout_"):]: float(v) for k, v in self.stored.metrics.items() if k.startswith("heldout_")}

    def _check(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (3, self.resolution,
                                                                                               self.resolution):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"the shapes evaluator takes images (N, 3, {self.resolution}, {self.resolution}) "
                             f"in [-1, 1], got {shape}")
        if not torch.isfinite(images).all():
            raise ValueError("the images contain NaN or infinity")

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1] -> (N, feature_dim) penultimate features (images are clamped)."""
        self._check(images)
        self.classifier.eval()
        dev = next(self.classifier.parameters()).device
        return torch.cat([self.classifier.features(images[i:i + batch].clamp(-1, 1).to(dev)).cpu()
                          for i in range(0, len(images), batch)])

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image and grid cell: ``present`` (N, 9) in {0, 1}; ``shape``, ``color``, ``size``,
        ``position`` (N, 9) long with ``PAD`` (-1) in cells predicted empty; ``count`` (N,) and
        ``background`` (N,). Class indices are those of :mod:`diffusion_core.data.shapes`."""
        self._check(images)
        return _predict(self.classifier, images)

    def matches(self, images: torch.Tensor, scenes: Scenes,
                attributes: Sequence[str] = CAPTION_ATTRIBUTES) -> torch.Tensor:
        """(N,) bool: does image i show exactly the objects of ``scenes[i]``, compared on
        ``attributes`` (a subset of shape, color, size, position)? Objects are compared as sets, so
        with ``position`` left out an image passes when it shows the right objects anywhere."""
        bad = [a for a in attributes if a not in CAPTION_ATTRIBUTES]
        if bad or not attributes:
            raise ValueError(f"attributes must be a non-empty subset of {CAPTION_ATTRIBUTES}, got {tuple(attributes)}")
        if not isinstance(scenes, Scenes) or len(scenes) != len(images):
            n = len(scenes) if isinstance(scenes, Scenes) else type(scenes).__name__
            raise ValueError(f"need one scene per image: {len(images)} images, scenes {n}")
        return _match(self.predict(images), scene_attributes(scenes), tuple(attributes))

    def caption_accuracy(self, images: torch.Tensor, scenes: Scenes,
                         attributes: Sequence[str] = CAPTION_ATTRIBUTES) -> float:
        """The fraction of images whose predicted objects match what their scene's caption names
        (every object's shape, color, size and position, and no extra object); see :meth:`matches`.
        On real images it is ``accuracy["scene"]``, the ceiling for generated ones."""
        return self.matches(images, scenes, attributes).float().mean().item()

    # ---- FD -------------------------------------------------------------------------------------

    def reference_stats(self) -> tuple:
        """Mean and covariance of the features of the fixed real reference scenes (computed once)."""
        if self._reference is None:
            world = _world({"resolution": self.resolution}, REFERENCE_WORLD_SEED, split="train")
            self._reference = feature_stats(self.features(world.fixed(self.reference_scenes, seed=0).images))
        return self._reference

    def fd(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        """FD of ``images`` (N, 3, R, R) in [-1, 1] against the fixed real reference scenes (1-3
        objects, training split), or against ``reference`` images when given."""
        mine = feature_stats(self.features(images))
        theirs = self.reference_stats() if reference is None else feature_stats(self.features(reference))
        return frechet_distance_from_stats(*mine, *theirs)

    def references(self, n: int = 1000, seed: int = 0) -> dict[str, float]:
        """FD of the floor (n other real scenes), of those scenes blurred 3x3, and of one Gaussian
        fitted to the pixels of 4,000 real scenes."""
        world = _world({"resolution": self.resolution}, TRAIN_WORLD_SEED + 100 + seed, split="train")
        real = world.sample(n, seed=0).images
        fit = world.sample(4000, seed=1).images
        return {"fd_floor": self.fd(real), "fd_blurred": self.fd(box_blur(real)),
                "fd_gaussian": self.fd(gaussian_baseline(fit, n, seed))}


def shapes_evaluator(profile: Profile | str | None = None, verbose: bool = True) -> ShapesEvaluator:
    """The shapes evaluator from the store (trained on first use: on a 2-core CPU about 15 s at
    ``smoke``, a minute or two at ``cpu``). Its resolution is the profile's world resolution (32, or 64 on gpu)."""
    stored = load("shapes-attributes", profile, device="cpu", verbose=verbose)
    return ShapesEvaluator(stored.model.eval(), stored)
