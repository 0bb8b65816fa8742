"""The world of faces: procedural faces with identities, nuisances and five landmarks (ch. 10, InstantID).

A face is drawn from two parameter vectors:

* its **identity**, fixed per identity index by the world seed: face half-width and half-height,
  chin taper, skin colour, hair colour, hair style (:data:`HAIR_STYLES`) and hairline, eye
  spacing, height, size and colour, nose length and width, mouth width and height;
* the **nuisances**, drawn afresh for every image: pose (:data:`POSES`, a yaw that shifts the inner
  features sideways, the nose tip most), tilt (:data:`TILTS`, an in-plane rotation), scale and a
  small translation, expression (:data:`EXPRESSIONS`: the mouth's curvature), lighting
  (:data:`LIGHTINGS`: a brightness factor on the face) and the background colour (:data:`BACKGROUNDS`).

Discrete nuisances (pose, tilt, expression, lighting, background) carry a small continuous jitter,
so every caption is exactly true of its image. Captions are lowercase words and single spaces:
"a smiling face turned left tilted right in dim light on a blue background" (tilt and lighting are
named only when not upright / not normal).

The face is rendered in its own frame ``(u, v)`` (image half-side units, v pointing down, the face
centred at the origin) and mapped to the image by the similarity transform of the nuisances: for a
point of the face frame, ``X = tx + scale * (cos r * u - sin r * v)``, ``Y = ty + scale * (sin r * u
+ cos r * v)`` in [-1, 1] image units, ``r`` the roll in radians (positive = clockwise on screen, the
top of the head toward the right: "tilted right"). "Turned left" means the face looks toward the
image's left (its features shift to smaller x).

Landmarks ``(B, 5, 2)`` are ``(x, y)`` pixel coordinates (0 at the image's left/top edge, the
centre of pixel ``(i, j)`` at ``(j + 0.5, i + 0.5)``) in the order of :data:`LANDMARKS`: the eye on
the image's left, the eye on the image's right (at zero tilt), the nose tip, the left and right
mouth corners. They go through the same transform as the pixels, so they follow rotation and scale.

Identities ``0 .. n_identities - 1``; the last ``round(heldout_fraction * n_identities)`` are held
out: ``split="train"`` never draws them, ``split="heldout"`` draws only them. Identity ``i``'s
parameters depend only on ``(world seed, i)``, not on ``n_identities``.

Images ``(B, 3, H, W)`` in [-1, 1] are anti-aliased: every pixel is the average of ``supersample``
x ``supersample`` subpixels, each coloured by a painter's-order label map. Everything is
deterministic from ``(world seed, sample seed)`` (numpy PCG64 for the random choices, float32 torch
for rendering).

Speed (:func:`benchmark`, 1,000 faces, captions and landmarks included), measured on the book's
2-core CPU while another job shared it (torch 2.13, one thread): about 1,100 faces/s at 32x32 with
the default ``supersample=4``, 4,400/s with ``supersample=2``, and 300/s at 64x64.

>>> world = FaceWorld(resolution=32, seed=0)
>>> faces = world.sample(8, seed=1)
>>> faces.images.shape, faces.landmarks.shape
(torch.Size([8, 3, 32, 32]), torch.Size([8, 5, 2]))
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Names and palettes
# --------------------------------------------------------------------------------------------------

POSES = ("turned left", "facing forward", "turned right")
TILTS = ("tilted left", "upright", "tilted right")
EXPRESSIONS = ("neutral", "smiling")
LIGHTINGS = ("dim", "normal", "bright")
BACKGROUNDS = ("blue", "green", "gray", "pink", "yellow", "purple", "teal", "red")
HAIR_STYLES = ("bald", "short", "fringe", "long")
SKIN_TONES = ("pale", "light", "tan", "olive", "brown", "dark")
HAIR_COLORS = ("black", "dark brown", "brown", "blond", "red", "gray")
EYE_COLORS = ("brown", "blue", "green", "gray", "dark")
LANDMARKS = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")
SPLITS = ("train", "heldout", "all")

SKIN_RGB = np.array([[0.98, 0.86, 0.76], [0.93, 0.76, 0.60], [0.82, 0.62, 0.45],
                     [0.70, 0.55, 0.36], [0.52, 0.34, 0.22], [0.34, 0.22, 0.15]], dtype=np.float32)
HAIR_RGB = np.array([[0.07, 0.06, 0.06], [0.24, 0.14, 0.07], [0.46, 0.29, 0.12],
                     [0.92, 0.80, 0.42], [0.74, 0.26, 0.08], [0.72, 0.72, 0.74]], dtype=np.float32)
EYE_RGB = np.array([[0.40, 0.22, 0.08], [0.20, 0.45, 0.90], [0.18, 0.62, 0.30],
                    [0.52, 0.58, 0.64], [0.06, 0.05, 0.05]], dtype=np.float32)
BACKGROUND_RGB = np.array([[0.22, 0.36, 0.80], [0.20, 0.62, 0.28], [0.50, 0.50, 0.50], [0.95, 0.58, 0.78],
                           [0.95, 0.88, 0.25], [0.50, 0.25, 0.70], [0.10, 0.60, 0.60], [0.80, 0.15, 0.15]],
                          dtype=np.float32)
LIP_RGB = np.array([0.70, 0.18, 0.24], dtype=np.float32)
EYE_WHITE = (0.96, 0.96, 0.96)

# nuisance levels: value per class, and the jitter drawn around it
YAW = (-1.0, 0.0, 1.0)
ROLL_DEGREES = (-18.0, 0.0, 18.0)
BRIGHTNESS = (0.68, 1.0, 1.25)
# how far (face units, per unit of yaw) each inner feature shifts when the face turns
YAW_SHIFT_EYES, YAW_SHIFT_NOSE, YAW_SHIFT_MOUTH = 0.13, 0.24, 0.12

# label map values (painter's order; a later layer covers an earlier one)
_BG, _SKIN, _HAIR, _WHITE, _IRIS, _SHADE, _LIP = range(7)
_N_LABELS = 7

_TAG_IDENTITY, _TAG_SAMPLE, _TAG_BATCHES, _TAG_STREAM = 10, 11, 12, 13


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------

IDENTITY_PARAMETERS = ("half_width", "half_height", "taper", "skin", "hair_color", "hair_style", "hairline",
                       "eye_spacing", "eye_height", "eye_size", "eye_color", "nose_length", "nose_width",
                       "mouth_width", "mouth_height")


def identity_parameters(seed: int, identity: int) -> dict[str, float]:
    """The parameter vector of one identity, from ``(world seed, identity)`` only (face units: the
    image half-side is 1 at scale 1). Discrete ones (``skin``, ``hair_color``, ``hair_style``,
    ``eye_color``) are indices into :data:`SKIN_TONES`, :data:`HAIR_COLORS`, :data:`HAIR_STYLES`,
    :data:`EYE_COLORS`."""
    r = np.random.default_rng([seed, _TAG_IDENTITY, identity])
    u = r.random(15)
    half_width = 0.46 + 0.16 * u[0]
    half_height = 0.60 + 0.16 * u[1]
    return {
        "half_width": half_width, "half_height": half_height, "taper": 0.35 * u[2],
        "skin": int(u[3] * len(SKIN_TONES)), "hair_color": int(u[4] * len(HAIR_COLORS)),
        "hair_style": int(u[5] * len(HAIR_STYLES)), "hairline": -half_height * (0.40 + 0.22 * u[6]),
        "eye_spacing": half_width * (0.36 + 0.18 * u[7]), "eye_height": -0.20 + 0.14 * u[8],
        "eye_size": 0.065 + 0.04 * u[9], "eye_color": int(u[10] * len(EYE_COLORS)),
        "nose_length": 0.14 + 0.16 * u[11], "nose_width": 0.05 + 0.05 * u[12],
        "mouth_width": 0.14 + 0.14 * u[13], "mouth_height": 0.34 + 0.12 * u[14],
    }


# --------------------------------------------------------------------------------------------------
# A batch of faces
# --------------------------------------------------------------------------------------------------

@dataclass
class Faces:
    """A batch of B faces (tensors on the world's device; move them with :meth:`to`).

    * ``images`` (B, 3, H, W) float in [-1, 1].
    * ``identity`` (B,) int64 identity index.
    * ``landmarks`` (B, 5, 2) float ``(x, y)`` pixel coordinates, in the order of :data:`LANDMARKS`.
    * ``pose``, ``tilt``, ``expression``, ``lighting``, ``background`` (B,) int64 indices into
      :data:`POSES`, :data:`TILTS`, :data:`EXPRESSIONS`, :data:`LIGHTINGS`, :data:`BACKGROUNDS`.
    * ``yaw`` (B,) float in about [-1.1, 1.1]; ``roll`` (B,) float degrees (positive clockwise);
      ``scale`` (B,) float; ``center`` (B, 2) float pixel coordinates of the face-frame origin;
      ``smile`` (B,) float mouth curvature (how far the corners rise, face units);
      ``brightness`` (B,) float factor on the face's colours.
    * ``captions``: B strings naming the nuisances (never the identity).
    """

    images: torch.Tensor
    identity: torch.Tensor
    landmarks: torch.Tensor
    pose: torch.Tensor
    tilt: torch.Tensor
    expression: torch.Tensor
    lighting: torch.Tensor
    background: torch.Tensor
    yaw: torch.Tensor
    roll: torch.Tensor
    scale: torch.Tensor
    center: torch.Tensor
    smile: torch.Tensor
    brightness: torch.Tensor
    captions: list[str]
    split: str = "train"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> Faces:
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        if isinstance(index, slice):
            picks = list(range(len(self)))[index]
        else:
            picks = torch.as_tensor(index).flatten().tolist()
        rows = torch.as_tensor(picks, dtype=torch.long, device=self.images.device)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[rows]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in picks]
            else:
                out[f.name] = v
        return Faces(**out)

    def to(self, device: torch.device | str) -> Faces:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def caption(pose: int, tilt: int, expression: int, lighting: int, background: int) -> str:
    """The caption of one face's nuisances: ``caption(0, 2, 1, 0, 0) ==
    'a smiling face turned left tilted right in dim light on a blue background'``."""
    words = ["a", EXPRESSIONS[expression], "face", POSES[pose]]
    if TILTS[tilt] != "upright":
        words.append(TILTS[tilt])
    if LIGHTINGS[lighting] != "normal":
        words += ["in", LIGHTINGS[lighting], "light"]
    words += ["on", "a", BACKGROUNDS[background], "background"]
    return " ".join(words)


def landmark_map(landmarks: torch.Tensor, resolution: int, radius: float | None = None) -> torch.Tensor:
    """The five landmarks drawn as an image, InstantID's IdentityNet input.

    ``landmarks`` (B, 5, 2) ``(x, y)`` pixel coordinates -> (B, 3, R, R) float in [0, 1]: a black
    image with an anti-aliased disk of ``radius`` pixels (default ``resolution / 32``, at least 1)
    per landmark, each in its own colour (eyes red and green, nose blue, mouth corners yellow and
    magenta; where disks overlap the brighter wins). Points outside the image simply do not show.
    """
    if not isinstance(landmarks, torch.Tensor) or landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
        shape = tuple(landmarks.shape) if isinstance(landmarks, torch.Tensor) else type(landmarks).__name__
        raise ValueError(f"landmarks must be a (B, 5, 2) tensor of (x, y) pixel coordinates, got {shape}")
    resolution = _check_int("resolution", resolution, 1)
    radius = max(1.0, resolution / 32) if radius is None else float(radius)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    dev = landmarks.device
    colors = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0.4, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.float32, device=dev)
    c = torch.arange(resolution, dtype=torch.float32, device=dev) + 0.5
    pts = landmarks.float()
    dx = c[None, None, None, :] - pts[..., 0, None, None]  # (B, 5, 1, R)
    dy = c[None, None, :, None] - pts[..., 1, None, None]  # (B, 5, R, 1)
    disk = (radius + 0.5 - (dx * dx + dy * dy).sqrt()).clamp(0, 1)  # (B, 5, R, R), ~1 px soft edge
    return (disk[:, :, None] * colors[None, :, :, None, None]).amax(1)


# --------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------

class FaceWorld:
    """Procedural faces of ``n_identities`` identities, the last ``heldout_fraction`` of them held out.

    ``resolution`` 32 or 64 (any size from 16 works); ``supersample`` subpixels per side (1-8).
    :meth:`sample` draws a batch, :meth:`batches` an infinite training stream.
    """

    def __init__(self, resolution: int = 32, seed: int = 0, n_identities: int = 500,
                 heldout_fraction: float = 0.2, supersample: int = 4, device: torch.device | str = "cpu") -> None:
        self.resolution = _check_int("resolution", resolution, 16, 512)
        self.seed = _check_int("seed", seed, 0)
        self.n_identities = _check_int("n_identities", n_identities, 2)
        if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
                or not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be a number in [0, 1), got {heldout_fraction!r}")
        self.heldout_fraction = float(heldout_fraction)
        self.n_heldout = int(round(self.heldout_fraction * self.n_identities))
        if self.heldout_fraction > 0 and self.n_heldout == 0:
            self.n_heldout = 1
        if self.n_identities - self.n_heldout < 1:
            raise ValueError(f"heldout_fraction={heldout_fraction} leaves no training identity of {n_identities}")
        self.supersample = _check_int("supersample", supersample, 1, 8)
        self.device = torch.device(device)
        self._stream = 0
        params = [identity_parameters(self.seed, i) for i in range(self.n_identities)]
        self.parameters = {k: np.array([p[k] for p in params]) for k in IDENTITY_PARAMETERS}

    def __repr__(self) -> str:
        return (f"FaceWorld(resolution={self.resolution}, seed={self.seed}, n_identities={self.n_identities}, "
                f"heldout_fraction={self.heldout_fraction})")

    @property
    def train_identities(self) -> torch.Tensor:
        """(n_train,) int64: the identities ``split="train"`` draws."""
        return torch.arange(self.n_identities - self.n_heldout)

    @property
    def heldout_identities(self) -> torch.Tensor:
        """(n_heldout,) int64: the identities only ``split="heldout"`` (and ``"all"``) draws."""
        return torch.arange(self.n_identities - self.n_heldout, self.n_identities)

    def _split_ids(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split == "heldout" and self.n_heldout == 0:
            raise ValueError("this world holds out no identities (heldout_fraction=0)")
        ids = {"train": self.train_identities, "heldout": self.heldout_identities,
               "all": torch.arange(self.n_identities)}[split]
        return ids.numpy()

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self, n: int, seed: int | None = None, split: str = "train",
               identities: Sequence[int] | torch.Tensor | None = None) -> Faces:
        """``n`` faces of identities drawn uniformly from ``split`` (or exactly ``identities``, a
        length-``n`` sequence, e.g. one identity repeated under different nuisances). The same
        ``seed`` gives the same faces; ``seed=None`` continues the world's own stream."""
        n = _check_int("n", n, 1)
        if seed is None:
            entropy = [self.seed, _TAG_STREAM, self._stream]
            self._stream += 1
        else:
            entropy = [self.seed, _TAG_SAMPLE, _check_int("seed", seed, 0)]
        ids = self._split_ids(split)
        rng = np.random.default_rng(entropy)
        if identities is None:
            chosen = ids[rng.integers(0, len(ids), size=n)]
        else:
            chosen = np.asarray(torch.as_tensor(identities).cpu(), dtype=np.int64).reshape(-1)
            if len(chosen) != n:
                raise ValueError(f"identities must hold n={n} values, got {len(chosen)}")
            if chosen.size and (chosen.min() < 0 or chosen.max() >= self.n_identities):
                raise ValueError(f"identities must lie in 0..{self.n_identities - 1}")
            if split != "all" and not np.isin(chosen, ids).all():
                raise ValueError(f"identities outside the {split!r} split (use split='all')")
        return self._generate(chosen, rng, split)

    def batches(self, batch_size: int, seed: int = 0, split: str = "train") -> Iterator[Faces]:
        """An infinite, deterministic stream of batches for a training loop."""
        batch_size = _check_int("batch_size", batch_size, 1)
        seed = _check_int("seed", seed, 0)
        ids = self._split_ids(split)
        for step in itertools.count():
            rng = np.random.default_rng([self.seed, _TAG_BATCHES, seed, step])
            yield self._generate(ids[rng.integers(0, len(ids), size=batch_size)], rng, split)

    # ---- the generator --------------------------------------------------------------------------

    def _nuisances(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        pose = rng.integers(0, len(POSES), n)
        tilt = rng.integers(0, len(TILTS), n)
        expression = rng.integers(0, len(EXPRESSIONS), n)
        lighting = rng.integers(0, len(LIGHTINGS), n)
        background = rng.integers(0, len(BACKGROUNDS), n)
        j = rng.uniform(-1, 1, size=(n, 7))
        yaw = np.asarray(YAW)[pose] + 0.12 * j[:, 0]
        roll = np.asarray(ROLL_DEGREES)[tilt] + 5.0 * j[:, 1]
        smile = np.where(expression == 1, 0.09 + 0.025 * j[:, 2], 0.005 + 0.01 * j[:, 2])
        brightness = np.asarray(BRIGHTNESS)[lighting] + 0.05 * j[:, 3]
        scale = 1.0 + 0.12 * j[:, 4]
        shift = 0.06 * j[:, 5:7]
        return {"pose": pose, "tilt": tilt, "expression": expression, "lighting": lighting,
                "background": background, "yaw": yaw, "roll": roll, "smile": smile,
                "brightness": brightness, "scale": scale, "shift": shift}

    def _generate(self, ids: np.ndarray, rng: np.random.Generator, split: str) -> Faces:
        if self.device.type != "cpu":
            return self._render(ids, rng, split)
        threads = torch.get_num_threads()  # small memory-bound ops: one thread is fastest (see shapes.py)
        torch.set_num_threads(1)
        try:
            return self._render(ids, rng, split)
        finally:
            torch.set_num_threads(threads)

    def _render(self, ids: np.ndarray, rng: np.random.Generator, split: str) -> Faces:
        n, R, dev = len(ids), self.resolution, self.device
        nz = self._nuisances(n, rng)
        p = {k: torch.from_numpy(v[ids].astype(np.float32)).to(dev) for k, v in self.parameters.items()}
        t = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(dev) for k, v in nz.items()}
        images = torch.empty(n, 3, R, R, device=dev)
        chunk = max(1, 65536 // (self.supersample * R) ** 2)  # ~256 KiB per float map: stays in cache
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            images[sl] = self._draw({k: v[sl] for k, v in p.items()}, {k: v[sl] for k, v in t.items()})
        landmarks = self._landmarks(p, t)
        center = (t["shift"] + 1) * (R / 2)
        captions = [caption(*row) for row in zip(nz["pose"].tolist(), nz["tilt"].tolist(),
                                                 nz["expression"].tolist(), nz["lighting"].tolist(),
                                                 nz["background"].tolist())]
        long = {k: torch.from_numpy(nz[k].astype(np.int64)).to(dev)
                for k in ("pose", "tilt", "expression", "lighting", "background")}
        return Faces(images=images, identity=torch.from_numpy(ids.astype(np.int64)).to(dev), landmarks=landmarks,
                     **long, yaw=t["yaw"], roll=t["roll"], scale=t["scale"], center=center, smile=t["smile"],
                     brightness=t["brightness"], captions=captions, split=split)

    @staticmethod
    def _face_points(p: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 5, 2) landmarks in the face frame."""
        yaw = t["yaw"]
        ex, ey = p["eye_spacing"], p["eye_height"]
        eyes_x = yaw * YAW_SHIFT_EYES
        mouth_x, mouth_y = yaw * YAW_SHIFT_MOUTH, p["mouth_height"] - t["smile"]
        w = p["mouth_width"] * (1 + 0.8 * t["smile"])  # a smile widens the mouth a little
        xs = torch.stack([eyes_x - ex, eyes_x + ex, yaw * YAW_SHIFT_NOSE, mouth_x - w, mouth_x + w], 1)
        ys = torch.stack([ey, ey, ey + p["nose_length"], mouth_y, mouth_y], 1)
        return torch.stack([xs, ys], -1)

    def _landmarks(self, p: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        uv = self._face_points(p, t)
        r = t["roll"] * (math.pi / 180)
        c, s, k = r.cos()[:, None], r.sin()[:, None], t["scale"][:, None]
        X = t["shift"][:, 0:1] + k * (c * uv[..., 0] - s * uv[..., 1])
        Y = t["shift"][:, 1:2] + k * (s * uv[..., 0] + c * uv[..., 1])
        return torch.stack([X, Y], -1).add_(1).mul_(self.resolution / 2)

    def _draw(self, p: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        R, ss, dev = self.resolution, self.supersample, self.device
        B = p["half_width"].shape[0]
        g = (torch.arange(R * ss, dtype=torch.float32, device=dev) + 0.5) / (R * ss) * 2 - 1  # subpixel centres
        X = g[None, None, :] - t["shift"][:, 0, None, None]  # (B, 1, S)
        Y = g[None, :, None] - t["shift"][:, 1, None, None]  # (B, S, 1)
        r = t["roll"] * (math.pi / 180)
        c, s = (r.cos() / t["scale"])[:, None, None], (r.sin() / t["scale"])[:, None, None]
        u = c * X + s * Y  # (B, S, S) face frame
        v = c * Y - s * X

        def col(name: str) -> torch.Tensor:
            return p[name][:, None, None]

        a, b, yaw = col("half_width"), col("half_height"), t["yaw"][:, None, None]
        # face: an ellipse whose lower half narrows toward the chin by ``taper``
        width = a * (1 - col("taper") * (v / b).clamp(min=0) ** 2)
        face = (u / width) ** 2 + (v / b) ** 2 <= 1
        label = face.to(torch.uint8) * _SKIN
        style = col("hair_style")
        # hair: long hair falls behind the face to below the chin; every style but bald has a cap
        # over the head above the hairline (fringe: lower and straight)
        back = (style == 3) & ((u / (1.22 * a)) ** 2 + ((v - 0.18 * b) / (1.12 * b)) ** 2 <= 1) & ~face
        line = torch.where(style == 2, col("hairline") * 0.55, col("hairline") + 0.35 * b * (u / a) ** 2)
        cap = (style > 0) & ((u / (1.1 * a)) ** 2 + ((v + 0.04) / (1.1 * b)) ** 2 <= 1) & (v <= line)
        label = torch.where(back | cap, _HAIR, label)
        # eyes: white, iris, and a brow in the hair colour
        r_eye, ex, ey = col("eye_size"), col("eye_spacing"), col("eye_height")
        du = (u - yaw * YAW_SHIFT_EYES).abs() - ex  # distance from the nearer eye, mirrored
        dv = v - ey
        label = torch.where((du / (1.45 * r_eye)) ** 2 + (dv / r_eye) ** 2 <= 1, _WHITE, label)
        label = torch.where(du * du + dv * dv <= (0.72 * r_eye) ** 2, _IRIS, label)
        label = torch.where((du.abs() <= 1.5 * r_eye) & ((dv + 1.9 * r_eye).abs() <= 0.035 + 0.2 * r_eye), _HAIR, label)
        # nose: a shaded wedge from between the eyes to the tip
        f = ((v - ey) / col("nose_length")).clamp(0, 1.05)
        nose_x = yaw * (YAW_SHIFT_EYES + (YAW_SHIFT_NOSE - YAW_SHIFT_EYES) * f)
        label = torch.where((v >= ey + 0.6 * r_eye) & (f < 1.05) & ((u - nose_x).abs() <= col("nose_width") * (0.25 + f)), _SHADE, label)
        # mouth: a thick parabola whose corners rise by ``smile``
        w = col("mouth_width") * (1 + 0.8 * t["smile"][:, None, None])
        mu = (u - yaw * YAW_SHIFT_MOUTH) / w
        centre = col("mouth_height") - t["smile"][:, None, None] * mu * mu
        label = torch.where((mu.abs() <= 1) & ((v - centre).abs() <= 0.045 * (1.3 - 0.6 * mu * mu)), _LIP, label)
        # colour every label, then box-average the subpixels
        skin = torch.from_numpy(SKIN_RGB).to(dev)[p["skin"].long()]  # (B, 3)
        light = t["brightness"][:, None]
        palette = torch.stack([
            torch.from_numpy(BACKGROUND_RGB).to(dev)[t["background"].long()],
            skin * light,
            torch.from_numpy(HAIR_RGB).to(dev)[p["hair_color"].long()] * light,
            torch.tensor(EYE_WHITE, device=dev).expand(B, 3) * light,
            torch.from_numpy(EYE_RGB).to(dev)[p["eye_color"].long()] * light,
            skin * 0.78 * light,
            (0.45 * skin + 0.55 * torch.from_numpy(LIP_RGB).to(dev)) * light,
        ], 1).clamp_(0, 1)  # (B, 7, 3)
        flat = label.view(B, 1, -1).long().expand(B, 3, label[0].numel())  # (B, 3, S*S)
        rgb = torch.gather(palette.transpose(1, 2), 2, flat).view(B, 3, R * ss, R * ss)
        return F.avg_pool2d(rgb, ss).mul_(2).sub_(1).clamp_(-1, 1)


def benchmark(resolution: int = 32, n: int = 1000, repeats: int = 3) -> float:
    """Faces per second for ``sample(n)`` (best of ``repeats``), everything included."""
    world = FaceWorld(resolution=resolution)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        world.sample(n, seed=r)
        best = min(best, time.perf_counter() - t0)
    return n / best
