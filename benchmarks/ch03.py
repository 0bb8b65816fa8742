"""Chapter 03 (DDIM): the FD table over steps x eta with chapter 01's DDPM-trained model (every cell,
the 1000-step references and the floor on the same n samples), DDIM 50 steps against DDPM's 1000-step
ancestral sampler, the reconstruction error of DDIM inversion over the steps, sampling seconds per
image (from the table's own runs), and the DDIM loop against diffusers' DDIMScheduler loop."""

from __future__ import annotations

from speed_samplers import sampler_overhead_vs_diffusers

from diffusion_core import store
from diffusion_core.experiments import ddim as claim
from diffusion_core.profiles import Profile


def run(profile: Profile) -> dict:
    table = claim.fd_table(profile, seed=profile.seed, progress=False)
    T, n, refs = table["T"], table["n"], table["references"]
    spread = table["floor_spread"]
    print(f"FD table, every cell on n = {n} samples from the same x_T; floor at n = {n}: {refs['fd_floor']:.3f} "
          f"(5 draws: {spread['min']:.3f} to {spread['max']:.3f})")
    for row, cells in table["fd_table"].items():
        print(f"  {claim.row_name(row):13s} " + "  ".join(f"S={S}: {v:.3f}" for S, v in cells.items()))
    c = table["claim"]
    print(f"DDIM 50 / DDPM 1000 ({c['reference']}) = {c['fd_ddim50']:.3f} / {c['fd_ddpm1000']:.3f} = {c['ratio']:.3f}"
          + "".join(f"; vs {k} {v:.3f}" for k, v in c["ratios"].items())
          + f"; 90% paired bootstrap interval {c['interval'][0]:.3f} to {c['interval'][1]:.3f}")
    stored = store.load(claim.MODEL, profile)
    recon = claim.reconstruction_error(stored, claim.inversion_images(profile), claim.inversion_steps(profile))
    print("inversion MSE: " + "  ".join(f"S={S}: {r['mse']:.5f}" for S, r in recon.items()))
    sec = table["seconds"]
    # DDPM's 1000-step ancestral sampler: the eta = 1, S = T cell (fixed-small variance, the same computation)
    speed = {"ddpm_1000_s_per_image": sec[1.0][T] / n,
             "ddim_50_s_per_image": sec[0.0][50] / n, "ddim_10_s_per_image": sec[0.0][10] / n,
             "speed_batch": table["batch"], "table_sampling_seconds": sum(sum(r.values()) for r in sec.values())}
    overhead = sampler_overhead_vs_diffusers(steps=profile.pick(smoke=100, cpu=1000, gpu=1000), batch=16, size=32,
                                             repeats=profile.pick(smoke=2, cpu=5, gpu=5), sampler="ddim",
                                             device=profile.device)
    speed.update({"sampler_overhead_vs_diffusers": overhead["ratio"], "sampler_loop_ms": overhead["ours_s"] * 1000,
                  "diffusers_loop_ms": overhead["diffusers_s"] * 1000})
    print(f"seconds per image (batch {table['batch']}, bf16 where available): DDPM 1000 "
          f"{speed['ddpm_1000_s_per_image']:.4f}, DDIM 50 {speed['ddim_50_s_per_image']:.4f}, DDIM 10 "
          f"{speed['ddim_10_s_per_image']:.4f}; DDIM loop vs diffusers {overhead['ratio']:.3f}")
    metrics = {
        "fd_table": table["fd_table"], "n_samples": n, "steps": list(table["steps"]),
        "ddim50_over_ddpm1000": c["ratio"], "ddpm1000_reference": c["reference"],
        "ddim50_over_ddpm1000_interval90": list(c["interval"]),
        **{f"ddim50_over_ddpm1000_{k}": v for k, v in c["ratios"].items()},
        "fd_ddim50": c["fd_ddim50"], "fd_ddpm1000": c["fd_ddpm1000"],
        "fd_floor": refs["fd_floor"], "fd_floor_min": spread["min"], "fd_floor_max": spread["max"],
        "fd_blurred": refs["fd_blurred"], "fd_gaussian": refs["fd_gaussian"],
        "inversion_mse": {S: r["mse"] for S, r in recon.items()},
        "train_seconds": table["train_seconds"], "trained_now": table["trained_now"],
    }
    return {"metrics": metrics, "speed": speed}
