"""Chapter 13's measurements (diffusion_core.experiments.imagen): the setting, the three findings' runs on
small smoke-profile samples, the benchmark's keys and the bars' verdicts."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_core.experiments import imagen as claim
from diffusion_core.profiles import Profile
from diffusion_core.recipes import imagen as R

SMOKE = Profile("smoke", torch.device("cpu"))


@pytest.fixture(scope="module")
def setting():
    return claim.Setting(SMOKE, n=6)


def test_the_setting_holds_the_same_scenes_at_both_resolutions(setting):
    assert setting.scenes.captions == setting.scenes_high.captions
    assert setting.scenes.images.shape[-1] == setting.resolution == 16
    assert setting.scenes_high.images.shape[-1] == setting.high_resolution == 32
    # real scenes of the base resolution score near the top, and their FD is far below noise's
    real = setting.scores(setting.real.images, setting.real)
    noise = setting.scores(torch.rand_like(setting.real.images) * 2 - 1, setting.real)
    assert real["caption_accuracy"] > noise["caption_accuracy"]
    assert real["fd"] < noise["fd"]


def test_samples_are_memoised_and_share_the_noise(setting):
    a = setting.base_samples("minilm", "caption", scale=1.0, threshold="static")
    b = setting.base_samples("minilm", "caption", scale=1.0, threshold="static")
    assert torch.equal(a, b)
    assert len([k for k in setting.samples if k.endswith("_w1_static")]) == 1
    # another method from the same noise differs only by its clipping: at w = 1 static and none stay close
    c = setting.base_samples("minilm", "caption", scale=1.0, threshold="none")
    assert c.shape == a.shape and not torch.equal(a, c)


def test_sentence_vectors_are_unit_length_and_mask_padding(setting):
    for e in R.ENCODERS:
        v = claim.sentence_vectors(setting.bases[e], ["a small red circle", "a small red circle at the top left"])
        assert v.shape[0] == 2
        assert torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the same text alone or beside a longer one (different padding): the same vector
    v1 = claim.sentence_vectors(setting.bases["minilm"], ["a red circle"])
    v2 = claim.sentence_vectors(setting.bases["minilm"], ["a red circle", "a large blue square at the bottom right"])
    assert torch.allclose(v1[0], v2[0], atol=1e-5)


def test_paraphrase_retrieval_of_the_frozen_language_model(setting):
    # MiniLM is pretrained and frozen: at any profile it matches a held-out phrasing to its scene's caption
    # far above chance (1 / number of distinct captions)
    share = claim.paraphrase_retrieval(setting, "minilm", "heldout")
    chance = 1 / len(set(setting.scenes.captions))
    assert 0.0 <= share <= 1.0
    assert share > 2 * chance


def test_the_three_findings_and_the_benchmark_keys(setting):
    enc = claim.encoder_comparison(SMOKE, setting)
    cas = claim.cascade(SMOKE, setting, levels=(0.0, claim.AUG_LEVEL))
    thr = claim.thresholding_sweep(SMOKE, setting, weights=(1.0, 20.0))
    m = claim.benchmark_metrics(enc, cas, thr)
    for key in ("caption_accuracy_by_encoder", "paraphrase_accuracy_by_encoder"):
        assert set(m[key]) == {"frozen_lm", "clip", "scratch"}
        assert all(0.0 <= v <= 1.0 for v in m[key].values())
    assert m["fd_cascade_aug"] == cas["aug"][claim.AUG_LEVEL]["fd"]
    assert m["fd_cascade_no_aug"] == cas["no_aug"]["fd"] > 0
    assert list(m["fd_by_aug_level"]) == [0.0, claim.AUG_LEVEL]
    for key in ("fd_by_w", "caption_accuracy_by_w", "saturated_fraction_by_w"):
        assert list(m[key]) == ["none", "static", "dynamic"]
        assert all(list(row) == [1.0, 20.0] for row in m[key].values())
    sat = m["saturated_fraction_by_w"]
    # dynamic thresholding divides by s >= its 99.5th percentile: at most about 0.5% of a sample's values can
    # reach +-1; static clipping pins every overshoot to +-1
    assert all(v <= 0.01 for v in sat["dynamic"].values())
    assert all(sat["static"][w] >= sat["dynamic"][w] for w in sat["static"])
    # the SR samples are 32 px, the cascade's low-resolution ones 16 px
    assert cas["samples"]["no_aug"].shape[-1] == 32 and cas["samples"]["low"].shape[-1] == 16
    assert set(m["verdicts"]) == set(claim.BARS)
    # GLIDE's cosine schedule ends with alpha_bar_T ~ 2.4e-9 (beta clipped at 0.999): the first step's x0_hat
    # multiplies an error in eps_hat by 1 / sqrt(alpha_bar_T), about 20,000
    assert thr["alpha_bar_T"] < 1e-8
    assert thr["x0_error_gain_first_step"] == pytest.approx(thr["alpha_bar_T"] ** -0.5) and thr["x0_error_gain_first_step"] > 1e4


def _metrics(**over):
    m = {"paraphrase_accuracy_by_encoder": {"frozen_lm": 0.5, "clip": 0.2, "scratch": 0.3},
         "fd_cascade_aug": 10.0, "fd_cascade_no_aug": 12.0,
         "fd_by_w": {"none": {1.0: 9.0, 20.0: 50.0}, "static": {1.0: 8.0, 20.0: 30.0}, "dynamic": {1.0: 8.0, 20.0: 20.0}},
         "saturated_fraction_by_w": {"none": {1.0: 0.1, 20.0: 0.6}, "static": {1.0: 0.1, 20.0: 0.4},
                                     "dynamic": {1.0: 0.0, 20.0: 0.003}}}
    for path, value in over.items():
        *keys, last = path.split("__")
        d = m
        for k in keys:
            d = d[k]
        d[float(last) if last.replace(".", "").isdigit() else last] = value
    return m


def test_verdicts_read_the_bars_both_ways():
    v = claim.verdicts(_metrics())
    assert all(r["passed"] for r in v.values())
    assert v["paraphrase_frozen_over_scratch"]["value"] == pytest.approx(0.2)
    assert v["cascade_aug_over_no_aug"]["value"] == pytest.approx(2.0)
    assert v["dynamic_over_static_fd"]["value"] == pytest.approx(10.0)   # read at the largest w
    fails = {
        "paraphrase_frozen_over_scratch": _metrics(paraphrase_accuracy_by_encoder__scratch=0.6),
        "cascade_aug_over_no_aug": _metrics(fd_cascade_aug=12.0),       # equal is not lower
        "dynamic_over_static_fd": _metrics(fd_by_w__dynamic__20=31.0),
        "dynamic_over_none_saturated": _metrics(saturated_fraction_by_w__dynamic__20=0.7),
    }
    for bar, m in fails.items():
        v = claim.verdicts(m)
        assert not v[bar]["passed"], bar
        assert sum(not r["passed"] for r in v.values()) == 1
    # equal paraphrase accuracy clears its bar ("at least")
    assert claim.verdicts(_metrics(paraphrase_accuracy_by_encoder__scratch=0.5))["paraphrase_frozen_over_scratch"]["passed"]
    # a missing number never passes
    m = _metrics(fd_cascade_aug=None)
    assert claim.verdicts(m)["cascade_aug_over_no_aug"] == {"value": None, "bar": 0.0, "passed": False}
    m = copy.deepcopy(_metrics())
    del m["fd_by_w"]["dynamic"]
    assert not claim.verdicts(m)["dynamic_over_static_fd"]["passed"]


def test_bad_input_is_an_error(setting):
    with pytest.raises(ValueError, match="encoders"):
        claim.Setting(SMOKE, n=4, encoders=("t5",))
    with pytest.raises(ValueError, match="levels"):
        claim.cascade(SMOKE, setting, levels=(0.3, 0.1))
    with pytest.raises(ValueError, match="aug_level"):
        claim.cascade(SMOKE, setting, levels=(0.0, 1.5))
    with pytest.raises(ValueError, match="methods"):
        claim.thresholding_sweep(SMOKE, setting, methods=("clip",))
    with pytest.raises(ValueError, match="weights"):
        claim.thresholding_sweep(SMOKE, setting, weights=(5.0, 1.0))
    with pytest.raises(ValueError, match="kind"):
        claim.paraphrase_retrieval(setting, "minilm", "translation")
