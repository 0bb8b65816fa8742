"""Chapter 05 (CLIP): zero-shot accuracy on held-out (shape, color) pairs, one template and a prompt
ensemble, against linear probes on the frozen features; retrieval recall@1/5; the shapes evaluator."""

from __future__ import annotations

import time

import torch

from diffusion_core.experiments import clip as claim
from diffusion_core.profiles import Profile


def run(profile: Profile) -> dict:
    res = claim.zero_shot_experiment(profile, seed=profile.seed, progress=False)
    m = res["metrics"]
    print(f"held-out pairs (48-way, chance {m['chance_pair']:.3f}): zero-shot {m['zero_shot_accuracy']:.3f}, "
          f"ensemble {m['zero_shot_accuracy_ensemble']:.3f}; linear probe shape x color "
          f"{m['linear_probe_accuracy']:.3f}, 48-way {m['linear_probe_direct_accuracy']:.3f}")
    print(f"seen pairs: zero-shot {m['zero_shot_accuracy_seen_pairs']:.3f}, ensemble "
          f"{m['zero_shot_accuracy_seen_pairs_ensemble']:.3f}, probe {m['linear_probe_accuracy_seen_pairs']:.3f}")
    print(f"shape: zero-shot {m['zero_shot_shape_accuracy']:.3f} probe {m['linear_probe_shape_accuracy']:.3f} | "
          f"color: zero-shot {m['zero_shot_color_accuracy']:.3f} probe {m['linear_probe_color_accuracy']:.3f}")
    print(f"retrieval among {m['retrieval_candidates']}: R@1 {m['recall_at_1']:.3f}  R@5 {m['recall_at_5']:.3f}"
          f"  (held-out scenes R@1 {m['recall_at_1_heldout_scenes']:.3f})")
    print(f"CLIP: final loss {m['clip_final_loss']}, scale {m['logit_scale']:.1f}, train {m['clip_train_seconds']} s; "
          f"attribute classifier scene accuracy {m['attribute_classifier_accuracy']:.4f}")
    clip = res["clip"]
    images = res["heldout_scenes"].images[:256].to(clip.device)
    repeats = profile.pick(smoke=3, cpu=10, gpu=20)
    with torch.no_grad():
        clip.model.encode_image(images)
        start = time.perf_counter()
        for _ in range(repeats):
            clip.model.encode_image(images)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        per_image = (time.perf_counter() - start) / repeats / len(images)
    return {"metrics": m, "speed": {"image_encoder_ms_per_image": per_image * 1000}}
