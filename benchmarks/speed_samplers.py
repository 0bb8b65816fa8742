"""The sampler loop's own cost: ours against diffusers' scheduler loop, with a trivial model.

    .venv/bin/python benchmarks/speed_samplers.py                 # 1000 steps, batch 16 of 3x32x32

With ``model(x, t) = 0.1 x`` the network costs almost nothing, so the time is the loop: computing the
per-step coefficients, the few elementwise operations of the update, drawing noise. Timings
interleave the two loops (A, B, A, B, ...) after a warm-up so that a noisy, shared machine slows both
alike; each number is a median.

Samplers compared (the same number of steps and the same spacing on both sides):

    ddim         ddim_sample (chapter 03)               vs  DDIMScheduler.step loop, eta = 0, no clipping
    ddim-eta1    ddim_sample, eta = 1                   vs  DDIMScheduler.step loop, eta = 1, no clipping
    ddpm         DDPMEquivalent.sample (schedulers.py)  vs  DDPMScheduler.step loop
    ddpm_sample  ddpm_sample on the respaced process    vs  DDPMScheduler.step loop
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from diffusion_core.process.respacing import space_timesteps
from diffusion_core.samplers import ddim_sample, ddpm_sample
from diffusion_core.schedulers import from_diffusers_ddim_scheduler, from_diffusers_ddpm_scheduler

SAMPLERS = ("ddim", "ddim-eta1", "ddpm", "ddpm_sample")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trivial_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x


def _loops(sampler: str, steps: int, x: torch.Tensor, seed: int) -> dict[str, Callable[[], torch.Tensor]]:
    import diffusers

    dev = x.device
    gen_device = "cuda" if dev.type == "cuda" else "cpu"

    def gen() -> torch.Generator:
        return torch.Generator(gen_device).manual_seed(seed)

    if sampler.startswith("ddim"):
        eta = 1.0 if sampler == "ddim-eta1" else 0.0
        # no clipping on either side: ddim_sample re-derives eps_hat after clipping and diffusers does
        # not, so only without it do the two compute the same numbers
        sched = diffusers.DDIMScheduler(clip_sample=False)
        diffusion = from_diffusers_ddim_scheduler(sched).diffusion
        tau = space_timesteps(diffusion.T, steps, "leading")

        def ours() -> torch.Tensor:
            return ddim_sample(_trivial_model, diffusion, x, eta=eta, timesteps=tau, clip_denoised=False,
                               generator=gen(), progress=False)

        def theirs() -> torch.Tensor:
            sched.set_timesteps(steps, device=dev)
            g, y = gen(), x
            for t in sched.timesteps:
                y = sched.step(_trivial_model(y, t), t, y, eta=eta, generator=g).prev_sample
            return y
    else:
        sched = diffusers.DDPMScheduler()
        eq = from_diffusers_ddpm_scheduler(sched)
        if sampler == "ddpm":
            def ours() -> torch.Tensor:
                return eq.sample(_trivial_model, x, steps, generator=gen())
        else:
            def ours() -> torch.Tensor:
                return ddpm_sample(_trivial_model, eq.process(steps), x, generator=gen(), progress=False)

        def theirs() -> torch.Tensor:
            sched.set_timesteps(steps, device=dev)
            g, y = gen(), x
            for t in sched.timesteps:
                y = sched.step(_trivial_model(y, t), t, y, generator=g).prev_sample
            return y
    return {"ours": ours, "diffusers": theirs}


def sampler_overhead_vs_diffusers(steps: int = 1000, batch: int = 16, size: int = 32, repeats: int = 5,
                                  sampler: str = "ddpm", device: str | torch.device = "cpu", warmup: int = 1,
                                  seed: int = 0) -> dict:
    """Median seconds of a whole ``steps``-step sampling loop with ``model(x, t) = 0.1 x`` on a batch
    (batch, 3, size, size), ours against diffusers' scheduler loop (``sampler`` in SAMPLERS).

    Returns ``{"ours_s", "diffusers_s", "ratio", "max_rel_diff"}`` with ``ratio = ours / diffusers``
    (< 1: ours is faster) and the largest difference between the two final samples over the largest
    |value| of diffusers' (float32 rounding: see tests/test_parity_schedulers.py).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    device = torch.device(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    loops = _loops(sampler, steps, x, seed)
    times: dict[str, list[float]] = {name: [] for name in loops}
    outs: dict[str, torch.Tensor] = {}
    for i in range(warmup + repeats):
        for name, loop in loops.items():
            _sync(device)
            start = time.perf_counter()
            outs[name] = loop()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    ours_s, diffusers_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return {"ours_s": ours_s, "diffusers_s": diffusers_s, "ratio": ours_s / diffusers_s,
            "max_rel_diff": ((outs["ours"] - outs["diffusers"]).abs().max() / outs["diffusers"].abs().max()).item()}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.steps} steps, batch {args.batch}x3x{args.size}x{args.size}, {args.device}, "
          f"{torch.get_num_threads()} threads, model(x, t) = 0.1 x")
    for name in args.samplers.split(","):
        r = sampler_overhead_vs_diffusers(args.steps, args.batch, args.size, args.repeats, name, args.device)
        print(f"{name:12s} ours {r['ours_s'] * 1e3:8.1f} ms   diffusers {r['diffusers_s'] * 1e3:8.1f} ms   "
              f"ratio {r['ratio']:.3f}   max rel diff {r['max_rel_diff']:.1e}")
