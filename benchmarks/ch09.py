"""Chapter 09 (IP-Adapter): lambda = 0 is the text-only model; the image prompt alone, decoupled against
concatenated at equal budget (image similarity by an independent CLIP, attribute agreement); image and caption
disagreeing on the colour, over lambda; the image prompt with chapter 07's edge ControlNet; parameters, per-step
overhead; the fixed bars."""

from __future__ import annotations

from diffusion_core.experiments import ip_adapter as claim
from diffusion_core.profiles import Profile


def metrics(profile: Profile, setting: claim.Setting | None = None) -> dict:
    """The chapter's numbers, all from ``diffusion_core.experiments.ip_adapter``."""
    s = setting or claim.Setting(profile)
    ident = claim.identity_at_zero(profile, s)
    a = claim.image_prompt(profile, s, seed=profile.seed)
    b = claim.conflict_sweep(profile, s, seed=profile.seed)
    c = claim.with_controlnet(profile, s, seed=profile.seed)
    params = claim.parameters(profile)
    by = b["by_scale"]
    top = max(by)
    m = {
        "n": a["n"], "sampling_steps": a["sampling_steps"],
        "identity_equal_at_zero_fresh": ident["fresh"]["equal_at_zero"],
        "identity_equal_at_zero_trained": ident["trained"]["equal_at_zero"],
        "identity_max_abs_diff_at_one_trained": ident["trained"]["max_abs_diff_at_one"],
        # claim (a): the image prompt alone (empty caption, lambda = 1)
        "image_similarity_decoupled": a["decoupled"]["image_similarity"],
        "image_similarity_concat": a["concat"]["image_similarity"],
        "attribute_agreement_decoupled": a["decoupled"]["attribute_agreement"],
        "attribute_agreement_concat": a["concat"]["attribute_agreement"],
        "image_similarity_floors": {k: a[k]["image_similarity"] for k in
                                    ("base_empty", "base_text", "decoupled_other", "real_other", "real_same_caption")},
        "attribute_agreement_floors": {k: a[k]["attribute_agreement"] for k in
                                       ("base_empty", "base_text", "decoupled_other", "real_other",
                                        "real_same_caption", "real_prompt")},
        "shape_color_agreement": {k: a[k]["shape_color_agreement"] for k in
                                  ("decoupled", "concat", "base_empty", "base_text", "decoupled_other", "real_other",
                                   "real_same_caption", "real_prompt")},
        "caption_accuracy_text_only": a["text_only"],
        # claim (b): caption and image disagree on the colour
        "image_similarity_by_scale": {k: v["image_similarity"] for k, v in by.items()},
        "text_accuracy_by_scale": {k: v["text_accuracy"] for k, v in by.items()},
        "color_from_image_by_scale": {k: v["color_from_image"] for k, v in by.items()},
        "color_from_text_by_scale": {k: v["color_from_text"] for k, v in by.items()},
        "text_accuracy_decoupled": by[top]["text_accuracy"], "text_accuracy_concat": b["concat"]["text_accuracy"],
        "conflict_concat": b["concat"], "conflict_real_text": b["real_text"], "conflict_real_image": b["real_image"],
        # claim (c): image prompt of one scene, edges of another, with chapter 07's ControlNet
        "edge_f1_with_controlnet": c["ip_adapter_controlnet"]["edge_f1"],
        "edge_f1_base": c["base"]["edge_f1"], "edge_f1_controlnet": c["controlnet"]["edge_f1"],
        "edge_f1_ip_adapter": c["ip_adapter"]["edge_f1"], "edge_f1_real": c["real"]["edge_f1"],
        "color_from_image_with_controlnet": c["ip_adapter_controlnet"]["color_from_image"],
        "color_from_image_controlnet_only": c["controlnet"]["color_from_image"],
        "color_from_image_ip_adapter": c["ip_adapter"]["color_from_image"],
        "color_from_image_base": c["base"]["color_from_image"], "color_from_image_real": c["real"]["color_from_image"],
        "parameters": params, "train": a["train"], "fidelity_by_step": a["fidelity_by_step"],
    }
    m["verdicts"] = claim.verdicts(m)
    return m


def run(profile: Profile) -> dict:
    m = metrics(profile)
    f, g = m["image_similarity_floors"], m["attribute_agreement_floors"]
    print(f"lambda = 0 gives the text-only samples bit for bit: fresh adapter {m['identity_equal_at_zero_fresh']}, "
          f"trained {m['identity_equal_at_zero_trained']}")
    print(f"image prompt alone ({m['n']} unseen scenes, {m['sampling_steps']} DDIM steps), judge-CLIP similarity / "
          f"attribute agreement: decoupled {m['image_similarity_decoupled']:.3f} / {m['attribute_agreement_decoupled']:.3f}, "
          f"concatenated {m['image_similarity_concat']:.3f} / {m['attribute_agreement_concat']:.3f}")
    print("  floors and references: " + ", ".join(f"{k} {f[k]:.3f} / {g[k]:.3f}" for k in f)
          + f", real prompt - / {g['real_prompt']:.3f}")
    print("  shape and colour agreement (position ignored): "
          + ", ".join(f"{k} {v:.3f}" for k, v in m["shape_color_agreement"].items()))
    t = m["caption_accuracy_text_only"]
    print(f"text only, caption accuracy: base (= IP-Adapter at lambda 0) {t['base']:.3f}, concatenated adapter with no "
          f"image {t['concat_no_image']:.3f}, real {t['real']:.3f}")
    print("caption and image disagree on the colour (lambda: image similarity / text accuracy / colour from image): "
          + ", ".join(f"{k:g}: {m['image_similarity_by_scale'][k]:.3f} / {m['text_accuracy_by_scale'][k]:.3f} / "
                      f"{m['color_from_image_by_scale'][k]:.3f}" for k in m["image_similarity_by_scale"]))
    cc, rt = m["conflict_concat"], m["conflict_real_text"]
    print(f"  concatenated: {cc['image_similarity']:.3f} / {cc['text_accuracy']:.3f} / {cc['color_from_image']:.3f}; "
          f"real image of the caption: {rt['image_similarity']:.3f} / {rt['text_accuracy']:.3f}")
    print(f"image prompt + edge ControlNet (edge F1 / colour from the image prompt): base {m['edge_f1_base']:.3f} / "
          f"{m['color_from_image_base']:.3f}, ControlNet {m['edge_f1_controlnet']:.3f} / "
          f"{m['color_from_image_controlnet_only']:.3f}, IP-Adapter {m['edge_f1_ip_adapter']:.3f} / "
          f"{m['color_from_image_ip_adapter']:.3f}, both {m['edge_f1_with_controlnet']:.3f} / "
          f"{m['color_from_image_with_controlnet']:.3f}, real {m['edge_f1_real']:.3f} / {m['color_from_image_real']:.3f}")
    p = m["parameters"]
    print(f"parameters: IP-Adapter {p['decoupled']:,} (projection {p['decoupled_projection']:,}), concatenated "
          f"{p['concat']:,}, locked UNet {p['base_unet']:,}; SD 1.5 IP-Adapter {p['sd15_ip_adapter']:,}")
    print("training:", m["train"])
    print("image fidelity over training (step, similarity, agreement):", m["fidelity_by_step"])
    ov = claim.step_overhead(profile)
    print(f"sampling step with IP-Adapter / without: {ov['ratio']:.3f}")
    print("bars:", m["verdicts"])
    return {"metrics": m, "speed": {"ip_adapter_step_overhead": ov["ratio"],
                                    "seconds_per_step_base": ov["seconds_per_step_base"]}}
