"""Chapter 11 (GLIDE): classifier-free guidance against CLIP guidance over their scales (caption accuracy by the
shapes evaluator, similarity by an independent clean-image CLIP, the guiding noise-aware CLIP's own score, FD against
real 16 px scenes); inpainting with the fine-tuned model against replacement (caption accuracy of the edit, the seam,
the change outside the hole); the adversarial gap by hand; the fixed bars."""

from __future__ import annotations

from diffusion_core.experiments import glide as claim
from diffusion_core.profiles import Profile


def metrics(profile: Profile, setting: claim.Setting | None = None) -> dict:
    """The chapter's numbers, all from ``diffusion_core.experiments.glide``."""
    s = setting or claim.Setting(profile)
    sweep = claim.guidance_sweep(profile, s)
    inpaint = claim.inpainting(profile, s)
    adv = claim.adversarial_ascent(s)
    m = {"n": sweep["n"], "sampling_steps": sweep["steps"], **claim.benchmark_metrics(sweep, inpaint)}
    verdicts = m.pop("verdicts")
    m.update({
        "shape_accuracy_cfg_by_scale": {k: r["shape_accuracy"] for k, r in sweep["cfg"].items()},
        "color_accuracy_cfg_by_scale": {k: r["color_accuracy"] for k, r in sweep["cfg"].items()},
        "position_accuracy_cfg_by_scale": {k: r["position_accuracy"] for k, r in sweep["cfg"].items()},
        "size_accuracy_cfg_by_scale": {k: r["size_accuracy"] for k, r in sweep["cfg"].items()},
        "shape_accuracy_clip_by_scale": {k: r["shape_accuracy"] for k, r in sweep["clip"].items()},
        "color_accuracy_clip_by_scale": {k: r["color_accuracy"] for k, r in sweep["clip"].items()},
        "position_accuracy_clip_by_scale": {k: r["position_accuracy"] for k, r in sweep["clip"].items()},
        "size_accuracy_clip_by_scale": {k: r["size_accuracy"] for k, r in sweep["clip"].items()},
        "one_object_cfg_by_scale": {k: r["one_object"] for k, r in sweep["cfg"].items()},
        "one_object_clip_by_scale": {k: r["one_object"] for k, r in sweep["clip"].items()},
        "conditional_max_abs_diff": sweep.get("conditional_max_abs_diff"),
        "inpaint": {k: inpaint[k] for k in ("model", "replace", "real", "original", "hole_fraction", "scale")},
        "adversarial": {k: adv[k] for k in ("before", "after", "max_abs_change")},
        "train": {name: st.metrics for name, st in (("shapes-glide", s.glide), ("shapes-clip-noisy", s.clip),
                                                     ("shapes-glide-inpaint", s.inpainter))},
        "loss_by_noise_level": claim.loss_by_noise_level(s, n=min(200, s.n)),
        "sampling_seconds": sweep["seconds"] | {k: v for k, v in s.seconds.items() if k.startswith("inpaint")},
        "verdicts": verdicts,
    })
    lo = m["loss_by_noise_level"]   # what the caption is worth at each noise level: the error ratio
    m["loss_ratio_caption_over_empty"] = {t: lo["caption"][t] / lo["empty"][t] for t in lo["caption"]}
    for who in ("guide", "judge"):  # the bar's two rises, smallest to largest CLIP scale
        by = m[f"{who}_similarity_clip_by_scale"]
        keys = sorted(by, key=float)
        m[f"{who}_rise_clip"] = by[keys[-1]] - by[keys[0]]
    return m


def run(profile: Profile) -> dict:
    m = metrics(profile)
    r = m["real"]
    print(f"{m['n']} unseen captions, {m['sampling_steps']} respaced ancestral steps; real 16 px scenes: caption accuracy "
          f"{r['caption_accuracy']:.3f}, judge {r['judge_similarity']:.3f}, guide {r['guide_similarity']:.3f}, "
          f"FD {r['fd']:.2f}")
    print("classifier-free guidance (s: caption accuracy / judge cosine / guide cosine / FD):")
    for k in m["caption_accuracy_cfg_by_scale"]:
        print(f"  {k:g}: {m['caption_accuracy_cfg_by_scale'][k]:.3f} / {m['judge_similarity_cfg_by_scale'][k]:.3f} / "
              f"{m['guide_similarity_cfg_by_scale'][k]:.3f} / {m['fd_cfg_by_scale'][k]:.2f}")
    print("CLIP guidance (s: caption accuracy / judge cosine / guide cosine / FD):")
    for k in m["caption_accuracy_clip_by_scale"]:
        print(f"  {k:g}: {m['caption_accuracy_clip_by_scale'][k]:.3f} / {m['judge_similarity_clip_by_scale'][k]:.3f} / "
              f"{m['guide_similarity_clip_by_scale'][k]:.3f} / {m['fd_clip_by_scale'][k]:.2f}")
    print(f"CFG s=1 and CLIP s=0 (both the conditional model): max |diff| {m['conditional_max_abs_diff']}")
    ip = m["inpaint"]
    print(f"inpainting (hole {ip['hole_fraction']:.2f} of the image; caption accuracy / one object / seam / outside "
          "MSE): " + ", ".join(f"{k} {ip[k]['caption_accuracy']:.3f} / {ip[k]['one_object']:.3f} / {ip[k]['seam']:.4f} / "
                               f"{ip[k]['outside_mse']:.2g}"
                      for k in ("model", "replace", "real", "original")))
    a = m["adversarial"]
    print(f"adversarial ascent on the guide (before -> after): guide {a['before']['guide_similarity']:.3f} -> "
          f"{a['after']['guide_similarity']:.3f}, judge {a['before']['judge_similarity']:.3f} -> "
          f"{a['after']['judge_similarity']:.3f}, caption accuracy {a['before']['caption_accuracy']:.3f} -> "
          f"{a['after']['caption_accuracy']:.3f}, max pixel change {a['max_abs_change']:.3f}")
    print("training:", m["train"])
    print("eps error by t (caption / empty):", m["loss_by_noise_level"])
    print("sampling seconds:", {k: round(v, 1) for k, v in m["sampling_seconds"].items()})
    print("bars:", m["verdicts"])
    return {"metrics": m, "speed": {"sampling_seconds": m["sampling_seconds"]}}
