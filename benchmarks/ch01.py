"""Chapter 01 (DDPM): L_simple vs L_vlb (FD, NLL), the FD references, timings, UNet speed vs diffusers."""

from __future__ import annotations

from speed import unet_fwd_bwd_vs_diffusers

from diffusion_core.experiments import ddpm as claim
from diffusion_core.profiles import Profile
from diffusion_core.recipes.digits import unet_config


def run(profile: Profile) -> dict:
    res = claim.loss_comparison(profile, seed=profile.seed, progress=False)
    refs, rows = res["references"], res["rows"]
    simple, vlb = rows["l_simple"], rows["l_vlb"]
    for name, row in rows.items():
        print(f"{name:9s} FD {row['fd']:.3f} ({row['fd'] / refs['fd_floor']:.2f}x floor)  "
              f"NLL {row['nll_bpd']:.3f} +- {row['nll_stderr']:.3f} bits/dim  "
              f"train {row['train_seconds']} s  sample {row['sample_seconds']:.1f} s ({row['sampling_steps']} steps)")
    print(f"references: floor {refs['fd_floor']:.3f}  blurred {refs['fd_blurred']:.3f}  Gaussian {refs['fd_gaussian']:.3f}"
          f"  classifier accuracy {res['classifier_accuracy']:.4f}")
    width = profile.pick(smoke=16, cpu=32, gpu=64)
    speed = unet_fwd_bwd_vs_diffusers(unet_config(width, dropout=0.0), batch=64, repeats=profile.pick(smoke=3, cpu=10, gpu=20),
                                      device=profile.device)
    print(f"UNet forward+backward: ours {speed['ours_s'] * 1000:.1f} ms, diffusers {speed['diffusers_s'] * 1000:.1f} ms,"
          f" ratio {speed['ratio']:.3f}")
    metrics = {
        "fd_l_simple": simple["fd"], "fd_l_vlb": vlb["fd"],
        "nll_l_simple": simple["nll_bpd"], "nll_l_vlb": vlb["nll_bpd"],
        "nll_stderr_l_simple": simple["nll_stderr"], "nll_stderr_l_vlb": vlb["nll_stderr"],
        "fd_floor": refs["fd_floor"], "fd_gaussian": refs["fd_gaussian"], "fd_blurred": refs["fd_blurred"],
        "fd_l_simple_over_floor": simple["fd"] / refs["fd_floor"],
        "classifier_accuracy": res["classifier_accuracy"],
        "train_seconds": simple["train_seconds"], "sample_seconds": simple["sample_seconds"],
        "train_seconds_vlb": vlb["train_seconds"], "sample_seconds_vlb": vlb["sample_seconds"],
        "sampling_steps": simple["sampling_steps"], "n_samples": simple["n_samples"],
        "trained_now": simple["trained_now"],
    }
    return {"metrics": metrics, "speed": {"unet_fwd_bwd_vs_diffusers": speed["ratio"],
                                          "unet_fwd_bwd_ms": speed["ours_s"] * 1000,
                                          "diffusers_fwd_bwd_ms": speed["diffusers_s"] * 1000}}
