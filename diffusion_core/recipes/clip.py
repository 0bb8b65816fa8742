"""CLIP on the world of shapes (chapter 05), trained by fixed recipes and cached by the store.

``shapes-clip`` is the chapter's model: a small image encoder over the scene's pixels and a small causal
text transformer over the words of :meth:`ShapesWorld.vocabulary` (a :class:`WordTokenizer`), both inside
the package's :class:`CLIPModel`, trained with CLIP's symmetric InfoNCE loss and a learned temperature on
captioned scenes from the *training* split (the held-out (shape, color) pairs are never seen). Each image
is paired with its caption or, at random, one of its paraphrases; half of each batch are one-object
scenes, the rest have 1-3 objects.

The image encoder is a small CNN (``image_encoder="cnn"``; the paper trains ResNets as well as ViTs).
The recipe can also build the paper's ViT (``"vit"``) or a ViT with a convolutional stem
(``"vit_stem"``). At the budget of a laptop the ViT barely learns shape: with the same text encoder,
600 steps of 128 pairs gave zero-shot accuracy on held-out (shape, color) pairs of 0.18 (ViT), 0.46
(ViT with a conv stem) and 0.71 (CNN), color being near 1 for all three (48 classes; measured while
developing chapter 05 on a 2-core CPU).

``shapes-clip-judge`` is the same recipe with another initialisation seed and another stream of
scenes: an independently trained CLIP that later chapters (GLIDE, unCLIP) use to judge how well a
generated image matches its caption, so the judge is never the model that was guided by it.

    clip = shapes_clip(profile)                    # ShapesCLIP: model + tokenizer
    clip.similarity(images, captions)              # (B,) cosine of each image with its caption
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes import Scenes, ShapesWorld
from ..models.clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionOutput, clip_loss
from ..models.tokenizers import WordTokenizer
from ..profiles import Profile
from ..store import Recipe, Stored, load
from ..train import TrainConfig, train


def vocabulary_digest(words: Sequence[str]) -> str:
    """A short hash of the word list: part of the recipe's config, so a changed vocabulary retrains."""
    return hashlib.sha256(" ".join(words).encode()).hexdigest()[:12]


def tokenizer_for(config: dict[str, Any]) -> WordTokenizer:
    """The word tokenizer of a stored shapes CLIP: every word of the world (captions, paraphrases,
    held-out paraphrases and zero-shot prompts), ids 0-3 for ``<pad> <start> <end> <unk>``."""
    words = ShapesWorld.vocabulary()
    if vocabulary_digest(words) != config["vocab_digest"]:
        raise ValueError("the shapes world's vocabulary changed since this CLIP was configured; reload it")
    return WordTokenizer(words, config["context_length"])


def _config(seed: int, data_seed: int):
    def config(p: Profile) -> dict[str, Any]:
        res = p.pick(smoke=32, cpu=32, gpu=64)
        words = ShapesWorld.vocabulary()
        return {
            "resolution": res, "image_encoder": "cnn", "cnn_width": p.pick(smoke=16, cpu=16, gpu=32),
            "vision_width": p.pick(smoke=128, cpu=128, gpu=256),
            # used by image_encoder="vit" / "vit_stem" only: 8x8 = 64 patches + the class token
            "patch_size": res // 8, "vision_layers": p.pick(smoke=2, cpu=2, gpu=6),
            "text_width": p.pick(smoke=64, cpu=64, gpu=128), "text_layers": p.pick(smoke=2, cpu=2, gpu=4),
            "heads": 4, "embed_dim": p.pick(smoke=64, cpu=64, gpu=128),
            "vocab_size": len(words) + len(WordTokenizer.SPECIALS), "vocab_digest": vocabulary_digest(words),
            "context_length": ShapesWorld(res).max_caption_words() + 2,
            "steps": p.pick(smoke=150, cpu=1500, gpu=6000), "batch_size": p.pick(smoke=64, cpu=128, gpu=256),
            "lr": p.pick(smoke=1e-3, cpu=1e-3, gpu=5e-4), "weight_decay": 0.1,
            "caption_prob": 0.4,  # else one of the scene's paraphrases (text augmentation)
            # half of every batch one-object scenes: there, captions differ only in a few words, and
            # telling them apart needs the shape, which 1-3 object scenes rarely do
            "single_object_fraction": 0.5,
            "seed": seed, "data_seed": data_seed,
        }
    return config


class ConvStem(nn.Module):
    """A convolutional stem in place of the ViT's single strided patch convolution (Xiao et al. 2021,
    "Early convolutions help transformers see better"): two 3x3 convolutions, then a strided one that
    makes the same grid of tokens. ``weight`` is the last convolution's (the embedding reads its dtype)."""

    def __init__(self, hidden: int, patch: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.GELU(), nn.Conv2d(width, 2 * width, 3, 2, 1),
                                 nn.GELU(), nn.Conv2d(2 * width, hidden, patch // 2, patch // 2))

    @property
    def weight(self) -> torch.Tensor:
        return self.net[-1].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvImageEncoder(nn.Module):
    """A small CNN image tower (the paper also trains ResNet image encoders): 3x3 convolutions with
    GroupNorm, halving twice to an 8x8 map, flattened (so position survives) and mapped to ``hidden``.
    Returns a :class:`CLIPVisionOutput` whose ``pooled`` is what ``visual_projection`` reads."""

    def __init__(self, resolution: int, hidden: int, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU()]

        layers = block(3, w)
        for _ in range(resolution // 32 - 1):
            layers += block(w, w, 2)
        layers += [*block(w, 2 * w, 2), *block(2 * w, 2 * w), *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w)]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * w * 64, hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        h = self.body(pixel_values)
        return CLIPVisionOutput(last_hidden_state=h[:, None], pooled=self.norm(h))


def _build(c: dict[str, Any]) -> CLIPModel:
    torch.manual_seed(c["seed"])
    text = CLIPTextConfig.tiny(vocab_size=c["vocab_size"], hidden_size=c["text_width"],
                               intermediate_size=4 * c["text_width"], num_hidden_layers=c["text_layers"],
                               num_attention_heads=c["heads"], max_position_embeddings=c["context_length"],
                               eos_token_id=WordTokenizer.end_id, projection_dim=c["embed_dim"],
                               hidden_act="gelu")
    vision = CLIPVisionConfig.tiny(image_size=c["resolution"], patch_size=c["patch_size"],
                                   hidden_size=c["vision_width"], intermediate_size=4 * c["vision_width"],
                                   num_hidden_layers=c["vision_layers"], num_attention_heads=c["heads"],
                                   projection_dim=c["embed_dim"], hidden_act="gelu")
    model = CLIPModel(text, vision)
    if c.get("image_encoder") == "vit_stem":
        model.vision_model.embeddings.patch_embedding = ConvStem(c["vision_width"], c["patch_size"])
    elif c.get("image_encoder") == "cnn":
        model.vision_model = ConvImageEncoder(c["resolution"], c["vision_width"], c["cnn_width"])
    return model


def training_world(c: dict[str, Any], max_objects: int = 3) -> ShapesWorld:
    """The scenes a shapes CLIP trains on: training split (no held-out pair), four paraphrases each."""
    return ShapesWorld(resolution=c["resolution"], seed=c["data_seed"] + 10 * (max_objects - 1),
                       max_objects=max_objects, split="train", n_paraphrases=4, n_heldout_paraphrases=0)


def pick_texts(scenes: Scenes, rng: np.random.Generator, caption_prob: float) -> list[str]:
    """For each scene its caption (probability ``caption_prob``) or one of its paraphrases."""
    out = []
    for caption, paras in zip(scenes.captions, scenes.paraphrases):
        out.append(caption if not paras or rng.random() < caption_prob else paras[rng.integers(len(paras))])
    return out


def pair_batches(c: dict[str, Any], tokenizer: WordTokenizer, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An infinite stream of (images (B, 3, R, R), token ids (B, <= context)) aligned pairs: a fraction
    ``single_object_fraction`` of one-object scenes, the rest of 1-3 objects."""
    rng = np.random.default_rng([c["data_seed"], seed])
    B = c["batch_size"]
    n1 = round(B * c["single_object_fraction"])
    streams = [training_world(c, 1).batches(n1, seed=seed)] if n1 else []
    streams += [training_world(c, 3).batches(B - n1, seed=seed)] if n1 < B else []
    for parts in zip(*streams):
        images = torch.cat([s.images for s in parts])
        texts = [t for s in parts for t in pick_texts(s, rng, c["caption_prob"])]
        yield images, trim(tokenizer.encode(texts))


def trim(ids: torch.Tensor, pad_id: int = WordTokenizer.pad_id) -> torch.Tensor:
    """Drop the columns that are padding in every row: the causal text transformer never lets a
    token see the ones after it, so the pooled (end-token) features do not change, and short
    captions cost less."""
    keep = int((ids != pad_id).sum(1).max())
    return ids[:, :keep]


def contrastive_loss(model: CLIPModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """CLIP's loss on a batch of pairs, the temperature clamped at e^t <= 100 (:attr:`CLIPModel.scale`)."""
    images, ids = batch
    return clip_loss(model.encode_image(images), model.encode_text(ids), model.scale.log())


def train_clip(model: CLIPModel, c: dict[str, Any], p: Profile, steps: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place by the recipe ``c`` (``steps`` overrides the recipe's count)."""
    tok = tokenizer_for(c)
    torch.manual_seed(c["seed"])
    steps = steps or c["steps"]
    cfg = TrainConfig(steps=steps, lr=c["lr"], weight_decay=c["weight_decay"], betas=(0.9, 0.98),
                      warmup_steps=min(200, steps // 10), final_lr_fraction=0.05, ema_decay=0.0,
                      channels_last=False, desc=f"CLIP on shapes (seed {c['seed']})")
    res = train(model, contrastive_loss, pair_batches(c, tok), cfg, p, progress=progress)
    model.eval()
    tail = res.losses[-50:]
    return {"final_loss": round(sum(tail) / len(tail), 4), "first_loss": round(res.losses[0], 4),
            "logit_scale": round(model.scale.item(), 3), "train_seconds": round(res.seconds, 1)}


def _train(model: CLIPModel, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    metrics = train_clip(model, c, p)
    clip = ShapesCLIP(model.cpu(), tokenizer_for(c), c)
    world = ShapesWorld(resolution=c["resolution"], seed=c["data_seed"] + 1000, split="train",
                        n_paraphrases=0, n_heldout_paraphrases=0)
    metrics.update({k: round(v, 4) for k, v in clip.retrieval(world.fixed(500, seed=0)).items()})
    return metrics


SHAPES_CLIP = Recipe("shapes-clip", 1, _config(seed=0, data_seed=0), _build, _train,
                     "CLIP on the shapes world: a small CNN image encoder and a word-level text "
                     "transformer, symmetric InfoNCE with a learned temperature, training split only",
                     tokenizer=tokenizer_for)
SHAPES_CLIP_JUDGE = Recipe("shapes-clip-judge", 1, _config(seed=1, data_seed=77), _build, _train,
                           "the same CLIP recipe with another seed and other scenes: the independent "
                           "judge of text-image alignment for later chapters", tokenizer=tokenizer_for)


@dataclass
class ShapesCLIP:
    """A trained shapes CLIP with its tokenizer. Embeddings are L2-normalised, (B, embed_dim)."""

    model: CLIPModel
    tokenizer: WordTokenizer
    config: dict[str, Any]
    stored: Stored | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch: int = 1000) -> torch.Tensor:
        """Texts -> (B, P) unit vectors (on CPU)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.model.eval()
        out = [self.model.encode_text(trim(self.tokenizer.encode(texts[i:i + batch])).to(self.device)).float().cpu()
               for i in range(0, len(texts), batch)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> (B, P) unit vectors (on CPU)."""
        R = self.config["resolution"]
        if images.ndim != 4 or images.shape[1:] != (3, R, R):
            raise ValueError(f"this CLIP takes images (B, 3, {R}, {R}) in [-1, 1], got {tuple(images.shape)}")
        self.model.eval()
        out = [self.model.encode_image(images[i:i + batch].clamp(-1, 1).to(self.device)).float().cpu()
               for i in range(0, len(images), batch)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """(B, D) pooled image features before the projection (what a linear probe reads)."""
        self.model.eval()
        return torch.cat([self.model.vision_model(images[i:i + batch].clamp(-1, 1).to(self.device)).pooled.float().cpu()
                          for i in range(0, len(images), batch)])

    def similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(B,) cosine similarity of image i with text i: the alignment score later chapters report."""
        if len(texts) != len(images):
            raise ValueError(f"need one text per image, got {len(images)} images and {len(texts)} texts")
        return (self.encode_image(images) * self.encode_text(texts)).sum(-1)

    def retrieval(self, scenes: Scenes, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
        """Recall@k over a set of scenes and their captions, both ways: for image i, is caption i among
        the k captions most similar to it (``image_to_text_recall_at_k``), and the converse."""
        sims = self.encode_image(scenes.images) @ self.encode_text(scenes.captions).T  # (N, N)
        return recall_at_k(sims, ks)


def recall_at_k(sims: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of a (N, N) similarity matrix whose matching pairs are on the diagonal."""
    target = torch.arange(sims.shape[0])
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        rank = (s > s[target, target][:, None]).sum(1)  # how many beat the right answer
        for k in ks:
            out[f"{name}_recall_at_{k}"] = (rank < k).float().mean().item()
    return out


def shapes_clip(profile: Profile | str | None = None, judge: bool = False, verbose: bool = True) -> ShapesCLIP:
    """The chapter's shapes CLIP (``judge=False``) or the independent judge, from the store."""
    stored = load("shapes-clip-judge" if judge else "shapes-clip", profile, verbose=verbose)
    return ShapesCLIP(stored.model.eval(), tokenizer_for(stored.config), stored.config, stored)
