"""The faces identity encoder (ch. 10): ArcFace logits by hand, threshold choice, the smoke recipe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_core.evaluate.identity import (
    IdentityEncoder,
    arcface_logits,
    best_threshold,
    embed,
    verification_pairs,
)


def test_arcface_logits_on_hand_made_vectors():
    s, m = 10.0, 0.5
    theta = 0.6  # the embedding sits at angle 0.6 from class 0, pi/2 - 0.6 from class 1
    z = torch.tensor([[math.cos(theta), math.sin(theta)]]) * 3.0  # not normalised: the function normalises
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    got = arcface_logits(z, w, torch.tensor([0]), s, m)
    assert torch.allclose(got, torch.tensor([[s * math.cos(theta + m), s * math.sin(theta)]]), atol=1e-5)
    got = arcface_logits(z, w, torch.tensor([1]), s, m)
    assert torch.allclose(got, torch.tensor([[s * math.cos(theta), s * math.cos(math.pi / 2 - theta + m)]]),
                          atol=1e-5)
    # m = 0: plain scaled cosine; past pi - m the target logit continues as cos(theta) - m sin(m)
    assert torch.allclose(arcface_logits(z, w, torch.tensor([0]), s, 0.0), s * F.normalize(z) @ F.normalize(w).T)
    back = torch.tensor([[-1.0, 0.0]])
    assert torch.allclose(arcface_logits(back, w, torch.tensor([0]), 1.0, m)[0, 0],
                          torch.tensor(-1.0 - m * math.sin(m)), atol=1e-5)
    with pytest.raises(ValueError, match="share D"):
        arcface_logits(torch.zeros(2, 3), torch.zeros(4, 2), torch.zeros(2, dtype=torch.long))


def test_best_threshold_separates_and_encoder_checks_input():
    sim = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = torch.tensor([False, False, False, True, True, True])
    t = best_threshold(sim, same)
    assert 0.3 < t < 0.7
    model = IdentityEncoder(32, width=4, dim=8, n_classes=3)
    e = embed(model, torch.zeros(2, 3, 32, 32))
    assert e.shape == (2, 8) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="32, 32"):
        model(torch.zeros(1, 3, 16, 16))


def test_smoke_recipe_separates_identities(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CACHE", str(tmp_path))
    from diffusion_core.store import load

    stored = load("faces-identity", "smoke", device="cpu", verbose=False)
    assert stored.metrics["verification_accuracy"] > 0.55 and stored.metrics["train_seconds"] > 0
    # independently of the stored metric: same-identity pairs of held-out faces are more similar
    from diffusion_core.evaluate.identity import _world

    xa, xb, same = verification_pairs(_world(stored.config), 200, "heldout", seed=77)
    sim = (embed(stored.model, xa) * embed(stored.model, xb)).sum(1)
    assert sim[same].mean() > sim[~same].mean() + 0.05
