"""The faces world (ch. 10): determinism, ranges, landmarks, splits, identity consistency, errors."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.data.faces import (
    BACKGROUNDS,
    EXPRESSIONS,
    LIGHTINGS,
    POSES,
    TILTS,
    FaceWorld,
    caption,
    identity_parameters,
    landmark_map,
)


@pytest.fixture(scope="module")
def world():
    return FaceWorld(resolution=32, seed=0, n_identities=100, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def faces(world):
    return world.sample(64, seed=1)


def test_same_seeds_same_faces_other_seeds_other_faces(world, faces):
    again = FaceWorld(resolution=32, seed=0, n_identities=100, heldout_fraction=0.2).sample(64, seed=1)
    assert torch.equal(faces.images, again.images) and torch.equal(faces.landmarks, again.landmarks)
    assert faces.captions == again.captions and torch.equal(faces.identity, again.identity)
    assert not torch.equal(world.sample(64, seed=2).images, faces.images)
    assert not torch.equal(FaceWorld(32, seed=1, n_identities=100).sample(64, seed=1).images, faces.images)
    # an identity's parameters depend on (world seed, identity) only, not on n_identities
    assert identity_parameters(0, 7) == identity_parameters(0, 7)
    assert FaceWorld(32, seed=0, n_identities=10).parameters["half_width"][7] == world.parameters["half_width"][7]


def test_shapes_ranges_and_captions(faces):
    B = len(faces)
    assert faces.images.shape == (B, 3, 32, 32) and faces.images.dtype == torch.float32
    assert faces.images.min() >= -1 and faces.images.max() <= 1
    assert faces.landmarks.shape == (B, 5, 2) and faces.identity.shape == (B,)
    for name, names in (("pose", POSES), ("tilt", TILTS), ("expression", EXPRESSIONS), ("lighting", LIGHTINGS),
                        ("background", BACKGROUNDS)):
        v = getattr(faces, name)
        assert v.shape == (B,) and v.min() >= 0 and v.max() < len(names)
    assert len(faces.captions) == B
    for i, text in enumerate(faces.captions):
        assert text == caption(faces.pose[i].item(), faces.tilt[i].item(), faces.expression[i].item(),
                               faces.lighting[i].item(), faces.background[i].item())
        assert BACKGROUNDS[faces.background[i].item()] in text and EXPRESSIONS[faces.expression[i].item()] in text
    assert caption(0, 2, 1, 0, 0) == "a smiling face turned left tilted right in dim light on a blue background"
    assert caption(1, 1, 0, 1, 2) == "a neutral face facing forward on a gray background"
    sub = faces[[0, 3]]
    assert len(sub) == 2 and sub.captions == [faces.captions[0], faces.captions[3]]
    assert FaceWorld(64, seed=0, n_identities=10).sample(2, seed=0).images.shape == (2, 3, 64, 64)


def test_landmarks_inside_the_image_and_on_the_face(world):
    f = world.sample(256, seed=3, split="all")
    assert (f.landmarks > 0).all() and (f.landmarks < 32).all()
    # eyes above the nose tip above the mouth corners (in the face frame: rotate back by the roll)
    r = f.roll * math.pi / 180
    d = f.landmarks - f.center[:, None]
    v = -torch.sin(r)[:, None] * d[..., 0] + torch.cos(r)[:, None] * d[..., 1]
    assert (v[:, 0] < v[:, 2]).all() and (v[:, 1] < v[:, 2]).all() and (v[:, 2] < v[:, 3]).all()
    # the landmark pixels are not background: face colours differ from the background colour
    bg = f.images[:, :, 0, 0]  # a corner is background (faces stay clear of the corners)
    px = f.landmarks.long().clamp(0, 31)
    for i in range(16):
        for k in range(5):
            x, y = px[i, k].tolist()
            assert (f.images[i, :, y, x] - bg[i]).abs().max() > 0.05


def _one_face(world, **nuisance):
    """Landmarks of identity 0 with the nuisances of sample 0, some overridden."""
    p = {k: torch.tensor([float(v[0])]) for k, v in world.parameters.items()}
    t = {"yaw": torch.zeros(1), "roll": torch.zeros(1), "smile": torch.zeros(1), "scale": torch.ones(1),
         "shift": torch.zeros(1, 2)}
    t.update({k: torch.as_tensor(v, dtype=torch.float32).reshape(t[k].shape) for k, v in nuisance.items()})
    return world._landmarks(p, t)[0]


def test_landmarks_move_with_rotation_scale_pose_and_smile(world):
    base = _one_face(world)
    c = torch.tensor([16.0, 16.0])
    # scale: distances from the centre scale by the factor
    assert torch.allclose(_one_face(world, scale=1.2) - c, 1.2 * (base - c), atol=1e-4)
    # rotation by 90 degrees clockwise on screen: (dx, dy) -> (-dy, dx)
    rot = _one_face(world, roll=90.0) - c
    assert torch.allclose(rot, torch.stack([-(base - c)[:, 1], (base - c)[:, 0]], 1), atol=1e-4)
    # a positive (clockwise) roll lowers the right eye relative to the left one: "tilted right"
    tilted = _one_face(world, roll=18.0)
    assert tilted[1, 1] > tilted[0, 1]
    # turning left moves every inner feature left, the nose tip most
    left = _one_face(world, yaw=-1.0)
    shift = (left - base)[:, 0]
    assert (shift < 0).all() and shift[2] == shift.min()
    # a smile raises the mouth corners
    assert (_one_face(world, smile=0.1)[3:, 1] < base[3:, 1]).all()


def test_heldout_identities_never_in_train(world):
    held = set(world.heldout_identities.tolist())
    assert len(held) == 20 and held.isdisjoint(world.train_identities.tolist())
    train_ids = torch.cat([b.identity for b, _ in zip(world.batches(256, seed=0), range(4))])
    train_ids = torch.cat([train_ids, world.sample(1000, seed=5).identity])
    assert held.isdisjoint(train_ids.tolist())
    h = world.sample(500, seed=5, split="heldout").identity
    assert set(h.tolist()) <= held and len(set(h.tolist())) > 15
    assert len(set(world.sample(500, seed=6, split="all").identity.tolist()) & held) > 0


def test_same_identity_looks_alike_across_nuisances(world):
    n = 40
    ids = torch.arange(n)
    a = world.sample(n, seed=10, identities=ids).images
    b = world.sample(n, seed=11, identities=ids).images
    c = world.sample(n, seed=11, identities=ids.roll(1)).images

    def face_distance(x, y):  # the central region, mostly face (backgrounds differ either way)
        return (x[:, :, 10:22, 10:22] - y[:, :, 10:22, 10:22]).abs().mean((1, 2, 3))

    assert face_distance(a, b).mean() < 0.8 * face_distance(a, c).mean()


def test_landmark_map():
    lm = torch.tensor([[[5.5, 5.5], [20.5, 5.5], [12.0, 14.0], [8.5, 24.5], [100.0, 100.0]]])
    m = landmark_map(lm, 32)
    assert m.shape == (1, 3, 32, 32) and m.min() >= 0 and m.max() <= 1
    assert torch.equal(m[0, :, 5, 5], torch.tensor([1.0, 0, 0])) and m[0, 1, 5, 20] == 1
    assert m[0, 2, 14, 12] > 0.5 and m[0, :, 24, 8].tolist() == [1.0, 1.0, 0.0]
    assert m[0, :, 0, 31].sum() == 0  # the off-image point draws nothing
    assert landmark_map(lm, 64).shape == (1, 3, 64, 64)


def test_errors_name_the_problem(world):
    with pytest.raises(ValueError, match="resolution"):
        FaceWorld(resolution=8)
    with pytest.raises(TypeError, match="seed"):
        FaceWorld(seed=1.5)
    with pytest.raises(ValueError, match="heldout_fraction"):
        FaceWorld(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="n_identities"):
        FaceWorld(n_identities=1)
    with pytest.raises(ValueError, match="split"):
        world.sample(4, seed=0, split="test")
    with pytest.raises(ValueError, match="n must be"):
        world.sample(0, seed=0)
    with pytest.raises(ValueError, match="identities must hold"):
        world.sample(3, seed=0, identities=[1, 2])
    with pytest.raises(ValueError, match="outside"):
        world.sample(1, seed=0, identities=[99])  # held out, asked for in the train split
    with pytest.raises(ValueError, match="0..99"):
        world.sample(1, seed=0, split="all", identities=[100])
    with pytest.raises(ValueError, match="no identities"):
        FaceWorld(n_identities=10, heldout_fraction=0).sample(2, seed=0, split="heldout")
    with pytest.raises(ValueError, match="landmarks"):
        landmark_map(torch.zeros(2, 4, 2), 32)
