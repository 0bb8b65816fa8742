"""The world of shapes: determinism, ranges, maps, held-out pairs, captions and their paraphrases."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest
import torch

from diffusion_core.data.shapes import (
    CLASS_NAMES,
    COLOR_RGB,
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_TEMPLATES,
    PAD,
    POSITIONS,
    SHAPES,
    SIZE_HALF_EXTENT,
    SIZES,
    TRAIN_TEMPLATES,
    Scenes,
    ShapesDataset,
    ShapesWorld,
    is_heldout_pair,
    parse_mentions,
    zero_shot_prompts,
)

TENSORS = ("images", "shape", "color", "size", "position", "count", "background", "centers",
           "object_masks", "mask", "edges", "depth", "palette")
TEXTS = ("captions", "paraphrases", "heldout_paraphrases", "relations")


@pytest.fixture(scope="module")
def scenes() -> Scenes:
    return ShapesWorld(resolution=32, seed=0).sample(400, seed=1)


@pytest.fixture(scope="module")
def singles() -> Scenes:
    return ShapesWorld(resolution=32, seed=0, max_objects=1, split="all").sample(400, seed=2)


def assert_same(a: Scenes, b: Scenes) -> None:
    for name in TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in TEXTS:
        assert getattr(a, name) == getattr(b, name), name


def all_texts(s: Scenes, i: int) -> list[str]:
    return [s.captions[i], *s.paraphrases[i], *s.heldout_paraphrases[i], s.relations[i]]


def objects(s: Scenes, i: int) -> list[tuple[int, int, int, int]]:
    return [(s.shape[i, k].item(), s.color[i, k].item(), s.size[i, k].item(), s.position[i, k].item())
            for k in range(s.shape.shape[1]) if s.shape[i, k] != PAD]


# ---- determinism ---------------------------------------------------------------------------------

def test_same_seed_gives_the_same_scenes_and_another_seed_other_scenes():
    a = ShapesWorld(resolution=32, seed=0).sample(64, seed=5)
    b = ShapesWorld(resolution=32, seed=0).sample(64, seed=5)
    assert_same(a, b)
    c = ShapesWorld(resolution=32, seed=0).sample(64, seed=6)
    d = ShapesWorld(resolution=32, seed=1).sample(64, seed=5)
    assert not torch.equal(a.images, c.images) and a.captions != c.captions
    assert not torch.equal(a.images, d.images)


def test_seed_none_continues_a_deterministic_stream_of_new_scenes():
    w1, w2 = ShapesWorld(seed=3), ShapesWorld(seed=3)
    first, second = w1.sample(16), w1.sample(16)
    assert not torch.equal(first.images, second.images)
    assert_same(first, w2.sample(16))
    assert_same(second, w2.sample(16))


def test_batches_are_an_infinite_deterministic_stream_of_new_scenes():
    world = ShapesWorld(seed=0)
    a = list(itertools.islice(world.batches(8, seed=2), 3))
    b = list(itertools.islice(world.batches(8, seed=2), 3))
    for x, y in zip(a, b):
        assert_same(x, y)
    assert len(a[0]) == 8
    assert not torch.equal(a[0].images, a[1].images) and not torch.equal(a[1].images, a[2].images)
    c = next(world.batches(8, seed=3))
    assert not torch.equal(a[0].images, c.images)


def test_fixed_sets_depend_on_seed_and_split_only():
    world = ShapesWorld(seed=0)
    assert_same(world.fixed(32, seed=1), ShapesWorld(seed=0).fixed(32, seed=1))
    held = world.fixed(32, seed=1, split="heldout")
    assert held.split == "heldout" and held.heldout.any(1).all()
    assert not torch.equal(world.fixed(32, seed=1).images, world.fixed(32, seed=2).images)


def test_the_same_seed_gives_the_same_scenes_at_every_resolution():
    a = ShapesWorld(resolution=32).sample(16, seed=4)
    b = ShapesWorld(resolution=64).sample(16, seed=4)
    for name in ("shape", "color", "size", "position", "count", "background", "centers"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.captions == b.captions and a.paraphrases == b.paraphrases
    down = torch.nn.functional.avg_pool2d(b.images, 2)
    assert (down - a.images).abs().mean() < 0.02  # same picture, finer pixels


# ---- shapes and ranges ---------------------------------------------------------------------------

@pytest.mark.parametrize("resolution,max_objects", [(8, 3), (24, 2), (32, 3), (64, 1)])
def test_every_map_has_its_shape_dtype_and_range(resolution, max_objects):
    n, R, K = 12, resolution, max_objects
    s = ShapesWorld(resolution=R, max_objects=K).sample(n, seed=0)
    expected = {"images": (n, 3, R, R), "palette": (n, 3, R, R), "mask": (n, 1, R, R),
                "edges": (n, 1, R, R), "depth": (n, 1, R, R), "object_masks": (n, K, R, R),
                "shape": (n, K), "color": (n, K), "size": (n, K), "position": (n, K),
                "count": (n,), "background": (n,), "centers": (n, K, 2)}
    for name, shape in expected.items():
        assert tuple(getattr(s, name).shape) == shape, name
    for name in ("images", "palette", "mask", "edges", "depth", "object_masks", "centers"):
        assert getattr(s, name).dtype == torch.float32, name
    for name in ("shape", "color", "size", "position", "count", "background"):
        assert getattr(s, name).dtype == torch.int64, name
    assert s.images.min() >= -1 and s.images.max() <= 1 and s.palette.abs().max() <= 1
    for name in ("mask", "depth", "object_masks"):
        v = getattr(s, name)
        assert v.min() >= 0 and v.max() <= 1, name
    assert set(s.edges.unique().tolist()) <= {0.0, 1.0}
    assert all(len(getattr(s, name)) == n for name in TEXTS)
    assert len(s) == n


def test_attributes_are_in_range_and_padded_after_the_count(scenes):
    K = scenes.shape.shape[1]
    present = torch.arange(K)[None] < scenes.count[:, None]
    assert torch.equal(scenes.present, present)
    assert scenes.count.min() == 1 and scenes.count.max() == 3
    for name, names in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS)):
        v = getattr(scenes, name)
        assert (v[~present] == PAD).all(), name
        assert v[present].min() >= 0 and v[present].max() < len(names), name
    assert (scenes.centers[~present] == PAD).all()
    c = scenes.centers[present]
    assert c.min() > 0 and c.max() < 1
    for i in range(len(scenes)):  # every object in its own cell
        pos = scenes.position[i, : scenes.count[i]].tolist()
        assert len(set(pos)) == len(pos)
    assert set(scenes.background.tolist()) == {0, 1, 2}


def test_object_masks_sit_at_the_center_with_the_right_area_and_never_overlap(singles, scenes):
    R = singles.images.shape[-1]
    cov = singles.object_masks[:, 0]
    ys, xs = torch.meshgrid(torch.arange(R) + 0.5, torch.arange(R) + 0.5, indexing="ij")
    area = cov.sum((1, 2))
    cx = (cov * xs).sum((1, 2)) / area / R
    assert (cx - singles.centers[:, 0, 0]).abs().max() < 0.02
    circles = singles.shape[:, 0] == SHAPES.index("circle")
    for z, half in enumerate(SIZE_HALF_EXTENT):  # anti-aliased area matches pi r^2
        sel = circles & (singles.size[:, 0] == z)
        expected = np.pi * (half * R) ** 2
        assert ((area[sel] - expected).abs() / expected).max() < 0.03
    assert scenes.object_masks.sum(1).max() <= 1 + 1e-6  # no subpixel is covered twice
    assert torch.allclose(scenes.mask[:, 0], scenes.object_masks.sum(1))
    absent = ~scenes.present
    assert (scenes.object_masks[absent] == 0).all()


def test_object_pixels_show_the_object_color(singles):
    for i in range(0, 400, 7):
        inside = singles.object_masks[i, 0] > 0.999
        rgb = singles.images[i][:, inside].mean(1)
        expected = torch.from_numpy(COLOR_RGB[singles.color[i, 0]]) * 2 - 1
        assert torch.allclose(rgb, expected, atol=1e-4)


# ---- spatial maps --------------------------------------------------------------------------------

def test_edges_lie_on_mask_boundaries_and_every_object_has_them(scenes):
    K = scenes.object_masks.shape[1]
    label = ((scenes.object_masks >= 0.5).float() * torch.arange(1, K + 1)[None, :, None, None]).sum(1)
    lab = torch.nn.functional.pad(label[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    c = lab[:, 1:-1, 1:-1]
    boundary = ((lab[:, :-2, 1:-1] != c) | (lab[:, 2:, 1:-1] != c) | (lab[:, 1:-1, :-2] != c)
                | (lab[:, 1:-1, 2:] != c)) & (c > 0)
    edges = scenes.edges[:, 0] > 0
    assert torch.equal(edges, boundary)
    assert (scenes.mask[:, 0][edges] >= 0.5).all()
    per_object = (scenes.object_masks >= 0.5) & edges[:, None]
    assert (per_object.flatten(2).any(2) == scenes.present).all()


def test_depth_puts_objects_in_front_of_the_ground_and_big_low_objects_nearer(singles):
    inside = singles.object_masks[:, 0] > 0.999
    ground = singles.mask[:, 0] == 0
    d = singles.depth[:, 0]
    assert d[ground].max() <= 0.3 + 1e-6 and d[inside].min() >= 0.55
    card = torch.stack([d[i][inside[i]].mean() for i in range(len(singles))])
    expected = 0.55 + 0.25 * singles.size[:, 0] + 0.2 * singles.centers[:, 0, 1]
    assert torch.allclose(card, expected, atol=1e-5)


def test_palette_is_the_mean_color_of_an_8x8_grid(scenes):
    R = scenes.images.shape[-1]
    block = R // 8
    means = torch.nn.functional.avg_pool2d(scenes.images, block)
    assert torch.allclose(scenes.palette[:, :, ::block, ::block], means, atol=1e-6)
    assert torch.equal(scenes.palette, scenes.palette[:, :, ::block, ::block].repeat_interleave(block, 2)
                       .repeat_interleave(block, 3))


# ---- held-out pairs ------------------------------------------------------------------------------

def test_heldout_pairs_are_documented_and_leave_every_shape_and_color_in_training():
    assert 0.10 <= len(HELDOUT_PAIRS) / (len(SHAPES) * len(COLORS)) <= 0.20
    train = {(s, c) for s in SHAPES for c in COLORS} - set(HELDOUT_PAIRS)
    assert {s for s, _ in train} == set(SHAPES) and {c for _, c in train} == set(COLORS)


def test_train_split_never_uses_a_heldout_pair_and_heldout_scenes_always_do():
    world = ShapesWorld(seed=0)
    train = world.sample(2000, seed=0)
    assert not train.heldout.any()
    held = world.sample(500, seed=0, split="heldout")
    assert held.heldout.any(1).all()
    held_pairs = {CLASS_NAMES["pair"][p] for p in held.pair[held.heldout].tolist()}
    assert held_pairs == {f"{c} {s}" for s, c in HELDOUT_PAIRS}
    single = ShapesWorld(seed=0, max_objects=1, split="heldout").sample(200, seed=0)
    assert single.heldout[:, 0].all()
    mixed = ShapesWorld(seed=0, split="all").sample(500, seed=0)
    assert mixed.heldout.any() and not mixed.heldout.all()
    assert torch.equal(is_heldout_pair(held.shape, held.color), held.heldout)


# ---- text ----------------------------------------------------------------------------------------

def test_the_caption_of_a_single_object_scene_parses_back_to_its_attributes(singles):
    for i in range(len(singles)):
        m = parse_mentions(singles.captions[i])
        sh, c, z, p = objects(singles, i)[0]
        assert (m["shape"], m["color"], m["size"], m["position"]) == ([sh], [c], [z], [p]), singles.captions[i]
        caption = singles.captions[i]
        assert caption.startswith(f"a {SIZES[z]} {COLORS[c]} {SHAPES[sh]} ") and caption.endswith(POSITIONS[p])


def test_captions_name_every_object_in_draw_order(scenes):
    for i in range(len(scenes)):
        m = parse_mentions(scenes.captions[i])
        objs = objects(scenes, i)
        assert m["shape"] == [o[0] for o in objs] and m["color"] == [o[1] for o in objs]
        assert m["size"] == [o[2] for o in objs] and m["position"] == [o[3] for o in objs]


def test_paraphrases_differ_from_the_caption_but_name_the_same_attributes(scenes):
    def bag(text):
        m = parse_mentions(text)
        return {a: Counter(m[a]) for a in ("shape", "color", "size", "position")}

    orders = 0
    for i in range(len(scenes)):
        paras = scenes.paraphrases[i] + scenes.heldout_paraphrases[i]
        assert len(scenes.paraphrases[i]) == 4 and len(scenes.heldout_paraphrases[i]) == 2
        assert len(set(paras)) == len(paras)
        truth = bag(scenes.captions[i])
        for p in paras:
            assert p != scenes.captions[i]
            assert bag(p) == truth, (scenes.captions[i], p)
            orders += parse_mentions(p)["color"] != parse_mentions(scenes.captions[i])["color"]
    assert orders > 0  # word order varies


def test_heldout_templates_and_words_never_appear_in_training_text(scenes):
    train_words = set(ShapesWorld.vocabulary(heldout=False))
    markers = ("photo showing", "you can see", "colored", "located")
    for i in range(len(scenes)):
        for t in [scenes.captions[i], *scenes.paraphrases[i], scenes.relations[i]]:
            assert set(t.split()) <= train_words, t
            assert not any(m in t for m in markers)
        for t in scenes.heldout_paraphrases[i]:
            assert any(m in t for m in markers), t
    held_words = {w for i in range(len(scenes)) for t in scenes.heldout_paraphrases[i] for w in t.split()}
    assert held_words - train_words  # unseen words do occur


def test_vocabulary_covers_every_text_and_prompt():
    vocab = set(ShapesWorld.vocabulary())
    s = ShapesWorld(seed=0, describe_background=True).sample(300, seed=3, split="all")
    limit = ShapesWorld(describe_background=True).max_caption_words()
    for i in range(len(s)):
        for t in all_texts(s, i):
            assert set(t.split()) <= vocab, t
            assert t == t.strip().lower() and "  " not in t and len(t.split()) <= limit
            assert re.search(r"\ba [aeiou]", t) is None, t  # "an orange", never "a orange"
        assert s.captions[i].endswith("background")
    for attribute in CLASS_NAMES:
        for row in zero_shot_prompts(attribute):
            for prompt in row:
                assert set(prompt.split()) <= vocab, prompt
    assert ShapesWorld.vocabulary() == sorted(vocab)


def test_vocabulary_builds_the_books_word_tokenizer():
    tokenizers = pytest.importorskip("diffusion_core.models.tokenizers")
    world = ShapesWorld()
    tok = tokenizers.WordTokenizer(world.vocabulary(), context_length=world.max_caption_words() + 2)
    s = world.sample(50, seed=0)
    ids = tok.encode([t for i in range(len(s)) for t in all_texts(s, i)])
    assert (ids != tok.unk_id).all()


def test_relations_follow_the_grid_cells():
    s = ShapesWorld(seed=0, max_objects=2).sample(300, seed=0)
    for i in range(len(s)):
        if s.count[i] == 1:
            assert s.relations[i] == s.captions[i]
            continue
        (r0, q0), (r1, q1) = divmod(s.position[i, 0].item(), 3), divmod(s.position[i, 1].item(), 3)
        rel = s.relations[i]
        assert ("to the left of" in rel) == (q0 < q1) and ("to the right of" in rel) == (q0 > q1)
        assert (" above " in rel) == (r0 < r1) and (" below " in rel) == (r0 > r1)
        assert rel.startswith(f"a {SIZES[s.size[i, 0]]} {COLORS[s.color[i, 0]]} {SHAPES[s.shape[i, 0]]}")


def test_describe_renders_any_template_with_canonical_or_heldout_words(scenes):
    assert scenes.describe("plain", words="canonical") == scenes.captions
    sub = scenes[:50]
    for name in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES):
        texts = sub.describe(name, words="all", seed=1, shuffle=True)
        assert texts == sub.describe(name, words="all", seed=1, shuffle=True)
        for t, c in zip(texts, sub.captions):
            assert sorted(parse_mentions(t)["shape"]) == sorted(parse_mentions(c)["shape"])


def test_zero_shot_prompts_follow_the_class_order():
    for attribute, names in CLASS_NAMES.items():
        prompts = zero_shot_prompts(attribute)
        assert len(prompts) == len(names) and len({len(r) for r in prompts}) == 1
        assert len({tuple(r) for r in prompts}) == len(names)
    assert zero_shot_prompts("color")[COLORS.index("orange")][0] == "an orange shape"
    assert zero_shot_prompts("pair", ["a photo of a {}"])[0] == ["a photo of a red circle"]
    assert zero_shot_prompts("position")[POSITIONS.index("center")][0] == "a shape in the center"


# ---- containers ----------------------------------------------------------------------------------

def test_scenes_index_like_a_batch_and_feed_a_dataloader(scenes):
    sub = scenes[[3, 5]]
    assert len(sub) == 2 and sub.captions == [scenes.captions[3], scenes.captions[5]]
    assert torch.equal(sub.images, scenes.images[[3, 5]])
    assert len(scenes[7]) == 1 and torch.equal(scenes[2:6].edges, scenes.edges[2:6])
    assert len(scenes[scenes.count == 1]) == int((scenes.count == 1).sum())
    loader = torch.utils.data.DataLoader(ShapesDataset(scenes[:10]), batch_size=4)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["caption"] == scenes.captions[:4]
    assert scenes.to("cpu").images.device.type == "cpu"


def test_profiles_pick_the_resolution_and_supersampling_is_the_anti_aliasing():
    from diffusion_core.profiles import Profile

    assert ShapesWorld.for_profile(Profile("gpu", torch.device("cpu"), seed=3)).resolution == 64
    world = ShapesWorld.for_profile(Profile("smoke", torch.device("cpu"), seed=3))
    assert (world.resolution, world.seed) == (32, 3)
    hard = ShapesWorld(supersample=1, device="cpu").sample(8, seed=0)
    assert set(hard.object_masks.unique().tolist()) <= {0.0, 1.0}
    soft = ShapesWorld(supersample=4).sample(8, seed=0)
    levels = set((soft.object_masks * 16).round().unique().tolist())
    assert len(levels) > 2 and torch.allclose(soft.object_masks * 16, (soft.object_masks * 16).round())


def test_a_thousand_scenes_generate():
    s = ShapesWorld(resolution=32, seed=0).sample(1000, seed=0)
    assert len(s) == 1000 and torch.isfinite(s.images).all()


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,words", [
    (dict(resolution=0), ValueError, "resolution"),
    (dict(resolution=-8), ValueError, "resolution"),
    (dict(resolution=30), ValueError, "multiple of 8"),
    (dict(resolution=32.0), TypeError, "resolution"),
    (dict(max_objects=0), ValueError, "max_objects"),
    (dict(max_objects=4), ValueError, "max_objects"),
    (dict(split="test"), ValueError, "split"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(n_paraphrases=9), ValueError, "n_paraphrases"),
    (dict(supersample=9), ValueError, "supersample"),
])
def test_bad_world_arguments_raise_clear_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        ShapesWorld(**kwargs)


def test_bad_sampling_arguments_raise_clear_errors(scenes):
    world = ShapesWorld()
    with pytest.raises(ValueError, match="n must be"):
        world.sample(0)
    with pytest.raises(ValueError, match="seed"):
        world.sample(4, seed=-3)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        world.fixed(4, split="valid")
    with pytest.raises(ValueError, match="batch_size"):
        next(world.batches(0))
    with pytest.raises(ValueError, match="unknown attribute 'texture'"):
        zero_shot_prompts("texture")
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_prompts("color", ["a {} {} shape"])
    with pytest.raises(ValueError, match="unknown template"):
        scenes.describe("haiku")
    with pytest.raises(ValueError, match="word choice"):
        scenes.describe("plain", words="fancy")
    with pytest.raises(ValueError, match="no tensor field"):
        ShapesDataset(scenes, fields=("captions",))
