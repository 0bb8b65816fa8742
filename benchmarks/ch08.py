"""Chapter 08 (T2I-Adapter): adherence of adapters trained at the ControlNets' budget against the ControlNet, the
parameter ratio (ours and the full-size presets), per-step sampling overhead of each, two adapters composed with
weights, the palette condition, features computed once."""

from __future__ import annotations

from diffusion_core import presets
from diffusion_core.experiments import control as claim
from diffusion_core.profiles import Profile


def run(profile: Profile) -> dict:
    r = claim.adapter_report(profile, seed=profile.seed)
    ov_a = claim.step_overhead(profile, "adapter")
    ov_c = claim.step_overhead(profile, "controlnet")
    full = {name: presets.count_parameters(presets.build(name)) for name in ("t2i-adapter-sd15", "controlnet-sd15")}
    m = {
        "edge_f1_adapter": r["adapter"]["edge_f1"], "edge_f1_controlnet": r["controlnet"]["edge_f1"],
        "edge_f1_base": r["base"]["edge_f1"], "edge_f1_real": r["real"]["edge_f1"],
        "params_adapter": r["params"]["adapter"], "params_controlnet": r["params"]["controlnet"],
        "params_full_adapter": full["t2i-adapter-sd15"], "params_full_controlnet": full["controlnet-sd15"],
        "adapter_step_overhead": ov_a["ratio"], "controlnet_step_overhead": ov_c["ratio"],
        "composition_f1_edges": r["edges_and_palette"]["edge_f1"],
        "composition_palette_error": r["edges_and_palette"]["palette_error"],
        "palette_error_adapter": r["palette"]["palette_error"], "palette_error_base": r["base"]["palette_error"],
        "palette_error_real": r["real"]["palette_error"],
        "depth_error_adapter": r["adapter_depth"]["depth_error"], "depth_error_base": r["base"]["depth_error"],
        "caption_accuracy": {k: r[k]["caption_accuracy"] for k in ("base", "adapter", "controlnet", "palette", "real")},
        "train": r["train"], "adherence_by_step": r["adherence_by_step"], "n": r["n"],
        "features_once_max_abs_diff": r["features_once"]["max_abs_diff"],
    }
    m["params_ratio"] = m["params_adapter"] / m["params_controlnet"]
    m["params_full_ratio"] = m["params_full_adapter"] / m["params_full_controlnet"]
    m["train_time_ratio"] = r["train"]["adapter"]["train_seconds"] / r["train"]["controlnet"]["train_seconds"]
    print(f"edge F1 ({m['n']} scenes): base {m['edge_f1_base']:.3f}, T2I-Adapter {m['edge_f1_adapter']:.3f}, "
          f"ControlNet {m['edge_f1_controlnet']:.3f} (same steps and batch), real {m['edge_f1_real']:.3f}")
    print(f"training: adapter {r['train']['adapter']}, ControlNet {r['train']['controlnet']}")
    print(f"parameters: adapter {m['params_adapter']:,} vs ControlNet {m['params_controlnet']:,} "
          f"({m['params_adapter'] / m['params_controlnet']:.3f}); full size {m['params_full_adapter']:,} vs "
          f"{m['params_full_controlnet']:,} ({m['params_full_adapter'] / m['params_full_controlnet']:.3f})")
    print(f"sampling step overhead: adapter {m['adapter_step_overhead']:.3f}, ControlNet {m['controlnet_step_overhead']:.3f}")
    print(f"palette error: base {m['palette_error_base']:.4f}, palette adapter {m['palette_error_adapter']:.4f}, "
          f"real {m['palette_error_real']:.4f}; depth error: base {m['depth_error_base']:.4f}, "
          f"depth adapter {m['depth_error_adapter']:.4f}")
    print(f"edges + palette adapters (weights {r['weights']}): edge F1 {m['composition_f1_edges']:.3f}, "
          f"palette error {m['composition_palette_error']:.4f}")
    print("caption accuracy:", {k: round(v, 3) for k, v in m["caption_accuracy"].items()})
    print("bars:", claim.verdicts(ch08=m))
    return {"metrics": m, "speed": {"adapter_step_overhead": ov_a["ratio"], "controlnet_step_overhead": ov_c["ratio"]}}
