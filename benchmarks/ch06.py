"""Chapter 06 (classifier-free guidance): FD and condition accuracy over the guidance scale s for the
digit models (p_uncond 0.1, 0.2, 0.5) and the caption (text-to-image) models (0.1, 0.2, and at gpu 0.5:
recipes.latent.t2i_p_unconds); one batched guided step vs two forwards."""

from __future__ import annotations

import torch

from diffusion_core.experiments import guidance as claim
from diffusion_core.experiments import latent as latent_claim
from diffusion_core.profiles import Profile
from diffusion_core.recipes import guidance as recipes
from diffusion_core.recipes import latent as latent_recipes
from diffusion_core.store import load


def run(profile: Profile) -> dict:
    res = claim.guidance_sweep(profile, seed=profile.seed, progress=False)
    dig, sh = res["digits"], res["shapes"]
    refs = dig["references"]
    print(f"digits: {dig['n_samples']} samples per point, {dig['steps']} DDIM steps; classifier accuracy "
          f"{dig['classifier_accuracy']:.4f}; FD floor {refs['fd_floor']:.3f}")
    for p, row in dig["rows"].items():
        print(f"  p_uncond={p:g} (trained {dig['train_seconds'][p]} s): " +
              "  ".join(f"s={s:g}: FD {r['fd']:.2f} acc {r['accuracy']:.3f}" for s, r in row.items()))
    print(f"shapes: {sh['n_samples']} captions per point, {sh['steps']} DDIM steps; real scenes: caption accuracy "
          f"{sh['references']['caption_accuracy_real']:.3f}, FD floor {sh['references']['fd_floor']:.2f}")
    for p, row in sh["rows"].items():
        print(f"  p_uncond={p:g} (trained {sh['train_seconds'][p]} s): " +
              "  ".join(f"s={s:g}: FD {r['fd']:.1f} acc {r['accuracy']:.3f} (" +
                        " ".join(f"{a} {r[a]:.2f}" for a in claim.SHAPES_ATTRIBUTES) + ")" for s, r in row.items()))

    # one guided step: cfg_eps's batched forward of 2B against two forwards of B
    repeats = profile.pick(smoke=3, cpu=10, gpu=20)
    digits = load(recipes.digits_recipe_name(0.1), profile, verbose=False).model.eval()
    dev = profile.device
    x = torch.randn(64, 1, 16, 16, device=dev)
    t = torch.full((64,), 500, device=dev)
    y = (torch.arange(64) % 10).to(dev)
    t2i_stored = load(latent_recipes.t2i_recipe_name(0.1), profile, verbose=False)
    shapes, c = t2i_stored.model.eval(), t2i_stored.config
    captions = latent_recipes.world_for(profile, text=True, max_objects=1).sample(32, seed=0).captions
    ctx, null = latent_claim.encode_captions(t2i_stored, captions)
    z = torch.randn(32, *latent_recipes.latent_shape(c["f"], c["resolution"]), device=dev)

    def t2i(x, t, cc):
        return shapes(x, t, context=cc)

    with profile.autocast():  # as the sweeps sample
        speed = claim.batched_vs_two_forwards(digits, x, t, y, torch.tensor(recipes.NULL_CLASS), repeats=repeats)
        speed_sh = claim.batched_vs_two_forwards(t2i, z, torch.full((32,), 500, device=dev), ctx, null,
                                                 repeats=repeats)
    print(f"guided step, digits batch 64: batched {speed['batched_s'] * 1000:.1f} ms, two forwards "
          f"{speed['two_s'] * 1000:.1f} ms, ratio {speed['ratio']:.3f}; shapes batch 32: ratio {speed_sh['ratio']:.3f}")

    metrics = {
        "fd_by_scale": res["fd_by_scale"], "accuracy_by_scale": res["accuracy_by_scale"],
        "shapes_fd_by_scale": res["shapes_fd_by_scale"], "shapes_accuracy_by_scale": res["shapes_accuracy_by_scale"],
        "shapes_attribute_accuracy_by_scale": {p: {a: {s: r[a] for s, r in row.items()} for a in claim.SHAPES_ATTRIBUTES}
                                               for p, row in sh["rows"].items()},
        "accuracy_p0.1_s3": dig["rows"][0.1][3.0]["accuracy"],
        "fd_floor": refs["fd_floor"], "fd_blurred": refs["fd_blurred"], "fd_gaussian": refs["fd_gaussian"],
        "classifier_accuracy": dig["classifier_accuracy"],
        "shapes_fd_floor": sh["references"]["fd_floor"],
        "shapes_caption_accuracy_real": sh["references"]["caption_accuracy_real"],
        "n_samples": dig["n_samples"], "shapes_n_samples": sh["n_samples"], "sampling_steps": dig["steps"],
        "train_seconds": {p: v for p, v in dig["train_seconds"].items()},
        "shapes_train_seconds": sh["train_seconds"], "shapes_sampling_steps": sh["steps"],
        "sample_seconds": {p: sum(r["seconds"] for r in row.values()) for p, row in dig["rows"].items()},
        "shapes_sample_seconds": {p: sum(r["seconds"] for r in row.values()) for p, row in sh["rows"].items()},
    }
    return {"metrics": metrics, "speed": {"batched_vs_two_forwards": speed["ratio"],
                                          "batched_ms": speed["batched_s"] * 1000, "two_forwards_ms": speed["two_s"] * 1000,
                                          "shapes_batched_vs_two_forwards": speed_sh["ratio"]}}
