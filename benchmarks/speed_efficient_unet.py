"""Speed and memory of Imagen's Efficient U-Net options (Saharia et al. 2022, App. B.1), chapter 13.

    .venv/bin/python benchmarks/speed_efficient_unet.py --threads 1        # the report's numbers

One small pixel text-conditional UNet of the IF family (32x32x3, widths (32, 64, 128), added-K/V
attention at 16x16 and 8x8, AdaGN, GELU), built five ways with :class:`CondUNetConfig` options:

* ``regular``: ``layers_per_block=(2, 2, 2)``, the standard order;
* ``layers``: the parameters moved to lower resolutions, ``(1, 3, 2)``, standard order;
* ``skip_scale``: the regular UNet with its skips times ``1/sqrt(2)`` (costs one multiply);
* ``downsample_first``: the regular UNet with every down block resampling before its residual blocks;
* ``efficient``: all three, ``(1, 4, 1)``, chosen to have about the regular UNet's parameter count.

For each: parameters; forward+backward FLOPs (``torch.utils.flop_counter``, exact); the activation
memory kept for backward (the bytes of the distinct non-parameter tensors autograd saves, through
``torch.autograd.graph.saved_tensors_hooks``: exact, and what a training step's peak grows with);
on CUDA also the peak allocated memory of a step; and the median seconds of one forward+backward
(loss ``mean(out^2)``). The variants run interleaved (each repeat visits them all, in a rotated
order) after a warm-up, so that a shared machine slows them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion_core.models.unet_cond import CondUNetConfig, UNet2DCondition

BASE: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=64, attention_head_dim=32,
    norm_num_groups=8, resnet_time_scale_shift="scale_shift", act_fn="gelu",
)

VARIANTS: dict[str, dict[str, Any]] = {
    "regular": dict(layers_per_block=(2, 2, 2)),
    "layers": dict(layers_per_block=(1, 3, 2)),
    "skip_scale": dict(layers_per_block=(2, 2, 2), skip_scale=2 ** -0.5),
    "downsample_first": dict(layers_per_block=(2, 2, 2), downsample_first=True),
    "efficient": dict(layers_per_block=(1, 4, 1), skip_scale=2 ** -0.5, downsample_first=True),
}


def config(name: str) -> CondUNetConfig:
    return CondUNetConfig(**{**BASE, **VARIANTS[name]})


def saved_activation_bytes(model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``step()``, the model's
    parameters left out: the activations a training step holds at its peak, besides parameters and
    gradients."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())


def fwd_bwd_flops(model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(batch: int = 4, repeats: int = 10, warmup: int = 2, device: str | torch.device = "cpu",
            seed: int = 0, tokens: int = 8, names: tuple[str, ...] = tuple(VARIANTS),
            size: int = BASE["sample_size"]) -> dict[str, dict[str, float]]:
    """``{variant: {"params", "gflops_fwd_bwd", "saved_mb", "peak_mb" (CUDA), "seconds"}}`` for
    ``(batch, 3, size, size)`` images (``size`` a multiple of 8)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, BASE["in_channels"], size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, tokens, BASE["cross_attention_dim"], generator=g).to(device)
    models, steps, out = {}, {}, {}
    for name in names:
        torch.manual_seed(seed)
        models[name] = m = UNet2DCondition(config(name)).to(device).train()
        steps[name] = (lambda m=m: m(x, t, ctx))
        out[name] = {"params": sum(p.numel() for p in m.parameters()),
                     "gflops_fwd_bwd": fwd_bwd_flops(m, steps[name]) / 1e9,
                     "saved_mb": saved_activation_bytes(m, steps[name]) / 2 ** 20}
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: no variant always runs first
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            steps[name]().square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[name].append(torch.cuda.max_memory_allocated(device) / 2 ** 20)
            models[name].zero_grad(set_to_none=True)
    for name in names:
        out[name]["seconds"] = statistics.median(times[name])
        if peaks[name]:
            out[name]["peak_mb"] = statistics.median(peaks[name])
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    ref = results.get("regular")
    lines = [f"{'variant':18s} {'layers':10s} {'params':>9s} {'GFLOP f+b':>10s} {'saved MB':>9s} "
             f"{'peak MB':>8s} {'ms f+b':>8s} {'time/reg':>8s}"]
    for name, r in results.items():
        rel = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        peak = f"{r['peak_mb']:.1f}" if "peak_mb" in r else "-"
        lines.append(f"{name:18s} {str(VARIANTS[name]['layers_per_block']):10s} {r['params']:9,d} "
                     f"{r['gflops_fwd_bwd']:10.3f} {r['saved_mb']:9.1f} {peak:>8s} {1e3 * r['seconds']:8.1f} {rel:>8s}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=BASE["sample_size"], help="image size (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3, help="independent interleaved runs, each printed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is far steadier on a shared, oversubscribed machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}: batch {args.batch}, {args.size}x{args.size}, {args.repeats} interleaved "
              f"repeats, {args.device}")
        print(table(measure(args.batch, args.repeats, device=args.device, seed=run, size=args.size)))
