"""Control metrics (diffusion_core.evaluate.control): real scenes obey their own maps, the scores'
arithmetic on tiny hand-made maps, and clear errors for bad inputs.

The bars on real scenes are the brief's round numbers (mean F1 >= 0.95, IoU >= 0.95, depth error
<= 0.01), not tuned to what the metrics reach: about 1.000, 1.000 and 0.00004 on one-object scenes
at 32x32, because the world renders exactly the linear color mix that the segmentation inverts.
"""

from __future__ import annotations

import doctest

import pytest
import torch

from diffusion_core.data.shapes import BACKGROUND_RGB, COLOR_RGB, Scenes, ShapesWorld, edges_from_labels
from diffusion_core.evaluate import control
from diffusion_core.evaluate.control import (
    default_threshold,
    depth_error,
    depth_estimate,
    edge_map,
    edge_scores,
    mask_iou,
    mean_scores,
    min_contrast,
    palette_error,
    palette_of,
    segment,
    size_threshold,
)


@pytest.fixture(scope="module")
def singles() -> Scenes:
    """The control chapters' scenes: one object, 32x32."""
    return ShapesWorld(resolution=32, max_objects=1, seed=0, split="all",
                       n_paraphrases=0, n_heldout_paraphrases=0).sample(300, seed=11)


@pytest.fixture(scope="module")
def triples() -> Scenes:
    return ShapesWorld(resolution=32, max_objects=3, seed=0, split="all",
                       n_paraphrases=0, n_heldout_paraphrases=0).sample(200, seed=12)


def square_outline(size: int = 16, lo: int = 5, hi: int = 10) -> torch.Tensor:
    """(1, 1, size, size) float map: the outline of the square [lo, hi]^2."""
    m = torch.zeros(1, 1, size, size)
    m[..., lo:hi + 1, lo:hi + 1] = 1
    m[..., lo + 1:hi, lo + 1:hi] = 0
    return m


# ---- the world's constants -----------------------------------------------------------------------

def test_thresholds_come_from_the_worlds_colors_and_shapes():
    # purple (0.66, 0.22, 0.90) on the light background (0.6, 0.6, 0.6), doubled for [-1, 1] units
    purple_light = 2 * ((0.06**2 + 0.38**2 + 0.30**2) ** 0.5)
    assert min_contrast() == pytest.approx(purple_light, abs=1e-6)
    assert default_threshold() == pytest.approx(purple_light / 2, abs=1e-6)
    every = [2 * float(((torch.tensor(c) - torch.tensor(b[0])) ** 2).sum().sqrt())
             for c in COLOR_RGB.tolist() for b in BACKGROUND_RGB.values()]
    assert min(every) >= min_contrast() - 1e-6  # the gradient's ends included
    # largest small shape (circle) pi * 0.11^2 = 0.0380, smallest large one (triangle) 1.8 * 0.16^2 = 0.0461
    assert size_threshold() == pytest.approx((3.1416 * 0.11**2 + 1.8 * 0.16**2) / 2, abs=2e-4)


def test_rendered_areas_of_small_and_large_objects_fall_on_either_side_of_the_size_threshold(singles):
    area = singles.mask.flatten(1).sum(1) / 32**2  # coverage sums
    large = singles.size[:, 0] == 1
    assert area[~large].max() < size_threshold() < area[large].min()


def test_the_worlds_edges_are_edges_from_labels_of_its_object_masks(triples):
    label = torch.zeros(triples.mask.shape[0], 32, 32, dtype=torch.uint8)
    for k in range(triples.object_masks.shape[1]):
        label.masked_fill_(triples.object_masks[:, k] >= 0.5, k + 1)
    assert torch.equal(edges_from_labels(label), triples.edges)
    with pytest.raises(ValueError, match="label"):
        edges_from_labels(label.float())


# ---- real scenes obey their own maps -------------------------------------------------------------

def test_segmentation_matches_the_scenes_mask(singles, triples):
    assert mask_iou(segment(singles.images), singles.mask).mean() >= 0.95
    assert mask_iou(segment(triples.images), triples.mask).mean() >= 0.95
    big = ShapesWorld(resolution=64, max_objects=1, seed=0, n_paraphrases=0,
                      n_heldout_paraphrases=0).sample(32, seed=13)
    assert mask_iou(segment(big.images), big.mask).mean() >= 0.95


def test_edge_maps_of_real_scenes_score_close_to_one_against_their_own_edges(singles, triples):
    for scenes in (singles, triples):
        f1 = edge_scores(edge_map(scenes.images), scenes.edges)["f1"]
        assert f1.mean() >= 0.95 and f1.min() >= 0.7
    # ... and far lower against another scene's edges
    other = edge_scores(edge_map(singles.images), singles.edges.roll(1, 0))["f1"]
    assert other.mean() < 0.3


def test_edge_map_is_binary_float(singles):
    e = edge_map(singles.images[:4])
    assert e.shape == (4, 1, 32, 32) and e.dtype == torch.float32
    assert set(e.unique().tolist()) <= {0.0, 1.0}


def test_depth_of_real_scenes_is_close_to_their_depth_and_far_from_anothers(singles, triples):
    own = depth_error(singles.images, singles.depth)
    other = depth_error(singles.images, singles.depth.roll(1, 0))
    assert own.mean() <= 0.01 and own.max() <= 0.03
    assert other.mean() >= 0.03 and other.mean() >= 5 * own.mean()
    assert depth_error(triples.images, triples.depth).mean() <= 0.01
    d = depth_estimate(singles.images[:4])
    assert d.shape == (4, 1, 32, 32) and d.min() >= 0 and d.max() <= 1


def test_palette_is_the_worlds_palette(singles):
    assert torch.equal(palette_of(singles.images), singles.palette)
    assert palette_error(singles.images, singles.palette).max() <= 1e-6
    assert palette_error(singles.images, singles.palette.roll(1, 0)).mean() >= 0.05


def test_mild_noise_barely_moves_the_edge_scores(singles):
    g = torch.Generator().manual_seed(0)
    noisy = (singles.images + 0.05 * torch.randn(singles.images.shape, generator=g)).clamp(-1, 1)
    assert edge_scores(edge_map(noisy), singles.edges)["f1"].mean() >= 0.9


def test_a_plain_background_has_no_object_and_the_worlds_background_depth():
    y = (torch.arange(32) + 0.5) / 32
    top, bottom = (torch.tensor(c) for c in BACKGROUND_RGB["gradient"])
    image = (top[:, None, None] + (bottom - top)[:, None, None] * y[:, None]).expand(3, 32, 32)[None] * 2 - 1
    assert not segment(image).any() and not edge_map(image).any()
    assert torch.allclose(depth_estimate(image)[0, 0], (0.3 * y)[:, None].expand(32, 32), atol=1e-6)


def test_rows_mostly_covered_by_objects_take_the_background_from_the_other_rows():
    # a red bar over 28 of 32 columns: its rows' medians are red; the line through the other rows
    # gives the gradient back
    y = (torch.arange(32) + 0.5) / 32
    top, bottom = (torch.tensor(c) for c in BACKGROUND_RGB["gradient"])
    image = (top[:, None, None] + (bottom - top)[:, None, None] * y[:, None]).expand(3, 32, 32).clone()
    image[:, 12:18, 2:30] = torch.tensor(COLOR_RGB[0])[:, None, None]
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 12:18, 2:30] = True
    assert torch.equal(segment(image[None] * 2 - 1), mask)


# ---- the scores' arithmetic ----------------------------------------------------------------------

def test_f1_of_a_map_against_itself_a_shifted_copy_and_an_empty_map():
    m = square_outline()
    shifted = m.roll(1, dims=-1)
    empty = torch.zeros_like(m)
    assert edge_scores(m, m, tolerance=0)["f1"].item() == 1
    for name, value in edge_scores(shifted, m, tolerance=1).items():
        assert value.item() == 1, name
    assert edge_scores(shifted, m, tolerance=0)["f1"].item() < 1
    for pred, target in ((m, empty), (empty, m)):
        scores = edge_scores(pred, target)
        assert all(v.item() == 0 for v in scores.values())
    assert all(v.item() == 1 for v in edge_scores(empty, empty).values())


def test_precision_and_recall_by_hand():
    target = torch.zeros(1, 1, 6, 6)
    target[0, 0, 1, 1] = target[0, 0, 4, 4] = 1
    pred = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    pred[0, 0, 1, 1] = True  # exact hit
    pred[0, 0, 3, 3] = True  # diagonal neighbour of (4, 4): Chebyshev distance 1
    pred[0, 0, 1, 3] = True  # 2 columns from (1, 1)
    pred[0, 0, 5, 0] = True  # far from both
    s0 = edge_scores(pred, target, tolerance=0)
    assert s0["precision"].item() == pytest.approx(1 / 4) and s0["recall"].item() == pytest.approx(1 / 2)
    assert s0["f1"].item() == pytest.approx(2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2))
    s1 = edge_scores(pred, target, tolerance=1)
    assert s1["precision"].item() == pytest.approx(2 / 4) and s1["recall"].item() == pytest.approx(1)
    assert s1["f1"].item() == pytest.approx(2 / 3)
    s2 = edge_scores(pred, target, tolerance=2)
    assert s2["precision"].item() == pytest.approx(3 / 4) and s2["recall"].item() == pytest.approx(1)


def test_scores_are_per_image():
    m = square_outline()
    batch_pred = torch.cat([m, m, torch.zeros_like(m)])
    batch_target = torch.cat([m, m.roll(3, dims=-1), m])
    f1 = edge_scores(batch_pred, batch_target, tolerance=0)["f1"]
    assert f1.shape == (3,) and f1[0] == 1 and 0 < f1[1] < 1 and f1[2] == 0
    means = mean_scores(edge_scores(batch_pred, batch_target))
    assert set(means) == {"precision", "recall", "f1"} and all(isinstance(v, float) for v in means.values())


def test_mask_iou_by_hand():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.zeros(2, 1, 4, 4)
    a[0, 0, :2, :2] = 1  # 4 pixels
    b[0, 0, :2, :3] = 0.5  # 6 pixels: soft masks count from 0.5
    b[0, 0, 3, 3] = 0.4  # below 0.5: not in the mask
    iou = mask_iou(a, b)
    assert iou[0].item() == pytest.approx(4 / 6) and iou[1].item() == 1  # both empty: 1
    assert mask_iou(a > 0, a > 0).tolist() == [1.0, 1.0]


def test_module_docstring_example_runs():
    assert doctest.testmod(control).failed == 0


# ---- bad inputs ----------------------------------------------------------------------------------

IMG = torch.zeros(2, 3, 16, 16)
MAP = torch.zeros(2, 1, 16, 16)
NAN_IMG = IMG.clone().index_fill_(2, torch.tensor([3]), float("nan"))


@pytest.mark.parametrize("call,name", [
    (lambda: segment(torch.zeros(2, 1, 16, 16)), "images"),
    (lambda: segment(torch.zeros(3, 16, 16)), "images"),
    (lambda: segment(IMG.long()), "images"),
    (lambda: segment(NAN_IMG), "images"),
    (lambda: segment(IMG.clone().fill_(float("inf"))), "images"),
    (lambda: segment([[0.0]]), "images"),
    (lambda: segment(IMG, threshold=-0.1), "threshold"),
    (lambda: segment(IMG, threshold=float("nan")), "threshold"),
    (lambda: segment(IMG, threshold="0.5"), "threshold"),
    (lambda: edge_map(MAP), "images"),
    (lambda: edge_scores(IMG, MAP), "pred_edges"),
    (lambda: edge_scores(MAP, torch.zeros(2, 1, 8, 8)), "pred_edges and target_edges"),
    (lambda: edge_scores(MAP, MAP + 0.5), "target_edges"),
    (lambda: edge_scores(MAP.clone().fill_(float("nan")), MAP), "pred_edges"),
    (lambda: edge_scores(MAP, MAP, tolerance=-1), "tolerance"),
    (lambda: edge_scores(MAP, MAP, tolerance=1.5), "tolerance"),
    (lambda: edge_scores(MAP, MAP, tolerance=True), "tolerance"),
    (lambda: mask_iou(MAP + 2, MAP), "pred_mask"),
    (lambda: mask_iou(MAP, IMG), "target_mask"),
    (lambda: mask_iou(MAP, torch.zeros(3, 1, 16, 16)), "pred_mask and target_mask"),
    (lambda: depth_estimate(MAP), "images"),
    (lambda: depth_error(IMG, IMG), "target_depth"),
    (lambda: depth_error(IMG, torch.zeros(2, 1, 8, 16)), "target_depth"),
    (lambda: depth_error(IMG, MAP.clone().fill_(float("nan"))), "target_depth"),
    (lambda: palette_of(torch.zeros(2, 3, 12, 16)), "images"),
    (lambda: palette_of(MAP), "images"),
    (lambda: palette_error(IMG, MAP), "target_palette"),
    (lambda: palette_error(IMG, torch.zeros(1, 3, 16, 16)), "target_palette"),
    (lambda: mean_scores({}), "scores"),
    (lambda: mean_scores({"f1": torch.zeros(2, 2)}), "scores"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
