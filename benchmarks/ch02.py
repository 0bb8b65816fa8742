"""Chapter 02 (Improved DDPM): FD over the number of sampling steps K for fixed-small, fixed-large and
learned variance (every K on the same samples, the floor at that count); the bound (bits/dim) for
L_simple vs L_hybrid and linear vs cosine; skipping the start of the reverse process per schedule;
sampling seconds per image; the sampler loop against diffusers'."""

from __future__ import annotations

import time

from speed_samplers import sampler_overhead_vs_diffusers

from diffusion_core import store
from diffusion_core.evaluate.digits import digit_evaluator
from diffusion_core.experiments import improved as claim
from diffusion_core.profiles import Profile


def run(profile: Profile) -> dict:
    evaluator = digit_evaluator(profile)
    start = time.perf_counter()
    trained = {name: store.load(name, profile) for name in claim.SCHEDULE_MODELS.values()}   # train first, timed apart
    train_wall = time.perf_counter() - start
    for name, s in trained.items():
        print(f"{name}: {'trained now' if s.trained_now else 'from the store'}, train {s.metrics.get('train_seconds')} s,"
              f" final loss {s.metrics.get('final_loss')}")

    start = time.perf_counter()
    sweep = claim.fd_vs_steps(profile, seed=profile.seed, progress=False, evaluator=evaluator)
    sweep_wall = time.perf_counter() - start
    refs, steps, n = sweep["references"], sweep["steps"], sweep["n"]
    print(f"FD over K, {n} samples per cell (the same x_T for every cell), bf16 sampling: {sweep['amp']}")
    print(f"  references at n = {n}: floor {refs['fd_floor']:.3f}  blurred {refs['fd_blurred']:.3f}"
          f"  Gaussian {refs['fd_gaussian']:.3f}; floor over 10 sets of {n} real digits: "
          f"{sweep['floor_spread']['mean']:.3f} +- {sweep['floor_spread']['sd']:.3f} (sd)")
    for name in claim.SAMPLERS:
        print(f"  {name:12s} " + "  ".join(f"K={K}: {sweep['fd_by_steps'][name][K]:.3f}" for K in steps))
    for pair, row in sweep["paired"].items():
        print(f"  {pair}, FD difference [90% paired bootstrap] (fraction of replicates learned lower): "
              + "  ".join(f"K={K}: {d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"
                          f" ({d['p_lower']:.2f})" for K, d in row.items()))

    start = time.perf_counter()
    skip = claim.skip_prefix(profile, seed=profile.seed, evaluator=evaluator)
    skip_wall = time.perf_counter() - start
    for schedule, row in skip["fd"].items():
        print(f"skip the first f of the reverse process, {schedule}: "
              + "  ".join(f"f={f:g}: {v:.3f} (alpha_bar {skip['alpha_bar_at_start'][schedule][f]:.1e})"
                          for f, v in row.items()) + f"  ({skip['n']} samples, {skip['K']} steps)")

    start = time.perf_counter()
    nll = claim.nll_comparison(profile, seed=profile.seed)
    nll_wall = time.perf_counter() - start
    E = nll["settings"]["exact"]
    for label, row in nll["rows"].items():
        print(f"NLL {label:30s} {row['nll_bpd']:.4f} +- {row['nll_stderr']:.4f} bits/dim  (decoder L_0 "
              f"{row['decoder']:.4f}, L_1..L_{E - 1} {row['first']:.4f}, last {E} {row['last']:.4f}, of which "
              f"L_T-1 {row['final_step']:.4f})")
    for name, d in nll["differences"].items():
        print(f"  {name}: {d['mean']:+.4f} +- {d['stderr']:.4f} (paired)")
    print(f"  settings {nll['settings']}")

    overhead = sampler_overhead_vs_diffusers(steps=profile.pick(smoke=100, cpu=1000, gpu=1000), batch=16, size=32,
                                             repeats=profile.pick(smoke=2, cpu=5, gpu=5), sampler="ddpm_sample",
                                             device=profile.device)
    T = max(steps)
    per_image = {f"learned_{K}_steps_s_per_image": sweep["seconds"]["learned"][K] / n for K in (min(steps), 50, T)
                 if K in steps}
    print(f"sampling seconds per image (learned variance, bf16 {sweep['amp']}): {per_image}; "
          f"loop overhead vs diffusers: {overhead['ratio']:.3f}")
    print(f"wall seconds: train {train_wall:.0f}, FD sweep {sweep_wall:.0f}, skip {skip_wall:.0f}, NLL {nll_wall:.0f}")
    metrics = {
        "fd_by_steps": sweep["fd_by_steps"], "n_samples": n, "bf16_sampling": sweep["amp"],
        "fd_paired": sweep["paired"],
        "fd_floor": refs["fd_floor"], "fd_blurred": refs["fd_blurred"], "fd_gaussian": refs["fd_gaussian"],
        "fd_floor_sd": sweep["floor_spread"]["sd"], "fd_floor_mean_of_10": sweep["floor_spread"]["mean"],
        "nll": {label: row["nll_bpd"] for label, row in nll["rows"].items()},
        "nll_stderr": {label: row["nll_stderr"] for label, row in nll["rows"].items()},
        "nll_parts": {label: {k: row[k] for k in ("decoder", "first", "middle", "last", "final_step", "prior")}
                      for label, row in nll["rows"].items()},
        **{f"nll_{k}": d["mean"] for k, d in nll["differences"].items()},
        **{f"nll_{k}_stderr": d["stderr"] for k, d in nll["differences"].items()},
        "nll_settings": nll["settings"],
        "fd_skip_prefix": skip["fd"], "skip_prefix_alpha_bar": skip["alpha_bar_at_start"],
        "train": {name: {"train_seconds": s.metrics.get("train_seconds"), "trained_now": s.trained_now,
                         "final_loss": s.metrics.get("final_loss")} for name, s in trained.items()},
    }
    speed = {**per_image, "sample_batch": n, "sampler_overhead_vs_diffusers": overhead["ratio"],
             "sampler_loop_ms": overhead["ours_s"] * 1000, "diffusers_loop_ms": overhead["diffusers_s"] * 1000,
             "wall_seconds": {"train": train_wall, "fd_sweep": sweep_wall, "skip_prefix": skip_wall, "nll": nll_wall}}
    return {"metrics": metrics, "speed": speed}
