"""The world of shapes: procedural captioned scenes and their spatial maps.

The text-to-image (ch. 04), CLIP (ch. 05), guidance (ch. 06) and control chapters (07-09) train
on it, and later GLIDE inpainting (ch. 11), unCLIP (ch. 12) and Imagen's paraphrases (ch. 13).

A scene holds 1 to 3 objects on a background. Each object has a shape (6 kinds), a color (8), a
size (2) and a position: one of the 9 cells of a 3x3 grid, distinct for every object of a scene,
so objects never overlap. From the same scene come

* the image ``(B, 3, H, W)`` in [-1, 1], anti-aliased: coverage is computed on a grid
  ``supersample`` times finer and box-averaged (the same as rendering at 4x and downsampling);
* its attributes as integer tensors, ``PAD`` (-1) for absent objects;
* a caption from a small grammar, paraphrases of it (other templates, synonyms, word order) and
  paraphrases from *held-out* templates and words that training never sees (for ch. 13);
* spatial maps: per-object and union masks, a thin edge map on the mask boundaries (like a Canny
  map of the scene), a depth-like map and a coarse color palette (an 8x8 grid of mean colors).

Captions are lowercase words separated by single spaces, with no punctuation, so ``text.split()``
is a complete word-level tokenizer and :meth:`ShapesWorld.vocabulary` lists every word.

Held-out attribute combinations: the (shape, color) pairs in :data:`HELDOUT_PAIRS` (7 of 48, every
shape and every color still seen in training) never appear with ``split="train"``; with
``split="heldout"`` every scene has at least one of them (ch. 05's zero-shot test).

Everything is deterministic from ``(world seed, sample seed)``: random choices come from one
``numpy.random.Generator`` (PCG64, stable across platforms), rendering is plain float32 torch.

Speed (:func:`benchmark`, 1,000 scenes with up to 3 objects, every map and all text included),
measured on the 2-core CPU this book is developed on while other jobs shared it (torch 2.13):
about 4,700 scenes/s at 32x32 and 2,000 scenes/s at 64x64. At 32x32 the text is about half the
time; ``n_paraphrases=0, n_heldout_paraphrases=0`` skips most of it.

>>> world = ShapesWorld(resolution=32, seed=0)
>>> scenes = world.sample(16, seed=1)
>>> scenes.images.shape
torch.Size([16, 3, 32, 32])
>>> scenes.captions[0]
'a small cyan circle at the bottom and a small orange diamond on the right and a small cyan triangle at the bottom right'
>>> scenes.paraphrases[0][0]
'a little diamond in orange at the right and a little circle in cyan near the bottom and a small triangle in cyan in the bottom right corner'
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# The attributes
# --------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # index = 3 * row + col, rows top to bottom
BACKGROUNDS = ("dark", "light", "gradient")
COUNTS = ("one", "two", "three")  # class index = count - 1
SPLITS = ("train", "heldout", "all")
PAD = -1  # attribute value of an absent object
MAX_OBJECTS = 3

# RGB in [0, 1], chosen to stay apart from each other and from every background at 32x32
COLOR_RGB = np.array([
    [0.92, 0.12, 0.12],  # red
    [0.10, 0.78, 0.18],  # green
    [0.20, 0.35, 1.00],  # blue
    [1.00, 0.90, 0.10],  # yellow
    [0.66, 0.22, 0.90],  # purple
    [1.00, 0.55, 0.00],  # orange
    [1.00, 1.00, 1.00],  # white
    [0.10, 0.92, 0.92],  # cyan
], dtype=np.float32)
BACKGROUND_RGB = {  # plain colors; "gradient" runs vertically from its first to its second color
    "dark": ((0.08, 0.08, 0.10), (0.08, 0.08, 0.10)),
    "light": ((0.60, 0.60, 0.60), (0.60, 0.60, 0.60)),
    "gradient": ((0.06, 0.08, 0.22), (0.46, 0.44, 0.40)),
}
# half-extent of an object's bounding box as a fraction of the image side (a cell is 1/3)
SIZE_HALF_EXTENT = (0.11, 0.16)

# (shape, color) pairs never used in training: 7 of 48 (14.6%), each color at most once, every
# shape and every color still seen in training with other partners.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "orange"),
    ("square", "cyan"),
    ("triangle", "blue"),
    ("diamond", "green"),
    ("cross", "yellow"),
    ("ring", "red"),
    ("circle", "purple"),
)
_HELDOUT_IDS = np.array(sorted(SHAPES.index(s) * len(COLORS) + COLORS.index(c) for s, c in HELDOUT_PAIRS))
_TRAIN_IDS = np.setdiff1d(np.arange(len(SHAPES) * len(COLORS)), _HELDOUT_IDS)

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "count": COUNTS,
    "background": BACKGROUNDS,
    # pair index = shape * len(COLORS) + color
    "pair": tuple(f"{c} {s}" for s in SHAPES for c in COLORS),
}


def pair_index(shape: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """(shape, color) -> pair index ``shape * 8 + color`` in [0, 48); ``PAD`` stays ``PAD``."""
    return torch.where(shape == PAD, torch.full_like(shape, PAD), shape * len(COLORS) + color)


def is_heldout_pair(shape: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Bool tensor, same shape as the inputs: is (shape, color) one of :data:`HELDOUT_PAIRS`?"""
    return torch.isin(pair_index(shape, color), torch.from_numpy(_HELDOUT_IDS).to(shape.device))


# --------------------------------------------------------------------------------------------------
# Geometry: each shape is an inside-test on coordinates (u, v) normalised to the object's box
# [-1, 1]^2, v pointing down. Tensors broadcast, so one call fills a whole batch of patches.
# --------------------------------------------------------------------------------------------------

def _inside(kind: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    name = SHAPES[kind]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":  # a little inside the box so its area matches the circle's
        return torch.maximum(u.abs(), v.abs()) <= 0.86
    if name == "triangle":  # apex up at v=-1, base at v=0.8 spanning u in [-1, 1]
        return (v <= 0.8) & (u.abs() <= (v + 1.0) / 1.8)
    if name == "diamond":
        return u.abs() + v.abs() <= 1.0
    if name == "cross":  # a plus sign with arms 0.6 wide
        au, av = u.abs(), v.abs()
        return (torch.minimum(au, av) <= 0.3) & (torch.maximum(au, av) <= 1.0)
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.56**2)
    raise AssertionError(name)


# --------------------------------------------------------------------------------------------------
# Language: canonical words, synonyms used in training, and synonyms only held-out text uses
# --------------------------------------------------------------------------------------------------

_WORDS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    # attribute -> value -> (training phrases, the first canonical; held-out-only phrases)
    "size": {
        "small": (("small", "little"), ("tiny",)),
        "large": (("large", "big"), ("huge",)),
    },
    "color": {
        "red": (("red",), ()),
        "green": (("green",), ()),
        "blue": (("blue",), ()),
        "yellow": (("yellow",), ()),
        "purple": (("purple",), ("violet",)),
        "orange": (("orange",), ()),
        "white": (("white",), ()),
        "cyan": (("cyan",), ("turquoise",)),
    },
    "shape": {
        "circle": (("circle", "ball"), ("disk",)),
        "square": (("square", "box"), ("block",)),
        "triangle": (("triangle",), ("wedge",)),
        "diamond": (("diamond",), ("rhombus",)),
        "cross": (("cross", "plus"), ()),
        "ring": (("ring",), ("donut",)),
    },
    "position": {
        "top left": (("at the top left", "in the top left corner"), ("in the upper left",)),
        "top": (("at the top", "near the top"), ("along the top",)),
        "top right": (("at the top right", "in the top right corner"), ("in the upper right",)),
        "left": (("on the left", "at the left"), ("on the left side",)),
        "center": (("in the center", "in the middle"), ("at the centre",)),
        "right": (("on the right", "at the right"), ("on the right side",)),
        "bottom left": (("at the bottom left", "in the bottom left corner"), ("in the lower left",)),
        "bottom": (("at the bottom", "near the bottom"), ("along the bottom",)),
        "bottom right": (("at the bottom right", "in the bottom right corner"), ("in the lower right",)),
    },
    "background": {
        "dark": (("on a dark background",), ()),
        "light": (("on a light background",), ()),
        "gradient": (("on a gradient background",), ()),
    },
}
_VALUES = {"size": SIZES, "color": COLORS, "shape": SHAPES, "position": POSITIONS, "background": BACKGROUNDS}
WORD_CHOICES = ("canonical", "train", "all")  # which phrases a description may use

# Templates: (prefix, object pattern, joiner). {s} size, {c} color, {h} shape, {p} position phrase.
TRAIN_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "plain": ("", "a {s} {c} {h} {p}", " and "),  # the canonical caption
    "there_is": ("there is ", "a {s} {c} {h} {p}", " and "),
    "picture_of": ("a picture of ", "a {s} {c} {h} {p}", " and "),
    "position_first": ("", "{p} a {s} {c} {h}", " and "),
    "image_with": ("an image with ", "a {s} {c} {h} {p}", " and "),
    "in_color": ("", "a {s} {h} in {c} {p}", " and "),
}
HELDOUT_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "photo_showing": ("a photo showing ", "a {s} {c} {h} {p}", " as well as "),
    "you_can_see": ("you can see ", "a {s} {c} {h} {p}", " and "),
    "colored": ("", "a {s} {h} colored {c} {p}", " along with "),
    "located": ("this scene contains ", "a {s} {c} {h} located {p}", " and "),
}
CANONICAL_TEMPLATE = "plain"

# Zero-shot classification prompts: attribute -> templates; "{}" takes the class phrase.
# The first templates of each list use only words of the training captions; "photo", "shape",
# "object", "something" and the counts appear in prompts only (as "a photo of" did for CLIP).
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("a {}", "a picture of a {}", "there is a {}", "a photo of a {}"),
    "color": ("a {} shape", "a picture of a {} object", "there is something {}", "a photo of a {} shape"),
    "size": ("a {} shape", "a picture of a {} object", "there is a {} object", "a photo of a {} shape"),
    "position": ("a shape {}", "a picture of an object {}", "there is something {}", "a photo of a shape {}"),
    "pair": ("a {}", "a picture of a {}", "there is a {}", "an image with a {}", "a photo of a {}"),
    "count": ("{}", "a picture of {}", "an image with {}", "a photo of {}"),
    "background": ("a shape {}", "a picture of something {}", "a photo of a shape {}"),
}
_PROMPT_PHRASES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": tuple(_WORDS["position"][p][0][0] for p in POSITIONS),
    "pair": CLASS_NAMES["pair"],
    "count": ("one shape", "two shapes", "three shapes"),
    "background": tuple(_WORDS["background"][b][0][0] for b in BACKGROUNDS),
}
_RELATION_WORDS = ("above", "below", "to", "the", "left", "right", "of", "and", "a")

_AN = re.compile(r"\ba (?=[aeiou])")


def _articles(text: str) -> str:
    return _AN.sub("an ", text)


def _phrases(attribute: str, value: int, words: str) -> tuple[str, ...]:
    train, held = _WORDS[attribute][_VALUES[attribute][value]]
    if words == "canonical":
        return train[:1]
    return train + held if words == "all" else train


# words choice -> attribute -> value index -> phrases (looked up once per word of every caption)
_PHRASES = {w: {a: tuple(_phrases(a, i, w) for i in range(len(_VALUES[a]))) for a in _WORDS} for w in WORD_CHOICES}


class _Uniforms:
    """Uniform floats drawn from a numpy Generator in blocks (one call per 4,096 choices, not one
    per word): text generation stays deterministic and cheap."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.buf, self.i = rng, [], 0

    def next(self) -> float:
        if self.i == len(self.buf):
            self.buf, self.i = self.rng.random(4096).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def pick(self, options: Sequence):
        return options[0] if len(options) == 1 else options[int(self.next() * len(options))]

    def permutation(self, n: int) -> list[int]:
        keys = [self.next() for _ in range(n)]
        return sorted(range(n), key=keys.__getitem__)


def zero_shot_prompts(attribute: str, templates: Sequence[str] | None = None) -> list[list[str]]:
    """Prompts for zero-shot classification of ``attribute`` (ch. 05): ``[class][template]``.

    ``attribute`` is one of ``shape, color, size, position, pair, count, background``; the class
    order is :data:`CLASS_NAMES` ``[attribute]``. ``templates`` (strings with one ``{}``) default
    to :data:`PROMPT_TEMPLATES` ``[attribute]``; average the text embeddings over the templates
    for prompt ensembling. ``zero_shot_prompts("color")[0][0] == "a photo of a red shape"``.
    """
    if attribute not in _PROMPT_PHRASES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {tuple(_PROMPT_PHRASES)}")
    templates = PROMPT_TEMPLATES[attribute] if templates is None else tuple(templates)
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"a prompt template needs exactly one '{{}}', got {t!r}")
    return [[_articles(t.format(phrase)) for t in templates] for phrase in _PROMPT_PHRASES[attribute]]


def _phrase_table() -> dict[tuple[str, ...], tuple[str, int]]:
    table: dict[tuple[str, ...], tuple[str, int]] = {}
    for attribute, values in _WORDS.items():
        for name, (train, held) in values.items():
            for phrase in train + held:
                key = tuple(phrase.split())
                value = (attribute, _VALUES[attribute].index(name))
                if table.get(key, value) != value:
                    raise AssertionError(f"ambiguous phrase {phrase!r}")
                table[key] = value
    return table


_TABLE = _phrase_table()
_LONGEST = max(len(k) for k in _TABLE)


def parse_mentions(text: str) -> dict[str, list[int]]:
    """The attribute values a caption mentions, in order: ``{"shape": [0, 1], "color": [...], ...}``.

    Reads every phrase of every template, training or held-out (longest match first), so it
    checks that a caption or paraphrase names the scene's attributes. Relations ("to the left
    of") are not read.
    """
    tokens = text.lower().split()
    found: dict[str, list[int]] = {a: [] for a in _WORDS}
    i = 0
    while i < len(tokens):
        for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
            hit = _TABLE.get(tuple(tokens[i:i + n]))
            if hit is not None:
                found[hit[0]].append(hit[1])
                i += n
                break
        else:
            i += 1
    return found


def _describe_one(objs: list[tuple[int, int, int, int]], background: int | None, template: tuple[str, str, str],
                  words: str, uniforms: _Uniforms | None) -> str:
    """One description: ``objs`` as (shape, color, size, position) tuples in the order named.
    ``uniforms=None`` takes the first (canonical) phrase of every value."""
    prefix, pattern, joiner = template
    table = _PHRASES[words]
    pick = (lambda options: options[0]) if uniforms is None else uniforms.pick
    parts = [pattern.format(s=pick(table["size"][sz]), c=pick(table["color"][c]), h=pick(table["shape"][sh]),
                            p=pick(table["position"][pos]))
             for sh, c, sz, pos in objs]
    text = prefix + joiner.join(parts)
    if background is not None:
        text += " " + pick(table["background"][background])
    return text


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------

@dataclass
class Scenes:
    """A batch of B scenes with up to K objects (K = the world's ``max_objects``).

    Tensors (on the world's ``device``, CPU by default; move them with :meth:`to`):

    * ``images`` (B, 3, H, W) float in [-1, 1].
    * ``shape``, ``color``, ``size``, ``position`` (B, K) int64: indices into :data:`SHAPES`,
      :data:`COLORS`, :data:`SIZES`, :data:`POSITIONS`; ``PAD`` (-1) for absent objects. Object k
      is drawn k-th and named k-th in the caption.
    * ``count`` (B,) int64 in 1..K; ``background`` (B,) int64 index into :data:`BACKGROUNDS`.
    * ``centers`` (B, K, 2) float (x, y) in [0, 1] image units, y down; ``PAD`` where absent.
    * ``object_masks`` (B, K, H, W) float coverage in [0, 1]; ``mask`` (B, 1, H, W) their union.
    * ``edges`` (B, 1, H, W) float in {0, 1}: object pixels (coverage >= 0.5) with a 4-neighbour
      of another label (background, or the hole of a ring): one-pixel-thin inner boundaries.
    * ``depth`` (B, 1, H, W) float in [0, 1], larger is nearer: the background is a ground plane
      (0 at the top row to 0.3 at the bottom), each object a flat card at
      ``0.55 + 0.25 * size + 0.2 * center_y`` (big and low objects are nearer), blended by coverage.
    * ``palette`` (B, 3, H, W) float in [-1, 1]: the image averaged over an 8x8 grid of blocks and
      upsampled back (nearest), T2I-Adapter's color condition.

    Text (lists of B): ``captions`` (canonical template and words), ``paraphrases`` (B lists of
    ``n_paraphrases`` other training templates with synonyms and shuffled object order; each
    differs from the caption), ``heldout_paraphrases`` (templates and words training never uses),
    ``relations`` (the first two objects' spatial relation, "a large red circle to the left of a
    small blue square"; the caption itself for one-object scenes).
    """

    images: torch.Tensor
    shape: torch.Tensor
    color: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    count: torch.Tensor
    background: torch.Tensor
    centers: torch.Tensor
    object_masks: torch.Tensor
    mask: torch.Tensor
    edges: torch.Tensor
    depth: torch.Tensor
    palette: torch.Tensor
    captions: list[str]
    paraphrases: list[list[str]]
    heldout_paraphrases: list[list[str]]
    relations: list[str]
    split: str = "train"

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def pair(self) -> torch.Tensor:
        """(B, K) int64 (shape, color) pair index ``shape * 8 + color`` in [0, 48), ``PAD`` where absent."""
        return pair_index(self.shape, self.color)

    @property
    def heldout(self) -> torch.Tensor:
        """(B, K) bool: is the object's (shape, color) one of :data:`HELDOUT_PAIRS`?"""
        return is_heldout_pair(self.shape, self.color)

    @property
    def present(self) -> torch.Tensor:
        """(B, K) bool: does object slot k exist?"""
        return self.shape != PAD

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> Scenes:
        """A sub-batch (an int keeps the batch dimension: ``scenes[3]`` has length 1)."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            idx = torch.as_tensor(index)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            rows = idx.tolist()
        t = torch.as_tensor(rows, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[t.to(value.device)]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in rows]
        return replace(self, **out)

    def to(self, device: torch.device | str) -> Scenes:
        """The same scenes with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def describe(self, template: str, words: str = "train", seed: int = 0,
                 shuffle: bool = False, background: bool = False) -> list[str]:
        """Describe every scene with one named template (from :data:`TRAIN_TEMPLATES` or
        :data:`HELDOUT_TEMPLATES`). ``words``: ``"canonical"`` (first phrase of each value),
        ``"train"`` (training synonyms, chosen at random) or ``"all"`` (held-out synonyms too).
        ``shuffle`` randomises object order; ``background`` appends "on a dark background" etc.
        Deterministic for a ``seed``."""
        templates = {**TRAIN_TEMPLATES, **HELDOUT_TEMPLATES}
        if template not in templates:
            raise ValueError(f"unknown template {template!r}; expected one of {tuple(templates)}")
        if words not in WORD_CHOICES:
            raise ValueError(f"unknown word choice {words!r}; expected one of {WORD_CHOICES}")
        uniforms = _Uniforms(np.random.default_rng([_check_int("seed", seed, 0), 7]))
        out = []
        for objs, bg in zip(_objects(self), self.background.tolist()):
            if shuffle:
                objs = [objs[i] for i in uniforms.permutation(len(objs))]
            out.append(_describe_one(objs, bg if background else None, templates[template],
                                     words, None if words == "canonical" else uniforms))
        return out


def _objects(scenes: Scenes) -> list[list[tuple[int, int, int, int]]]:
    """Per scene, the present objects as (shape, color, size, position) tuples in draw order."""
    attrs = torch.stack([scenes.shape, scenes.color, scenes.size, scenes.position], -1).cpu().tolist()
    return [[tuple(o) for o in row if o[0] != PAD] for row in attrs]


class ShapesDataset(torch.utils.data.Dataset):
    """A fixed set of :class:`Scenes` as a map-style ``Dataset`` for a ``DataLoader``.

    Each item is a dict of the per-scene tensors (without the batch dimension) and its
    ``caption``; ``fields`` chooses which tensors (default: image, mask, edges, depth, palette
    and the attributes)."""

    DEFAULT_FIELDS = ("images", "mask", "edges", "depth", "palette", "shape", "color", "size",
                      "position", "count", "background")

    def __init__(self, scenes: Scenes, fields: Sequence[str] = DEFAULT_FIELDS) -> None:
        for name in fields:
            if not isinstance(getattr(scenes, name, None), torch.Tensor):
                raise ValueError(f"Scenes has no tensor field {name!r}")
        self.scenes, self.fields = scenes, tuple(fields)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        item = {name: getattr(self.scenes, name)[i] for name in self.fields}
        item["caption"] = self.scenes.captions[i]
        return item


# --------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------

_TAG_SAMPLE, _TAG_BATCHES, _TAG_FIXED, _TAG_STREAM = 0, 1, 2, 3


def edges_from_labels(label: torch.Tensor) -> torch.Tensor:
    """The world's edge rule: ``(B, H, W)`` integer or bool labels (0 background, k > 0 object k)
    -> ``(B, 1, H, W)`` float32 edges in {0, 1}: object pixels whose 4-neighbourhood holds another
    label, borders replicated (an object touching the image border has no edge along it).

    :class:`ShapesWorld` makes ``Scenes.edges`` with it; :mod:`diffusion_core.evaluate.control`
    applies it to a sample's own segmentation."""
    if not isinstance(label, torch.Tensor) or label.ndim != 3 or label.is_floating_point() or label.is_complex():
        got = f"shape {tuple(label.shape)}, dtype {label.dtype}" if isinstance(label, torch.Tensor) else type(label).__name__
        raise ValueError(f"label must be a (B, H, W) integer or bool tensor, got {got}")
    if label.dtype == torch.bool:
        label = label.to(torch.uint8)
    lab = torch.cat([label[:, :1], label, label[:, -1:]], 1)
    lab = torch.cat([lab[:, :, :1], lab, lab[:, :, -1:]], 2)
    centre = lab[:, 1:-1, 1:-1]
    differs = ((lab[:, :-2, 1:-1] != centre) | (lab[:, 2:, 1:-1] != centre)
               | (lab[:, 1:-1, :-2] != centre) | (lab[:, 1:-1, 2:] != centre))
    return (differs & (centre > 0)).float()[:, None]


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


class ShapesWorld:
    """An infinite, seeded world of captioned scenes of 1 to ``max_objects`` shapes.

    ``resolution``: image side H = W, a positive multiple of 8 (the palette is an 8x8 grid);
    32 for the ``smoke`` and ``cpu`` profiles, 64 for ``gpu`` (see :meth:`for_profile`).
    ``max_objects``: 1 to 3 (1 gives single-object scenes for classification-style tests).
    ``split``: ``"train"`` (no held-out (shape, color) pair), ``"heldout"`` (every scene has at
    least one), ``"all"`` (any pair). ``n_paraphrases``: training paraphrases per scene (0 to 5),
    ``n_heldout_paraphrases``: held-out paraphrases per scene (0 to 4). ``describe_background``:
    captions end with "on a dark background" and so on. ``supersample``: anti-aliasing factor,
    1 to 8 (subpixels per pixel side). ``device``: where the tensors are rendered and returned
    ("cuda" renders on the GPU; the random choices and the text are the same on every device).
    """

    class_names = CLASS_NAMES

    def __init__(self, resolution: int = 32, seed: int = 0, max_objects: int = 3, split: str = "train",
                 n_paraphrases: int = 4, n_heldout_paraphrases: int = 2, describe_background: bool = False,
                 supersample: int = 4, device: torch.device | str = "cpu") -> None:
        self.resolution = _check_int("resolution", resolution, 1)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (the palette is an 8x8 grid), "
                             f"got {resolution}")
        self.seed = _check_int("seed", seed, 0)
        self.max_objects = _check_int("max_objects", max_objects, 1, MAX_OBJECTS)
        self.split = self._check_split(split)
        self.n_paraphrases = _check_int("n_paraphrases", n_paraphrases, 0, len(TRAIN_TEMPLATES) - 1)
        self.n_heldout_paraphrases = _check_int("n_heldout_paraphrases", n_heldout_paraphrases, 0,
                                                len(HELDOUT_TEMPLATES))
        self.describe_background = bool(describe_background)
        self.supersample = _check_int("supersample", supersample, 1, 8)
        self.device = torch.device(device)
        self._stream = 0  # counter for sample(seed=None)

    @classmethod
    def for_profile(cls, profile, **kwargs) -> ShapesWorld:
        """The world at the profile's resolution: 32 for smoke and cpu, 64 for gpu."""
        kwargs.setdefault("resolution", profile.pick(smoke=32, cpu=32, gpu=64))
        kwargs.setdefault("seed", profile.seed)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return (f"ShapesWorld(resolution={self.resolution}, seed={self.seed}, max_objects={self.max_objects}, "
                f"split={self.split!r})")

    @staticmethod
    def _check_split(split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return split

    # ---- vocabulary -----------------------------------------------------------------------------

    @staticmethod
    def vocabulary(heldout: bool = True) -> list[str]:
        """Every word a text of this world can contain, sorted: the word list of a word-level
        tokenizer (captions are lowercase words and single spaces, so ``text.split()`` tokenizes).

        ``heldout=True``: captions, training and held-out paraphrases, relations, background
        phrases and zero-shot prompts. ``heldout=False``: only the words training text uses
        (captions, training paraphrases, relations, background phrases), for a from-scratch
        encoder that must meet held-out words as unknown (ch. 13)."""
        words: set[str] = set(_RELATION_WORDS)
        templates = dict(TRAIN_TEMPLATES, **(HELDOUT_TEMPLATES if heldout else {}))
        for values in _WORDS.values():
            for train, held in values.values():
                for phrase in train + (held if heldout else ()):
                    words.update(phrase.split())
        for prefix, pattern, joiner in templates.values():
            words.update(re.sub(r"\{.\}", " ", prefix + pattern + joiner).split())
        if heldout:
            for attribute in _PROMPT_PHRASES:
                for row in zero_shot_prompts(attribute):
                    for prompt in row:
                        words.update(prompt.split())
        return sorted(words)

    def max_caption_words(self) -> int:
        """The most words any caption, paraphrase or relation of this world can have (with its
        ``max_objects`` and ``describe_background``): a tokenizer's context length is this plus
        its start and end tokens."""
        longest = {a: max(len(p.split()) for train, held in v.values() for p in train + held)
                   for a, v in _WORDS.items()}
        slots = {"{s}": "size", "{c}": "color", "{h}": "shape", "{p}": "position"}
        K, best = self.max_objects, 0
        for prefix, pattern, joiner in itertools.chain(TRAIN_TEMPLATES.values(), HELDOUT_TEMPLATES.values()):
            per_object = len(re.sub(r"\{.\}", " ", pattern).split())
            per_object += sum(longest[a] for slot, a in slots.items() if slot in pattern)
            words = len(prefix.split()) + K * per_object + (K - 1) * len(joiner.split())
            best = max(best, words + (longest["background"] if self.describe_background else 0))
        relation = 2 * 4 + len("above and to the right of".split())
        return max(best, relation)

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self, n: int, seed: int | None = None, split: str | None = None) -> Scenes:
        """``n`` new scenes. The same ``seed`` (with the same world settings) gives the same
        scenes; ``seed=None`` continues the world's own stream (new scenes on every call)."""
        n = _check_int("n", n, 1)
        if seed is None:
            entropy = [self.seed, _TAG_STREAM, self._stream]
            self._stream += 1
        else:
            entropy = [self.seed, _TAG_SAMPLE, _check_int("seed", seed, 0)]
        return self._generate(n, np.random.default_rng(entropy), self._check_split(split or self.split))

    def fixed(self, n: int, seed: int = 0, split: str | None = None) -> Scenes:
        """An evaluation set: ``n`` scenes, fixed by ``seed`` and ``split`` (default: the world's),
        drawn from a stream separate from :meth:`sample` and :meth:`batches`."""
        n = _check_int("n", n, 1)
        split = self._check_split(split or self.split)
        entropy = [self.seed, _TAG_FIXED, _check_int("seed", seed, 0), SPLITS.index(split)]
        return self._generate(n, np.random.default_rng(entropy), split)

    def batches(self, batch_size: int, seed: int = 0, split: str | None = None) -> Iterator[Scenes]:
        """An infinite, deterministic stream of batches of new scenes for a training loop:
        ``for step, scenes in zip(range(steps), world.batches(64)): ...``"""
        batch_size = _check_int("batch_size", batch_size, 1)
        seed = _check_int("seed", seed, 0)
        split = self._check_split(split or self.split)
        for step in itertools.count():
            rng = np.random.default_rng([self.seed, _TAG_BATCHES, seed, step])
            yield self._generate(batch_size, rng, split)

    # ---- the generator --------------------------------------------------------------------------

    def _attributes(self, n: int, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        K = self.max_objects
        count = rng.integers(1, K + 1, size=n)
        position = np.argsort(rng.random((n, len(POSITIONS))), axis=1)[:, :K]
        size = rng.integers(0, len(SIZES), size=(n, K))
        if split == "train":
            pair = _TRAIN_IDS[rng.integers(0, len(_TRAIN_IDS), size=(n, K))]
        else:
            pair = rng.integers(0, len(SHAPES) * len(COLORS), size=(n, K))
            if split == "heldout":  # one present object per scene gets a held-out pair
                slot = (rng.random(n) * count).astype(np.int64)
                pair[np.arange(n), slot] = _HELDOUT_IDS[rng.integers(0, len(_HELDOUT_IDS), size=n)]
        background = rng.integers(0, len(BACKGROUNDS), size=n)
        # centre of the cell plus a jitter that keeps the object inside its cell
        half = np.asarray(SIZE_HALF_EXTENT)[size]
        room = np.clip(1 / 6 - half, 0, None) * 0.95
        cell = np.stack([position % 3, position // 3], -1)  # (x col, y row)
        centers = (cell + 0.5) / 3 + rng.uniform(-1, 1, size=(n, K, 2)) * room[..., None]
        absent = np.arange(K)[None] >= count[:, None]
        out = {"shape": pair // len(COLORS), "color": pair % len(COLORS), "size": size, "position": position}
        for key in out:
            out[key] = np.where(absent, PAD, out[key]).astype(np.int64)
        out["centers"] = np.where(absent[..., None], PAD, centers).astype(np.float32)
        out["count"], out["background"] = count.astype(np.int64), background.astype(np.int64)
        out["half"] = half.astype(np.float32)
        return out

    def _coverage(self, a: dict[str, torch.Tensor]) -> torch.Tensor:
        """Anti-aliased coverage (B, K, R, R) in [0, 1] of every object, rendered only inside a
        fixed-size patch around it: the patch is supersampled, box-averaged, then pasted."""
        R, ss, K, dev = self.resolution, self.supersample, self.max_objects, self.device
        B = a["count"].shape[0]
        P = min(R, int(np.ceil(2 * max(SIZE_HALF_EXTENT) * R)) + 2)  # patch side in pixels
        sub = (torch.arange(P * ss, dtype=torch.float32, device=dev) + 0.5) / ss  # subpixel centres
        out = torch.zeros(B, K, R, R, device=dev)
        shape, centers, half = a["shape"], a["centers"] * R, a["half"] * R  # lengths in pixels
        b_all, ar = torch.arange(B, device=dev)[:, None, None], torch.arange(P, device=dev)
        for k in range(K):
            kinds = shape[:, k].tolist()
            if all(kind == PAD for kind in kinds):
                continue
            origin = torch.floor(centers[:, k] - P / 2).clamp(0, R - P)  # (B, 2) top-left pixel
            u = (origin[:, 0:1] + sub - centers[:, k, 0:1]) / half[:, k:k + 1]  # (B, P*ss)
            v = (origin[:, 1:2] + sub - centers[:, k, 1:2]) / half[:, k:k + 1]
            inside = torch.zeros(B, P * ss, P * ss, dtype=torch.bool, device=dev)
            for kind in set(kinds) - {PAD}:
                rows = torch.tensor([b for b, x in enumerate(kinds) if x == kind], device=dev)
                inside[rows] = _inside(kind, u[rows, None, :], v[rows, :, None])
            # box filter: count the ss x ss subpixels of each pixel (uint8 sums: ss <= 8)
            count = inside.view(torch.uint8).reshape(B, P * ss, P, ss).sum(3, dtype=torch.uint8)
            count = count.reshape(B, P, ss, P).sum(2, dtype=torch.uint8)
            ox, oy = origin.long().unbind(1)
            out[b_all, k, (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]] = count.float() / ss**2
        return out

    def _generate(self, n: int, rng: np.random.Generator, split: str) -> Scenes:
        if self.device.type != "cpu":
            return self._render(n, rng, split)
        # One CPU thread: the ops are small and memory-bound, and on a busy 2-core machine two
        # threads spent their time waiting for each other (64 scenes: 1 s with two, 18 ms with one).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._render(n, rng, split)
        finally:
            torch.set_num_threads(threads)

    def _render(self, n: int, rng: np.random.Generator, split: str) -> Scenes:
        R, K, dev = self.resolution, self.max_objects, self.device
        a = {k: torch.from_numpy(v).to(dev) for k, v in self._attributes(n, rng, split).items()}
        cov = self._coverage(a)  # (B, K, R, R)
        y = (torch.arange(R, dtype=torch.float32, device=dev) + 0.5) / R  # row centres in [0, 1]
        bg = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=torch.float32, device=dev)
        top, bottom = bg[a["background"], 0], bg[a["background"], 1]  # (B, 3)
        ground = (top[:, :, None] + (bottom - top)[:, :, None] * y)[..., None]  # (B, 3, R, 1)
        color = torch.from_numpy(COLOR_RGB).to(dev)[a["color"].clamp(min=0)]  # (B, K, 3)
        card = 0.55 + 0.25 * a["size"].clamp(min=0) / (len(SIZES) - 1) + 0.2 * a["centers"][..., 1]  # (B, K)
        # Objects sit in distinct cells and never overlap (not even one subpixel), so compositing
        # "object over background" is a sum: x = bg * (1 - mask) + sum_k coverage_k * color_k.
        mask = cov.sum(1, keepdim=True).clamp_(0, 1)  # (B, 1, R, R)
        background = 1 - mask
        images = background * ground
        depth = background * (0.3 * y)[:, None]
        label = torch.zeros(n, R, R, dtype=torch.uint8, device=dev)
        for k in range(K):
            ck = cov[:, k:k + 1]
            images.addcmul_(ck, color[:, k, :, None, None])
            depth.addcmul_(ck, card[:, k, None, None, None])
            label.masked_fill_(cov[:, k] >= 0.5, k + 1)  # 0 background, k + 1 object k
        images = images.mul_(2).sub_(1).clamp_(-1, 1)
        depth = depth.clamp_(0, 1)
        edges = edges_from_labels(label)
        block = R // 8  # palette: mean color of each block of an 8x8 grid, repeated over the block
        pooled = F.avg_pool2d(images, block)  # (B, 3, 8, 8)
        palette = pooled[:, :, :, None, :, None].expand(n, 3, 8, block, 8, block).reshape(n, 3, R, R)
        scenes = Scenes(
            images=images, shape=a["shape"], color=a["color"], size=a["size"], position=a["position"],
            count=a["count"], background=a["background"], centers=a["centers"],
            object_masks=cov, mask=mask, edges=edges, depth=depth, palette=palette,
            captions=[], paraphrases=[], heldout_paraphrases=[], relations=[], split=split,
        )
        self._text(scenes, rng)
        return scenes

    def _text(self, scenes: Scenes, rng: np.random.Generator) -> None:
        train_names = [t for t in TRAIN_TEMPLATES if t != CANONICAL_TEMPLATE]
        held_names = list(HELDOUT_TEMPLATES)
        canonical = TRAIN_TEMPLATES[CANONICAL_TEMPLATE]
        uniforms = _Uniforms(rng)
        for objs, bg in zip(_objects(scenes), scenes.background.tolist()):
            bgv = bg if self.describe_background else None
            caption = _describe_one(objs, bgv, canonical, "canonical", None)
            paras = []  # distinct non-canonical templates, objects in a random order, synonyms
            for t in uniforms.permutation(len(train_names))[:self.n_paraphrases]:
                order = uniforms.permutation(len(objs))
                paras.append(_describe_one([objs[i] for i in order], bgv, TRAIN_TEMPLATES[train_names[t]],
                                           "train", uniforms))
            held = []
            for t in uniforms.permutation(len(held_names))[:self.n_heldout_paraphrases]:
                order = uniforms.permutation(len(objs))
                held.append(_describe_one([objs[i] for i in order], bgv, HELDOUT_TEMPLATES[held_names[t]],
                                          "all", uniforms))
            scenes.captions.append(caption)
            scenes.paraphrases.append(paras)
            scenes.heldout_paraphrases.append(held)
            scenes.relations.append(_relation(objs) if len(objs) > 1 else caption)


def _relation(objs: list[tuple[int, int, int, int]]) -> str:
    """'a large red circle to the left of a small blue square' for the first two objects, from
    their grid cells (diagonal neighbours: 'above and to the left of')."""
    (s0, c0, z0, p0), (s1, c1, z1, p1) = objs[0], objs[1]
    r0, q0, r1, q1 = p0 // 3, p0 % 3, p1 // 3, p1 % 3
    parts = []
    if r0 != r1:
        parts.append("above" if r0 < r1 else "below")
    if q0 != q1:
        parts.append("to the left of" if q0 < q1 else "to the right of")
    rel = " and ".join(parts)
    a = f"a {SIZES[z0]} {COLORS[c0]} {SHAPES[s0]}"
    b = f"a {SIZES[z1]} {COLORS[c1]} {SHAPES[s1]}"
    return _articles(f"{a} {rel} {b}")
