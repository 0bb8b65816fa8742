"""Does a sample obey its spatial condition? Metrics for the control chapters (07 ControlNet, 08
T2I-Adapter) on the world of shapes (:mod:`diffusion_core.data.shapes`).

A control chapter generates an image from a condition of a real scene (its ``edges``, ``depth``,
``palette`` or ``mask``) and asks whether the sample obeys it. Here every map the world derives
from a scene is re-derived *from the image alone*, by the world's own rules, so a sample can be
scored against the condition it was given:

* :func:`segment` finds the object pixels; :func:`mask_iou` scores them against a mask;
* :func:`edge_map` applies the world's edge rule to the segmentation; :func:`edge_scores` gives
  precision, recall and F1 with a tolerance of a few pixels;
* :func:`depth_estimate` applies the world's depth rule; :func:`depth_error` is its mean
  absolute error;
* :func:`palette_of` is the world's 8x8 block-mean palette; :func:`palette_error` its error.

Every function takes a batch and returns per-image values (``(B,)`` tensors), computed with
batched torch ops on the images' device; :func:`mean_scores` summarises a dict of them.

Segmentation (:func:`segment`), in three steps.

1. The background. A scene's background is a vertical gradient between two colors, constant along
   a row, so a row's background color is the row's per-channel median: an object stays in one
   cell of the 3x3 grid and covers at most about a third of a row. Two or three objects side by
   side can cover most of a row, so the medians are checked against a robust straight line
   through all rows' medians (Siegel's repeated median; the world's gradients are linear in the
   row) and a row whose median strays from it by more than half the threshold takes the line.
2. Candidates: pixels whose color lies farther than ``threshold`` (Euclidean RGB distance, in
   [-1, 1] image units) from their row's background. The default, :func:`default_threshold`, is
   half of :func:`min_contrast`, the smallest distance between an object color and any color a
   background row can have, computed from ``COLOR_RGB`` and ``BACKGROUND_RGB`` (purple on the
   light background: 0.976, so 0.488). Half leaves the same margin both ways: a fully covered
   pixel of any object is a candidate unless its color is off by 0.488, and background noise
   below 0.488 never is.
3. Coverage. The world anti-aliases: a pixel of coverage ``c`` has the color
   ``b + c * (color - b)``, ``b`` its row's background. The object's full color is estimated from
   the candidates within 2 pixels whose color lies in the same direction from ``b`` (cosine
   > 0.9: the same object, not a neighbour of another color), as the one that reaches farthest
   along that direction; the pixel's coverage is its own distance from ``b`` over that reach,
   and it is an object pixel where the coverage is at least 0.5: the world's rule for its masks
   and edges (``coverage >= 0.5``). A bare threshold cannot do this: at 0.488 it takes white
   pixels on the dark background from 15% coverage on, and on 500 real one-object scenes at
   32x32 its IoU with ``mask >= 0.5`` is 0.92 where the coverage rule's is 1.000.

Depth (:func:`depth_estimate`) uses the same estimated coverage, so it blends background and
object the way the world does, and measures each object's area (for its size) and centroid
row from it.

Limits. The rules are the world's, so they hold for images that look like its scenes: flat
colored objects on a background that is constant along rows. A sample's object whose color
varies by more than a factor of two in its distance from the background within 2 pixels gets
holes; Gaussian noise of 0.1 per channel lowers the mask IoU of real scenes to about 0.93 and
leaves the edge F1 (tolerance 1) at 0.999; at 0.2 per channel the background itself crosses
the threshold and every score collapses. Objects whose pixels touch form one object for the
depth rule (with one object, always right; in the world objects sit in distinct cells).

>>> from diffusion_core.data.shapes import ShapesWorld
>>> scenes = ShapesWorld(resolution=32, max_objects=1, seed=0).sample(8, seed=1)
>>> bool(edge_scores(edge_map(scenes.images), scenes.edges)["f1"].min() > 0.8)
True
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import (
    BACKGROUND_RGB,
    COLOR_RGB,
    SHAPES,
    SIZE_HALF_EXTENT,
    _inside,
    edges_from_labels,
)

__all__ = [
    "PALETTE_GRID",
    "default_threshold",
    "depth_error",
    "depth_estimate",
    "edge_map",
    "edge_scores",
    "mask_iou",
    "mean_scores",
    "min_contrast",
    "palette_error",
    "palette_of",
    "segment",
    "size_threshold",
]

PALETTE_GRID = 8  # the world's palette is an 8x8 grid of block means
# pixels of exactly half coverage are common (coverage comes in steps of 1 / supersample**2 >= 1/64):
# the slack keeps them in the mask despite rounding, as the world's ``coverage >= 0.5`` does
_SLACK = 0.005
_RADIUS = 2  # how far (pixels, Chebyshev) a pixel looks for the full color of its object
_COS_MIN = 0.9  # two colors belong to the same object if their directions from the background agree


# --------------------------------------------------------------------------------------------------
# Constants derived from the world
# --------------------------------------------------------------------------------------------------

@functools.cache
def min_contrast() -> float:
    """The smallest Euclidean RGB distance, in [-1, 1] image units, between an object color of the
    world (``COLOR_RGB``) and any background color a row can have (every point of the segment
    between a background's top and bottom colors, ``BACKGROUND_RGB``). It is 0.976: purple on
    the light background. :func:`segment`'s default threshold is half of it."""
    best = math.inf
    for top, bottom in BACKGROUND_RGB.values():
        a, b = np.asarray(top, np.float64), np.asarray(bottom, np.float64)
        for color in COLOR_RGB.astype(np.float64):
            ab = b - a  # closest point of the segment a..b to the color
            t = 0.0 if not ab.any() else float(np.clip(np.dot(color - a, ab) / np.dot(ab, ab), 0, 1))
            best = min(best, float(np.linalg.norm(color - (a + t * ab))))
    return 2 * best  # [0, 1] RGB -> [-1, 1] image units


def default_threshold() -> float:
    """:func:`segment`'s default threshold: half of :func:`min_contrast` (0.488)."""
    return 0.5 * min_contrast()


@functools.cache
def _shape_area_factors(grid: int = 1000) -> tuple[float, ...]:
    """Area of each shape in units of its squared half-extent (a circle: pi), measured on a
    ``grid`` x ``grid`` lattice of its box [-1, 1]^2 with the world's own inside-tests."""
    t = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * 2 - 1
    u, v = t[None, :], t[:, None]
    return tuple(4.0 * _inside(k, u, v).double().mean().item() for k in range(len(SHAPES)))


@functools.cache
def size_threshold() -> float:
    """Object area, as a fraction of the image's area, that separates the world's small objects
    from its large ones (0.0421).

    Computed from the shape geometry: a shape of half-extent ``h`` (``SIZE_HALF_EXTENT``, a
    fraction of the image side) covers ``factor * h**2`` of the image, ``factor`` its area in its
    [-1, 1]^2 box (circle pi, square 2.96, triangle 1.8, diamond 2, cross 2.04, ring 2.16). The
    two sizes do not overlap: the largest small shape (circle, 0.0380) is smaller than the
    smallest large one (triangle, 0.0461), and the threshold is the middle of that gap, about
    4 pixels from either side at 32x32. (The midpoint of the two sizes' *mean* areas, 0.0443,
    would sit under 2 pixels from the large triangle.)"""
    factors = _shape_area_factors()
    small = max(factors) * SIZE_HALF_EXTENT[0] ** 2
    large = min(factors) * SIZE_HALF_EXTENT[-1] ** 2
    if not small < large:  # the world changed so that the sizes overlap
        raise AssertionError(f"small objects (up to {small:.4f}) overlap large ones (from {large:.4f})")
    return 0.5 * (small + large)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------

def _check_tensor(name: str, x: object, channels: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a (B, {channels}, H, W) {what} tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != channels or 0 in x.shape:
        raise ValueError(f"{name} must be a (B, {channels}, H, W) {what} tensor with B, H, W >= 1, "
                         f"got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _check_images(name: str, x: object) -> torch.Tensor:
    x = _check_tensor(name, x, 3, "image")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point image tensor in [-1, 1], got dtype {x.dtype}")
    return x.float()


def _check_binary(name: str, x: object) -> torch.Tensor:
    """A (B, 1, H, W) map of 0s and 1s (bool, integer or float) -> bool."""
    x = _check_tensor(name, x, 1, "binary map")
    if x.dtype == torch.bool:
        return x
    if not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 values (a binary map)")
    return x != 0


def _check_same_size(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape[0] != ref.shape[0] or x.shape[-2:] != ref.shape[-2:]:
        raise ValueError(f"{name} must match {ref_name} in batch size and H, W: got shape "
                         f"{tuple(x.shape)} against {tuple(ref.shape)}")


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (0 < value < math.inf):  # NaN fails too
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------

def _row_centres(n: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n  # as the world's y


def _row_background(images: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(B, 3, H, 1): each row's background color. The per-channel row median, except in rows
    where it strays more than ``tolerance`` from a robust line through all rows' medians
    (Siegel's repeated median), which use the line: there objects cover most of the row."""
    medians = images.median(dim=-1).values  # (B, 3, H)
    H = medians.shape[-1]
    if H < 3:
        return medians[..., None]
    y = _row_centres(H, images.device)
    dy = y[None, :] - y[:, None]  # (H, H), [i, j] = y_j - y_i
    slopes = (medians[..., None, :] - medians[..., :, None]) / dy.fill_diagonal_(math.nan)
    slope = slopes.nanmedian(dim=-1).values.median(dim=-1).values  # (B, 3)
    intercept = (medians - slope[..., None] * y).median(dim=-1).values
    line = intercept[..., None] + slope[..., None] * y  # (B, 3, H)
    strays = (medians - line).norm(dim=1, keepdim=True) > tolerance  # (B, 1, H)
    return torch.where(strays, line, medians)[..., None]


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Connected components (8-neighbourhood) of a (B, H, W) bool mask: (B, H, W) int64, -1 off
    the mask, else the largest flat pixel index of the pixel's component (labels spread by
    repeated 3x3 max-pooling until nothing changes: as many steps as the longest path)."""
    B, H, W = mask.shape
    index = torch.arange(1, H * W + 1, dtype=torch.float64, device=mask.device).view(1, 1, H, W)
    keep = mask[:, None].double()
    label = index * keep
    while True:
        grown = F.max_pool2d(label, 3, stride=1, padding=1) * keep
        if torch.equal(grown, label):
            break
        label = grown
    return label[:, 0].long() - 1


def _per_component(values: torch.Tensor, comp: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce (B, H, W) ``values`` over each component of ``comp`` (see :func:`_components`) and
    broadcast the result back to its pixels; 0 off the components."""
    B, H, W = comp.shape
    on = comp >= 0
    flat = (comp.clamp(min=0) + torch.arange(B, device=comp.device).view(B, 1, 1) * (H * W)).flatten()
    out = torch.zeros(B * H * W, dtype=values.dtype, device=values.device)
    out = out.scatter_reduce(0, flat[on.flatten()], values.flatten()[on.flatten()], reduce, include_self=False)
    return torch.where(on, out[flat].view(B, H, W), torch.zeros((), dtype=values.dtype, device=values.device))


def _analyse(images: torch.Tensor, threshold: float, radius: int = _RADIUS, cos_min: float = _COS_MIN):
    """Per pixel of (B, 3, H, W) images: (object mask, estimated coverage in [0, 1], candidates),
    each (B, H, W)."""
    background = _row_background(images, 0.5 * threshold)  # (B, 3, H, 1)
    residual = images - background
    distance = (residual * residual).sum(1).sqrt()  # (B, H, W) (sum, not norm: faster on CPU)
    candidate = distance > threshold
    unit = residual / distance.clamp(min=1e-12)[:, None]
    # A pixel of coverage c is b + c * (color - b), b its row's background. The object's color is
    # estimated from the candidates within `radius` that lie in the same direction from b (the
    # same object), as the one reaching farthest along it: the pixel's coverage is its distance
    # from b over that reach.
    H, W, r = distance.shape[1], distance.shape[2], radius
    x_pad, c_pad = F.pad(images, (r, r, r, r)), F.pad(candidate, (r, r, r, r))
    reach, cos2 = torch.zeros_like(distance), cos_min * cos_min
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            v = x_pad[:, :, dy:dy + H, dx:dx + W] - background
            along = (v * unit).sum(1)
            same = c_pad[:, dy:dy + H, dx:dx + W] & (along > 0) & (along * along > cos2 * (v * v).sum(1))
            reach = torch.maximum(reach, torch.where(same, along, 0))
    coverage = torch.where(reach > 0, distance / reach.clamp(min=1e-12), 0).clamp_(max=1)
    return coverage >= 0.5 - _SLACK, coverage, candidate


def segment(images: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Object mask ``(B, 1, H, W)`` bool of ``(B, 3, H, W)`` images in [-1, 1], from the images
    alone: meant to match a scene's ``mask >= 0.5`` (the module docstring explains the rule).

    ``threshold``: the distance from a row's background (Euclidean, RGB, [-1, 1] units) beyond
    which a pixel is surely object; default :func:`default_threshold`, half the smallest
    object/background distance of the world (0.488)."""
    images = _check_images("images", images)
    threshold = default_threshold() if threshold is None else _check_positive("threshold", threshold)
    return _analyse(images, threshold)[0][:, None]


def edge_map(images: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Edges ``(B, 1, H, W)`` float32 in {0, 1} of ``(B, 3, H, W)`` images, by the world's rule
    (:func:`~diffusion_core.data.shapes.edges_from_labels`) applied to :func:`segment`: object
    pixels whose 4-neighbourhood holds a background pixel, borders replicated. The segmentation has
    one label for every object, which is the world's rule whenever objects do not touch (one-object
    scenes always)."""
    return edges_from_labels(segment(images, threshold)[:, 0])


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------

def edge_scores(pred_edges: torch.Tensor, target_edges: torch.Tensor, tolerance: int = 1) -> dict[str, torch.Tensor]:
    """Per-image edge precision, recall and F1 (each ``(B,)`` float32) of binary ``(B, 1, H, W)``
    maps (bool or 0/1 values).

    A predicted edge pixel is correct when a target edge pixel lies within ``tolerance`` pixels
    (Chebyshev distance: the target dilated by a ``(2t+1) x (2t+1)`` square); recall counts the
    target pixels with a predicted one within ``tolerance`` the same way. ``tolerance=0`` asks for
    the exact pixels. Empty maps: when both maps of an image are empty, precision, recall and F1
    are all 1 (nothing to find, nothing found); when exactly one is empty they are all 0 (the
    sample drew edges where there are none, or none where there are some). F1 is
    ``2 P R / (P + R)``, 0 when P + R = 0."""
    pred = _check_binary("pred_edges", pred_edges)
    target = _check_binary("target_edges", target_edges)
    if pred.shape != target.shape:
        raise ValueError(f"pred_edges and target_edges must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
        raise ValueError(f"tolerance must be an integer >= 0 (pixels), got {tolerance!r}")
    t = int(tolerance)

    def near(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x.float(), 2 * t + 1, stride=1, padding=t) > 0 if t else x

    n_pred, n_target = pred.flatten(1).sum(1).float(), target.flatten(1).sum(1).float()
    hit_pred = (pred & near(target)).flatten(1).sum(1).float()
    hit_target = (target & near(pred)).flatten(1).sum(1).float()
    precision = hit_pred / n_pred.clamp(min=1)
    recall = hit_target / n_target.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    both_empty = (n_pred == 0) & (n_target == 0)
    one = torch.ones_like(f1)
    return {name: torch.where(both_empty, one, v) for name, v in
            (("precision", precision), ("recall", recall), ("f1", f1))}


def mask_iou(pred_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union ``(B,)`` of two ``(B, 1, H, W)`` masks with values in
    [0, 1] (bool, or soft: a pixel is in the mask where its value is >= 0.5, the world's rule, so
    ``scenes.mask`` can be passed as it is). Both masks empty: 1."""
    masks = []
    for name, m in (("pred_mask", pred_mask), ("target_mask", target_mask)):
        m = _check_tensor(name, m, 1, "mask")
        if m.dtype != torch.bool:
            if not ((m >= 0) & (m <= 1)).all():
                raise ValueError(f"{name} must hold values in [0, 1]")
            m = m >= 0.5
        masks.append(m)
    pred, target = masks
    if pred.shape != target.shape:
        raise ValueError(f"pred_mask and target_mask must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# --------------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------------

def depth_estimate(images: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Depth ``(B, 1, H, W)`` in [0, 1] of ``(B, 3, H, W)`` images by the world's rule applied to
    the images' own segmentation.

    Background: ``0.3 * y`` (``y`` the row centre in [0, 1]). Each object is a card at
    ``0.55 + 0.25 * size + 0.2 * centre_y``: ``centre_y`` is its coverage-weighted centroid row
    and ``size`` is 1 (large) where its coverage-weighted area, as a fraction of the image,
    exceeds :func:`size_threshold` and 0 (small) otherwise. As in the world, a pixel blends the
    two by its coverage ``c`` (estimated as in :func:`segment`): ``(1 - c) * 0.3 * y + c * card``.
    An object is a connected component (8-neighbourhood) of the segmentation and its candidates,
    with the partly covered pixels around it; objects whose pixels touch count as one (the
    world's objects sit in distinct cells; one-object scenes are always right). ``centre_y`` is
    the centroid, where the world uses the centre of the object's box: the two differ only for
    triangles, by 0.2 half-extents (a depth error of at most 0.007 on their pixels)."""
    images = _check_images("images", images)
    threshold = default_threshold() if threshold is None else _check_positive("threshold", threshold)
    obj, coverage, candidate = _analyse(images, threshold)
    core = candidate | obj
    comp = _components(core)  # objects; their partly covered rim takes the label of a core pixel near it
    rim = F.max_pool2d(comp[:, None].double() + 1, 2 * _RADIUS + 1, stride=1, padding=_RADIUS)[:, 0].long() - 1
    comp = torch.where(core, comp, torch.where(coverage > 0, rim, -1))
    B, H, W = coverage.shape
    y = _row_centres(H, images.device).view(1, H, 1)
    area = _per_component(coverage, comp, "sum")  # in pixels
    centre_y = _per_component(coverage * y, comp, "sum") / area.clamp(min=1e-12)
    large = (area / (H * W) > size_threshold()).float()
    card = 0.55 + 0.25 * large + 0.2 * centre_y
    depth = (1 - coverage) * (0.3 * y) + coverage * card
    return depth.clamp_(0, 1)[:, None]


def depth_error(images: torch.Tensor, target_depth: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Per-image mean absolute error ``(B,)`` between :func:`depth_estimate` of ``(B, 3, H, W)``
    images and a ``(B, 1, H, W)`` target depth in [0, 1] (a scene's ``depth``)."""
    images = _check_images("images", images)
    target = _check_tensor("target_depth", target_depth, 1, "depth map")
    _check_same_size("target_depth", target, "images", images)
    return (depth_estimate(images, threshold) - target.float()).abs().flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------
# Palette
# --------------------------------------------------------------------------------------------------

def palette_of(images: torch.Tensor) -> torch.Tensor:
    """The world's palette of ``(B, 3, H, W)`` images, H and W multiples of 8: the mean color of
    each block of an 8x8 grid, repeated over the block, ``(B, 3, H, W)`` (as ``scenes.palette``)."""
    images = _check_images("images", images)
    B, _, H, W = images.shape
    if H % PALETTE_GRID or W % PALETTE_GRID:
        raise ValueError(f"images must have H and W divisible by {PALETTE_GRID} (the palette is an "
                         f"{PALETTE_GRID}x{PALETTE_GRID} grid), got {H}x{W}")
    bh, bw = H // PALETTE_GRID, W // PALETTE_GRID
    pooled = F.avg_pool2d(images, (bh, bw))  # (B, 3, 8, 8)
    g = PALETTE_GRID
    return pooled[:, :, :, None, :, None].expand(B, 3, g, bh, g, bw).reshape(B, 3, H, W)


def palette_error(images: torch.Tensor, target_palette: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error ``(B,)``, in [-1, 1] image units, between the palette of
    ``(B, 3, H, W)`` images (:func:`palette_of`) and a ``(B, 3, H, W)`` target palette (a scene's
    ``palette``)."""
    palette = palette_of(images)
    target = _check_tensor("target_palette", target_palette, 3, "palette")
    _check_same_size("target_palette", target, "images", palette)
    return (palette - target.float()).abs().flatten(1).mean(1)


def mean_scores(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over the batch of a dict of per-image scores (from :func:`edge_scores`, or any dict of
    ``(B,)`` tensors, e.g. ``{"iou": mask_iou(...), "depth": depth_error(...)}``) as floats."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"scores must be a non-empty dict of per-image tensors, got {scores!r}")
    out = {}
    for name, value in scores.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.numel() == 0:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"scores[{name!r}] must be a (B,) tensor with B >= 1, got {got}")
        out[name] = value.float().mean().item()
    return out
