"""Chapter 10's base models on the world of faces: chapter 04's recipe, another world.

InstantID (chapter 10) needs a text-to-image model that draws faces. It is built exactly as
chapter 04's ``shapes-ldm-t2i`` (:mod:`diffusion_core.recipes.latent`), on the faces world
(:mod:`diffusion_core.data.faces`) instead of the shapes world:

* ``faces-vae-f4``: the KL autoencoder of chapter 04 (same recipe: L2 + image-gradient + KL terms,
  f = 4, four latent channels) trained on faces. The shapes autoencoder does not carry over: on
  faces its reconstructions reach a PSNR of 12.5 dB against 27.2 dB on shapes (measured on 500
  images each while developing this chapter).
* ``faces-ldm-t2i``: text-to-image latent diffusion in its latent space, captions naming the
  nuisances only ("a smiling face turned left on a blue background"), never the identity: the model
  learns to draw *some* person; which person is what InstantID adds. Captions are dropped 10% of
  the time (classifier-free guidance, chapter 06).

Both train on one fixed set of training-identity faces per profile (:func:`training_set`); the
held-out identities are never seen by any model of the chapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..data.faces import BACKGROUNDS, EXPRESSIONS, LIGHTINGS, POSES, TILTS, FaceWorld, caption, landmark_map
from ..evaluate.identity import WORLD_SEED
from ..models.text_to_image import TextToImageUNet
from ..models.tokenizers import WordTokenizer
from ..models.vae import AutoencoderKL
from ..profiles import Profile
from ..store import Recipe, Stored, load, register
from . import latent as L

NUISANCES = ("pose", "tilt", "expression", "lighting", "background")
NUISANCE_NAMES = {"pose": POSES, "tilt": TILTS, "expression": EXPRESSIONS, "lighting": LIGHTINGS,
                  "background": BACKGROUNDS}


def resolution_for(p: Profile) -> int:
    return p.pick(smoke=32, cpu=32, gpu=64)


def face_world(p: Profile) -> FaceWorld:
    """The faces world of the chapter (the identity encoders' world: seed 0, 500 identities, the
    last 100 held out)."""
    return FaceWorld(resolution=resolution_for(p), seed=WORLD_SEED)


def vocabulary() -> list[str]:
    """Every word a faces caption can use (:func:`diffusion_core.data.faces.caption`)."""
    words: list[str] = []
    for phrase in ("a face in light on background", *POSES, *TILTS, *EXPRESSIONS, *LIGHTINGS, *BACKGROUNDS):
        for w in phrase.split():
            if w not in words:
                words.append(w)
    return words


def context_length() -> int:
    """The longest caption's words plus start and end."""
    longest = max(len(caption(*k).split()) for k in
                  [(0, 0, e, 0, b) for e in range(len(EXPRESSIONS)) for b in range(len(BACKGROUNDS))])
    return longest + 2


def tokenizer() -> WordTokenizer:
    return WordTokenizer(vocabulary(), context_length())


# ------------------------------------------------------------------------------------------------
# The data: one fixed set of training-identity faces per profile
# ------------------------------------------------------------------------------------------------

@dataclass
class FaceSet(L.TrainingSet):
    """A :class:`~diffusion_core.recipes.latent.TrainingSet` of faces: ``pixels`` (N, 3, R, R) uint8,
    ``captions``, no paraphrases, ``maps["landmarks"]`` (the landmark images, IdentityNet's input),
    and per face its ``landmarks`` (N, 5, 2) pixel coordinates, ``identity`` (N,) and nuisance
    classes ``nuisances[name]`` (N,)."""

    landmarks: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, 5, 2))
    identity: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    nuisances: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@lru_cache(maxsize=2)
def _face_set(resolution: int, n: int, chunk: int = 1000) -> FaceSet:
    world = FaceWorld(resolution=resolution, seed=WORLD_SEED)
    pixels, captions, maps, marks, ids = [], [], [], [], []
    nuis: dict[str, list[torch.Tensor]] = {k: [] for k in NUISANCES}
    for k, start in enumerate(range(0, n, chunk)):
        faces = world.sample(min(chunk, n - start), seed=2000 + k, split="train")
        pixels.append(L.to_uint8(faces.images))
        captions += faces.captions
        maps.append((landmark_map(faces.landmarks, resolution) * 255).round().to(torch.uint8))
        marks.append(faces.landmarks)
        ids.append(faces.identity)
        for name in NUISANCES:
            nuis[name].append(getattr(faces, name))
    return FaceSet(torch.cat(pixels), captions, [[] for _ in captions], {"landmarks": torch.cat(maps)},
                   torch.cat(marks), torch.cat(ids), {k: torch.cat(v) for k, v in nuis.items()})


def training_set(p: Profile) -> FaceSet:
    """The fixed training faces of the chapter's recipes (training identities only)."""
    return _face_set(resolution_for(p), p.pick(smoke=512, cpu=8000, gpu=16000))


def heldout_faces(p: Profile, n: int, seed: int = 0):
    """``n`` faces of held-out identities (a :class:`~diffusion_core.data.faces.Faces`)."""
    return face_world(p).sample(n, seed=seed, split="heldout")


# ------------------------------------------------------------------------------------------------
# The autoencoder and the text-to-image model
# ------------------------------------------------------------------------------------------------

def _vae_config(p: Profile) -> dict[str, Any]:
    return {**L._vae_config(4)(p), "world": "faces", "world_seed": WORLD_SEED}


def _train_vae(vae: AutoencoderKL, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    return L.train_vae(vae, c, p, data=training_set(p), heldout=heldout_faces(p, 500, seed=1).images)


FACES_VAE = register(Recipe("faces-vae-f4", 1, _vae_config, L.build_vae, _train_vae,
                            "chapter 04's KL autoencoder (f=4, 4 latent channels) trained on the faces world"))


def load_vae(p: Profile, verbose: bool = True) -> Stored:
    """``faces-vae-f4`` with its measured latent scale set."""
    stored = load(FACES_VAE.name, p, verbose=verbose)
    stored.model.scaling_factor = float(stored.metrics["latent_scale"])
    return stored


def _t2i_config(p: Profile) -> dict[str, Any]:
    c = L._t2i_config(p)
    for k in ("max_objects",):
        c.pop(k)
    # cpu: 2,500 steps, not chapter 04's 5,000. At 5,000 this model alone was 1,249 s of the chapter's
    # 46 minutes of cold training (1 thread beside other jobs); halving it is the biggest cut that keeps
    # chapter 10 within about 15 minutes cold. What it cost (chapter 10's benchmark, 200 held-out people):
    # its samples follow the caption's tilt in 0.40 of cases against 0.83 at 5,000 steps (chance 0.33) and
    # the lighting in 0.70 against 0.825; the background in 1.00 against 0.995.
    c["steps"] = p.pick(smoke=c["steps"], cpu=2500, gpu=c["steps"])
    words = vocabulary()
    c.update({"world": "faces", "world_seed": WORLD_SEED, "vocabulary": " ".join(words),
              "context_length": context_length(), "paraphrases": False,
              "vae": {"recipe": FACES_VAE.name, "version": FACES_VAE.version, **FACES_VAE.config(p)}})
    return c


def _build_t2i(c: dict[str, Any]) -> TextToImageUNet:
    return L.build_t2i(c, tokenizer())


def _train_t2i(model: TextToImageUNet, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    return L.train_t2i(model, c, p, training_set(p), load_vae(p).model, tokenizer())


FACES_T2I = register(Recipe(
    "faces-ldm-t2i", 1, _t2i_config, _build_t2i, _train_t2i,
    "chapter 04's text-to-image recipe on faces: captions name the nuisances (pose, tilt, expression, lighting, "
    "background), never the identity; in the latent space of faces-vae-f4; captions dropped with p=0.1"))


def load_base(p: Profile):
    """The locked faces text-to-image model (frozen), its autoencoder and its diffusion process."""
    stored = load(FACES_T2I.name, p)
    stored.model.eval().requires_grad_(False)
    return stored, load_vae(p).model, L.diffusion_for(stored.config)


# ------------------------------------------------------------------------------------------------
# A CLIP of the faces world: the image encoder of the IP-Adapter baseline (chapter 10)
# ------------------------------------------------------------------------------------------------

def _clip_config(p: Profile) -> dict[str, Any]:
    words = vocabulary()
    return {"world": "faces", "world_seed": WORLD_SEED, "resolution": resolution_for(p), "image_encoder": "cnn",
            "cnn_width": p.pick(smoke=16, cpu=16, gpu=32), "vision_width": p.pick(smoke=128, cpu=128, gpu=256),
            "patch_size": resolution_for(p) // 8, "vision_layers": 2,
            "text_width": p.pick(smoke=64, cpu=64, gpu=128), "text_layers": 2, "heads": 4,
            "embed_dim": p.pick(smoke=64, cpu=64, gpu=128),
            "vocab_size": len(words) + len(WordTokenizer.SPECIALS), "vocabulary": " ".join(words),
            "context_length": context_length(),
            # cpu: 500 steps (was 1,000: 334 s, held-out caption top-1 0.646), to keep chapter 10's cold run
            # within about 15 minutes; at 500 steps its held-out caption top-1 is 0.612
            "steps": p.pick(smoke=40, cpu=500, gpu=4000),
            "batch_size": p.pick(smoke=32, cpu=128, gpu=256), "lr": 1e-3, "weight_decay": 0.1, "seed": 0}


def _build_clip(c: dict[str, Any]):
    from .clip import _build
    return _build(c)


def _train_clip(model, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    """CLIP's symmetric InfoNCE on (face, caption) pairs of the training faces: the captions name only
    the nuisances, so this CLIP learns what web captions teach a real one, the *semantics* of a face
    (its pose, expression, background), and identity only as far as it helps tell captions apart."""
    from ..train import TrainConfig, train
    from .clip import contrastive_loss, trim

    data = training_set(p)
    tok = tokenizer()
    ids = tok.encode(data.captions)
    torch.manual_seed(c["seed"])

    def batches():
        g = torch.Generator().manual_seed(c["seed"])
        while True:
            i = torch.randint(0, len(data), (c["batch_size"],), generator=g)
            yield data.images(i), trim(ids[i])

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], weight_decay=c["weight_decay"], betas=(0.9, 0.98),
                      warmup_steps=min(200, c["steps"] // 10), final_lr_fraction=0.05, ema_decay=0.0,
                      desc="CLIP on faces")
    res = train(model, contrastive_loss, batches(), cfg, p)
    model.eval()
    test = heldout_faces(p, 500, seed=2)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(test.images.to(p.device)), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok.encode(test.captions).to(p.device)), dim=-1)
    # caption retrieval: the right caption's cosine beats every other *distinct* caption's
    sims = img @ txt.T
    same = torch.tensor([[a == b for b in test.captions] for a in test.captions], device=sims.device)
    right = sims.diagonal()[:, None]
    top1 = ((sims > right) & ~same).sum(1).eq(0).float().mean().item()
    tail = res.losses[-50:]
    return {"final_loss": round(sum(tail) / len(tail), 4), "caption_top1_heldout": round(top1, 4),
            "train_seconds": round(res.seconds, 1)}


FACES_CLIP = register(Recipe(
    "faces-clip", 1, _clip_config, _build_clip, _train_clip,
    "chapter 05's CLIP recipe (CNN image tower, word-level text transformer) on faces and their nuisance captions"))


def faces_clip(p: Profile, verbose: bool = True):
    """The stored faces CLIP (eval mode, on the profile's device)."""
    stored = load(FACES_CLIP.name, p, device=p.device, verbose=verbose)
    return stored.model.eval()
