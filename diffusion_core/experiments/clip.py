"""Chapter 05's claim in miniature: contrastive image-text pre-training gives zero-shot classification.

Radford et al. (2021): CLIP classifies images into classes it was never trained to predict by
embedding one prompt per class ("a photo of a {label}.") and picking the class whose text embedding
is most similar to the image's. On ImageNet zero-shot CLIP ViT-L/14@336 reaches 76.2% top-1
(Table 1: the accuracy of a fully supervised ResNet-50), prompt ensembling over 80 templates adds
about 3.5 points (Figure 4), and zero-shot matches a 4-shot linear probe on CLIP's own features
averaged over 20 datasets (Figure 6).

In the shapes world the test is compositional: the CLIP of ``shapes-clip`` trains only on scenes
whose (shape, color) pairs avoid the seven :data:`~diffusion_core.data.shapes.HELDOUT_PAIRS`, and is
asked to name the pair of single-object scenes that show one of them, among all 48 pairs. Beside it:

* a supervised linear probe on the frozen image features that predicts the pair directly (48-way,
  trained on training-split scenes): it has never seen a held-out pair, so it cannot name one;
* a compositional probe: one linear probe for shape and one for color, combined, which does see
  every shape and every color in training;
* the same probes with only k labelled scenes per class, to place zero-shot on a data-efficiency curve;
* image <-> text retrieval recall@1 and @5 on fresh scenes of 1-3 objects.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..data.shapes import CLASS_NAMES, PROMPT_TEMPLATES, Scenes, ShapesWorld, zero_shot_prompts
from ..evaluate.attributes import shapes_evaluator
from ..profiles import Profile
from ..recipes.clip import ShapesCLIP, recall_at_k, shapes_clip

PAPER = {"imagenet_zero_shot_vit_l14_336": 0.762, "imagenet_linear_probe_vit_l14_336": 0.854,
         "prompt_ensembling_gain_imagenet": 0.035,
         "zero_shot_equals_k_shot_linear_probe": 4}

# evaluation worlds: seeds of their own, never the training stream
EVAL_SEED, PROBE_SEED, RETRIEVAL_SEED = 5000, 5001, 5002


def sizes(profile: Profile) -> dict[str, int]:
    """How many scenes each measurement uses."""
    return profile.pick(smoke={"eval": 300, "probe_train": 600, "retrieval": 200},
                        cpu={"eval": 1000, "probe_train": 3000, "retrieval": 500},
                        gpu={"eval": 2000, "probe_train": 5000, "retrieval": 1000})


# --------------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------------

def class_embeddings(clip: ShapesCLIP, attribute: str, templates: Sequence[str] | None = None) -> torch.Tensor:
    """The zero-shot classifier's weights (C, P): for each class, the text embeddings of its prompts
    (one per template) averaged, then re-normalised (prompt ensembling; one template: no average)."""
    prompts = zero_shot_prompts(attribute, templates)  # [class][template]
    C, T = len(prompts), len(prompts[0])
    emb = clip.encode_text([p for row in prompts for p in row]).view(C, T, -1)
    return F.normalize(emb.mean(1), dim=-1)


def zero_shot_predict(image_embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, P) unit image embeddings, (C, P) class embeddings -> (N,) the most similar class."""
    return (image_embeds @ weights.T).argmax(1)


def single_object_scenes(resolution: int, n: int, split: str, seed: int) -> Scenes:
    """``n`` fixed one-object scenes: ``split="heldout"`` makes every object a held-out pair."""
    world = ShapesWorld(resolution=resolution, seed=seed, max_objects=1, split=split,
                        n_paraphrases=0, n_heldout_paraphrases=0)
    return world.fixed(n, seed=0)


def labels(scenes: Scenes, attribute: str) -> torch.Tensor:
    """(N,) class of the first object of each scene for ``attribute`` (shape, color, or pair)."""
    return (scenes.pair if attribute == "pair" else getattr(scenes, attribute))[:, 0].cpu()


def zero_shot_table(clip: ShapesCLIP, scenes: Scenes, attributes: Sequence[str] = ("pair", "shape", "color")
                    ) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy per attribute: with each template alone, with the first template (the
    plain class name, "a red circle"), and with the ensemble of all templates."""
    img = clip.encode_image(scenes.images)
    out = {}
    for a in attributes:
        y = labels(scenes, a)
        per_template = {t: (zero_shot_predict(img, class_embeddings(clip, a, [t])) == y).float().mean().item()
                        for t in PROMPT_TEMPLATES[a]}
        ensemble = (zero_shot_predict(img, class_embeddings(clip, a)) == y).float().mean().item()
        out[a] = {"single": per_template[PROMPT_TEMPLATES[a][0]], "ensemble": ensemble,
                  "per_template": per_template, "classes": len(CLASS_NAMES[a])}
    return out


# --------------------------------------------------------------------------------------------------
# Linear probes on the frozen image features
# --------------------------------------------------------------------------------------------------

def fit_probe(features: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 1000):
    """A multinomial logistic regression (L-BFGS, L2 penalty ``1/C``) on standardised features, as the
    paper's linear probes. Returns a function (N, D) features -> (N,) predicted labels."""
    from sklearn.linear_model import LogisticRegression

    x = features.double().numpy()
    mean, std = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():  # 1-shot probes: "more classes than half the samples", by design
        warnings.simplefilter("ignore", UserWarning)
        model.fit((x - mean) / std, y.numpy())

    def predict(f: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(model.predict((f.double().numpy() - mean) / std)).long()

    return predict


def k_per_class(y: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices of (up to) ``k`` examples of every class present in ``y``."""
    g = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
    return torch.cat([i[torch.randperm(len(i), generator=g)[:k]] for i in idx])


def probe_table(clip: ShapesCLIP, train_scenes: Scenes, test_scenes: Scenes,
                shots: Sequence[int | None] = (None,)) -> dict[str, Any]:
    """Linear-probe accuracies on ``test_scenes`` from probes trained on ``train_scenes``' features:
    ``shape``, ``color``, ``pair`` (the composition of those two) and ``pair_direct`` (one 48-way
    probe, which can only predict pairs it was trained on). ``shots``: k labelled scenes per class
    (``None``: all of them)."""
    f_train, f_test = clip.image_features(train_scenes.images), clip.image_features(test_scenes.images)
    y_test = {a: labels(test_scenes, a) for a in ("shape", "color", "pair")}
    out: dict[str, Any] = {}
    for k in shots:
        row = {}
        preds = {}
        for a in ("shape", "color", "pair"):
            y = labels(train_scenes, a)
            sel = torch.arange(len(y)) if k is None else k_per_class(y, k)
            preds[a] = fit_probe(f_train[sel], y[sel])(f_test)
            key = "pair_direct" if a == "pair" else a
            row[key] = (preds[a] == y_test[a]).float().mean().item()
        row["pair"] = ((preds["shape"] == y_test["shape"]) & (preds["color"] == y_test["color"])).float().mean().item()
        out["all" if k is None else k] = row
    return out


# --------------------------------------------------------------------------------------------------
# The claim
# --------------------------------------------------------------------------------------------------

def zero_shot_experiment(profile: Profile, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Zero-shot (one template, ensemble) vs linear probes on held-out (shape, color) pairs; retrieval
    recall@1/5; the shapes evaluator's accuracy. Flat headline numbers are under ``"metrics"``."""
    start = time.perf_counter()
    clip = shapes_clip(profile)
    train_seconds = clip.stored.metrics.get("train_seconds") if clip.stored else None
    n = sizes(profile)
    R = clip.config["resolution"]
    heldout = single_object_scenes(R, n["eval"], "heldout", EVAL_SEED + seed)
    seen = single_object_scenes(R, n["eval"], "train", EVAL_SEED + seed)
    probe_train = single_object_scenes(R, n["probe_train"], "train", PROBE_SEED + seed)

    zs_heldout = zero_shot_table(clip, heldout)
    zs_seen = zero_shot_table(clip, seen)
    shots = profile.pick(smoke=(1, 4, None), cpu=(1, 2, 4, 8, 16, 32, None), gpu=(1, 2, 4, 8, 16, 32, 64, None))
    probes_heldout = probe_table(clip, probe_train, heldout, shots)
    probes_seen = probe_table(clip, probe_train, seen, (None,))

    world = ShapesWorld(resolution=R, seed=RETRIEVAL_SEED + seed, split="train", n_paraphrases=0,
                        n_heldout_paraphrases=0)
    retrieval_scenes = world.fixed(n["retrieval"], seed=0)
    sims = clip.encode_image(retrieval_scenes.images) @ clip.encode_text(retrieval_scenes.captions).T
    retrieval = recall_at_k(sims, (1, 5))
    retrieval_heldout = clip.retrieval(world.fixed(n["retrieval"], seed=0, split="heldout"))

    evaluator = shapes_evaluator(profile, verbose=progress)
    acc = evaluator.accuracy
    metrics = {
        "zero_shot_accuracy": zs_heldout["pair"]["single"],
        "zero_shot_accuracy_ensemble": zs_heldout["pair"]["ensemble"],
        "linear_probe_accuracy": probes_heldout["all"]["pair"],
        "linear_probe_direct_accuracy": probes_heldout["all"]["pair_direct"],
        "zero_shot_equivalent_shots": k_shot_equivalent(probes_heldout, zs_heldout["pair"]["ensemble"]),
        "zero_shot_accuracy_seen_pairs": zs_seen["pair"]["single"],
        "zero_shot_accuracy_seen_pairs_ensemble": zs_seen["pair"]["ensemble"],
        "linear_probe_accuracy_seen_pairs": probes_seen["all"]["pair"],
        "zero_shot_shape_accuracy": zs_heldout["shape"]["ensemble"],
        "zero_shot_color_accuracy": zs_heldout["color"]["ensemble"],
        "linear_probe_shape_accuracy": probes_heldout["all"]["shape"],
        "linear_probe_color_accuracy": probes_heldout["all"]["color"],
        "recall_at_1": (retrieval["image_to_text_recall_at_1"] + retrieval["text_to_image_recall_at_1"]) / 2,
        "recall_at_5": (retrieval["image_to_text_recall_at_5"] + retrieval["text_to_image_recall_at_5"]) / 2,
        **retrieval,
        "recall_at_1_heldout_scenes": (retrieval_heldout["image_to_text_recall_at_1"]
                                       + retrieval_heldout["text_to_image_recall_at_1"]) / 2,
        "retrieval_candidates": n["retrieval"],
        "chance_pair": 1 / len(CLASS_NAMES["pair"]),
        "logit_scale": clip.model.scale.item(),
        "clip_final_loss": clip.stored.metrics.get("final_loss") if clip.stored else None,
        "clip_train_seconds": train_seconds,
        "clip_trained_now": clip.stored.trained_now if clip.stored else None,
        "attribute_classifier_accuracy": acc.get("scene", float("nan")),
        **{f"attribute_classifier_{k}_accuracy": v for k, v in acc.items() if k != "scene"},
        "eval_scenes": n["eval"], "probe_train_scenes": n["probe_train"],
        "seconds": time.perf_counter() - start,
    }
    return {"metrics": metrics, "zero_shot_heldout": zs_heldout, "zero_shot_seen": zs_seen,
            "probes_heldout": probes_heldout, "probes_seen": probes_seen, "retrieval": retrieval,
            "retrieval_heldout": retrieval_heldout, "evaluator_accuracy": acc, "clip": clip,
            "heldout_scenes": heldout, "paper": PAPER}


def k_shot_equivalent(probes: dict[str, Any], zero_shot: float, key: str = "pair") -> float | None:
    """How many labelled examples per class a probe needs to reach the zero-shot accuracy: the k where
    the k-shot curve crosses it, interpolated linearly in log k between the measured k (the paper's
    Figure 6 reading). ``None`` if even the largest k stays below; the smallest k if it is already above."""
    points = sorted((k, row[key]) for k, row in probes.items() if k != "all")
    for i, (k, acc) in enumerate(points):
        if acc >= zero_shot:
            if i == 0:
                return float(k)
            k0, a0 = points[i - 1]
            return float(k0 * (k / k0) ** ((zero_shot - a0) / (acc - a0)))
    return None
