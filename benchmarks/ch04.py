"""Chapter 04 (Latent Diffusion): FD and train/sample seconds for f in {1, 2, 4, 8} at an equal compute budget
and at an equal number of steps,
caption accuracy of text-to-image, speed of the conditional UNet and the autoencoder against diffusers,
and the cost of one sampling step in the f = 4 latent space relative to pixel space."""

from __future__ import annotations

from speed_cond import (
    cond_unet_fwd_bwd_vs_diffusers,
    mid_unet_config,
    mid_vae_config,
    vae_fwd_bwd_vs_diffusers,
)

from diffusion_core.experiments import latent as claim
from diffusion_core.profiles import Profile


def run(profile: Profile) -> dict:
    sweep = claim.f_sweep(profile, seed=profile.seed, progress=False)
    refs = sweep["references"]
    for f, row in sweep["rows"].items():
        print(f"f={f}: latent {row['latent_shape']}  FD {row['fd']:.3f} (autoencoder {row['fd_autoencoder']:.3f})  "
              f"train {row['train_seconds']} s for {row['train_steps']} steps x {row['batch_size']}  "
              f"sample {row['sample_seconds_per_image'] * 1000:.1f} ms/image ({row['sampling_steps']} DDIM steps)")
    print(f"references: floor {refs['fd_floor']:.3f}  blurred {refs['fd_blurred']:.3f}  Gaussian {refs['fd_gaussian']:.3f}")
    steps_sweep = claim.f_sweep(profile, seed=profile.seed, progress=False, equal="steps")
    for f, row in steps_sweep["rows"].items():
        print(f"equal steps, f={f}: FD {row['fd']:.3f}  train {row['train_seconds']} s for {row['train_steps']} steps")
    t2i = claim.text_to_image(profile, seed=profile.seed, progress=False)
    for s, row in t2i["rows"].items():
        print(f"text-to-image, guidance {s:g}: caption accuracy {row['accuracy']['caption']:.3f} "
              f"(shuffled captions {row['shuffled']['caption']:.3f}), per attribute "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["accuracy"].items() if k != "caption")
              + f"; FD {row['fd']:.3f}")
    print(f"real images: caption accuracy {t2i['real']['caption']:.3f}; FD floor (one-object scenes, "
          f"n = {t2i['n']}) {t2i['fd_floor']:.3f}")
    repeats = profile.pick(smoke=3, cpu=10, gpu=20)
    unet = cond_unet_fwd_bwd_vs_diffusers(mid_unet_config(), batch=2, repeats=repeats, device=profile.device)
    vae = vae_fwd_bwd_vs_diffusers(mid_vae_config(), batch=2, repeats=repeats, device=profile.device)
    step = claim.step_cost(profile)
    step_amp = claim.step_cost(profile, mixed_precision=True)
    print(f"UNet2DCondition fwd+bwd vs diffusers: {unet['ratio']:.3f}; AutoencoderKL: {vae['ratio']:.3f}; "
          f"one sampling step f=4 / pixel: {step['ratio']:.3f} in float32 ({step['latent_s'] * 1000:.1f} / "
          f"{step['pixel_s'] * 1000:.1f} ms), {step_amp['ratio']:.3f} under mixed precision")
    rows = sweep["rows"]
    guided = max(t2i["rows"])
    metrics = {
        "fd_by_f": {f: r["fd"] for f, r in rows.items()},
        "fd_autoencoder_by_f": {f: r["fd_autoencoder"] for f, r in rows.items()},
        "seconds_by_f": {f: {"train": r["train_seconds"], "train_compute": r["train_compute_seconds"],
                             "encode": r["encode_seconds"],
                             "sample_per_image": r["sample_seconds_per_image"]} for f, r in rows.items()},
        "train_steps_by_f": {f: r["train_steps"] for f, r in rows.items()},
        "fd_by_f_equal_steps": {f: r["fd"] for f, r in steps_sweep["rows"].items()},
        "train_seconds_by_f_equal_steps": {f: r["train_seconds"] for f, r in steps_sweep["rows"].items()},
        "equal_steps": steps_sweep["rows"][1]["train_steps"],
        "budget_seconds": rows[1]["budget_seconds"], "batch_size": rows[1]["batch_size"],
        "sampling_steps": rows[1]["sampling_steps"], "n_samples": rows[1]["n_samples"],
        "fd_floor": refs["fd_floor"], "fd_blurred": refs["fd_blurred"], "fd_gaussian": refs["fd_gaussian"],
        "caption_accuracy": t2i["rows"][1.0]["accuracy"]["caption"],
        "caption_accuracy_guided": t2i["rows"][guided]["accuracy"]["caption"],
        "guidance_scale": guided,
        "caption_accuracy_by_attribute": t2i["rows"][1.0]["accuracy"],
        "caption_accuracy_shuffled": t2i["rows"][1.0]["shuffled"]["caption"],
        "caption_accuracy_real": t2i["real"]["caption"],
        "t2i_fd_by_scale": {s: r["fd"] for s, r in t2i["rows"].items()}, "t2i_fd_floor": t2i["fd_floor"],
        "t2i_n": t2i["n"],
        "t2i_train_seconds": t2i["train_seconds"], "t2i_train_steps": t2i["train_steps"],
        "trained_now": any(r["trained_now"] for r in [*rows.values(), *steps_sweep["rows"].values()]) or t2i["trained_now"],
    }
    speed = {"cond_unet_fwd_bwd_vs_diffusers": unet["ratio"], "vae_fwd_bwd_vs_diffusers": vae["ratio"],
             "latent_vs_pixel_step_cost": step["ratio"],
             "latent_step_ms": step["latent_s"] * 1000, "pixel_step_ms": step["pixel_s"] * 1000,
             "latent_vs_pixel_step_cost_mixed_precision": step_amp["ratio"],
             "cond_unet_fwd_bwd_ms": unet["ours_s"] * 1000, "vae_fwd_bwd_ms": vae["ours_s"] * 1000}
    return {"metrics": metrics, "speed": speed}
