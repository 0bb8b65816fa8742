"""The shapes evaluator's API on a tiny untrained classifier: shapes of its outputs, the caption
matching logic (checked with perfect predictions), FD, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_core.data.shapes import PAD, ShapesWorld
from diffusion_core.evaluate.attributes import (
    CELL_CLASSES,
    CELLS,
    AttributeClassifier,
    ShapesEvaluator,
    _match,
    attribute_loss,
    cell_targets,
    decode,
    scene_attributes,
)


@pytest.fixture(scope="module")
def scenes():
    return ShapesWorld(resolution=32, seed=0, n_paraphrases=0, n_heldout_paraphrases=0).sample(24, seed=1)


@pytest.fixture(scope="module")
def evaluator():
    torch.manual_seed(0)
    return ShapesEvaluator(AttributeClassifier(32, width=8, feature_dim=32).eval(), reference_scenes=64)


def perfect_logits(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits whose argmax is the target (any class where the target is PAD)."""
    out = {}
    for name, n in CELL_CLASSES.items():
        out[name] = 10.0 * F.one_hot(targets[name].clamp(min=0), n).float()
    out["background"] = 10.0 * F.one_hot(targets["background"], 3).float()
    return out


def test_predict_returns_one_value_per_cell_with_pad_in_empty_cells(evaluator, scenes):
    pred = evaluator.predict(scenes.images)
    for name in ("present", "shape", "color", "size", "position"):
        assert pred[name].shape == (24, CELLS) and pred[name].dtype == torch.long
    assert pred["count"].shape == (24,) and pred["background"].shape == (24,)
    empty = pred["present"] == 0
    for name in ("shape", "color", "size", "position"):
        assert (pred[name][empty] == PAD).all() and (pred[name][~empty] >= 0).all()
    assert torch.equal(pred["count"], pred["present"].sum(1))


def test_cell_targets_put_each_object_in_its_grid_cell(scenes):
    t = cell_targets(scenes)
    assert torch.equal(t["present"].sum(1), scenes.count)
    b, k = 0, 0
    cell = scenes.position[b, k]
    assert t["shape"][b, cell] == scenes.shape[b, k] and t["color"][b, cell] == scenes.color[b, k]


def test_perfect_predictions_match_every_caption_and_one_wrong_color_fails(scenes):
    pred = decode(perfect_logits(cell_targets(scenes)))
    truth = scene_attributes(scenes)
    assert _match(pred, truth, ("shape", "color", "size", "position")).all()
    cell = scenes.position[0, 0]
    pred["color"][0, cell] = (pred["color"][0, cell] + 1) % 8
    ok = _match(pred, truth, ("shape", "color", "size", "position"))
    assert not ok[0] and ok[1:].all()
    assert _match(pred, truth, ("shape", "size")).all()  # color is not compared


def test_an_extra_object_fails_the_match(scenes):
    pred = decode(perfect_logits(cell_targets(scenes)))
    empty = (pred["present"][0] == 0).nonzero()[0, 0]
    for name, value in (("present", 1), ("shape", 0), ("color", 0), ("size", 0), ("position", int(empty))):
        pred[name][0, empty] = value
    assert not _match(pred, scene_attributes(scenes), ("shape", "color"))[0]


def test_loss_is_finite_and_ignores_empty_cells(scenes):
    model = AttributeClassifier(32, width=8, feature_dim=32)
    loss = attribute_loss(model(scenes.images), cell_targets(scenes))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert attribute_loss(perfect_logits(cell_targets(scenes)), cell_targets(scenes)) < 1e-3


def test_caption_accuracy_fd_and_features(evaluator, scenes):
    acc = evaluator.caption_accuracy(scenes.images, scenes)
    assert 0.0 <= acc <= 1.0
    assert evaluator.features(scenes.images).shape == (24, 32)
    fd = evaluator.fd(scenes.images, reference=scenes.images.flip(-1))
    assert math.isfinite(fd) and fd >= 0
    assert evaluator.fd(scenes.images, reference=scenes.images) < 1e-6
    assert math.isfinite(evaluator.fd(scenes.images))  # against the fixed real reference scenes
    assert evaluator.accuracy == {}  # no stored metrics for an unstored classifier


def test_errors_name_the_problem(evaluator, scenes):
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        evaluator.predict(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        evaluator.fd(torch.full((4, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="one scene per image"):
        evaluator.caption_accuracy(scenes.images[:3], scenes)
    with pytest.raises(ValueError, match="subset"):
        evaluator.caption_accuracy(scenes.images, scenes, ("shape", "mood"))
    with pytest.raises(ValueError, match="32 or 64"):
        AttributeClassifier(48)
    with pytest.raises(ValueError, match="trained at 32x32"):
        AttributeClassifier(32, width=8).features(torch.zeros(1, 3, 64, 64))
