"""Chapter 07 (ControlNet): identity at initialisation, edge adherence (base / ControlNet / real) with and without
the caption, caption accuracy kept, adherence over training steps, two ControlNets composed, per-step overhead."""

from __future__ import annotations

from diffusion_core.experiments import control as claim
from diffusion_core.profiles import Profile


def metrics(profile: Profile, setting: claim.Setting | None = None) -> dict:
    """The chapter's numbers (also used by chapter 08's benchmark for its ControlNet side)."""
    s = setting or claim.Setting(profile)
    ident = claim.identity_at_init(profile)
    adh = claim.adherence(profile, s, seed=profile.seed)
    comp = claim.composition(profile, s, seed=profile.seed)
    return {
        "identity_max_abs_diff": ident["max_abs_diff"], "identity_equal": ident["equal"],
        "adherence_by_step": adh["adherence_by_step"],
        "edge_f1_control": adh["edges_control"]["f1"], "edge_f1_base": adh["edges_base"]["f1"],
        "edge_f1_real": adh["edges_real"]["f1"],
        "edge_precision_control": adh["edges_control"]["precision"], "edge_recall_control": adh["edges_control"]["recall"],
        "edge_f1_control_no_caption": adh["edges_control_no_caption"]["f1"],
        "edge_f1_base_no_caption": adh["edges_base_no_caption"]["f1"],
        "caption_accuracy_control": adh["caption_accuracy_control"],
        "caption_accuracy_base": adh["caption_accuracy_base"], "caption_accuracy_real": adh["caption_accuracy_real"],
        "position_accuracy": {k: adh[f"position_accuracy_{k}"] for k in ("base", "control", "real")},
        "composition_f1_edges": comp["both"]["edge_f1"], "composition_depth_error": comp["both"]["depth_error"],
        "composition": {k: comp[k] for k in ("base", "edges", "depth", "both", "real")},
        "n": adh["n"], "sampling_steps": adh["sampling_steps"], "train": adh["train"],
        "controlnet_parameters": ident["parameters"], "base_unet_parameters": ident["base_unet_parameters"],
    }


def run(profile: Profile) -> dict:
    m = metrics(profile)
    print(f"identity at init: max |base - base+ControlNet| = {m['identity_max_abs_diff']} (equal: {m['identity_equal']})")
    print(f"edge F1 ({m['n']} unseen scenes, {m['sampling_steps']} DDIM steps, s={claim.C.GUIDANCE:g}): "
          f"base {m['edge_f1_base']:.3f}, ControlNet {m['edge_f1_control']:.3f} "
          f"(P {m['edge_precision_control']:.3f} R {m['edge_recall_control']:.3f}), real {m['edge_f1_real']:.3f}; "
          f"empty caption: base {m['edge_f1_base_no_caption']:.3f}, ControlNet {m['edge_f1_control_no_caption']:.3f}")
    print(f"caption accuracy: base {m['caption_accuracy_base']:.3f}, ControlNet {m['caption_accuracy_control']:.3f}, "
          f"real {m['caption_accuracy_real']:.3f}")
    print("adherence over training steps:", " ".join(f"{s}:{v:.3f}" for s, v in m["adherence_by_step"]))
    print("composition (edge F1 / depth error): " + ", ".join(
        f"{k} {v['edge_f1']:.3f} / {v['depth_error']:.4f}" for k, v in m["composition"].items()))
    ov = claim.step_overhead(profile, "controlnet")
    print(f"sampling step with ControlNet / without: {ov['ratio']:.3f}")
    print("bars:", claim.verdicts(ch07=m))
    return {"metrics": m, "speed": {"controlnet_step_overhead": ov["ratio"],
                                    "seconds_per_step_base": ov["seconds_per_step_base"]}}
