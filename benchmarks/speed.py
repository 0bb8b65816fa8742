"""Speed of diffusion_core's models against diffusers', with the same weights.

    .venv/bin/python benchmarks/speed.py            # the small UNet of the report, a few runs

Timings interleave the two models (A, B, A, B, ...) after a warm-up so that a noisy, shared
machine slows both alike; each number is a median.
"""

from __future__ import annotations

import statistics
import time

import torch

from diffusion_core.models.unet import UNetConfig, from_diffusers_unet2d


def _fwd_bwd(model, x, t) -> None:
    out = model(x, t)
    if not torch.is_tensor(out):
        out = out.sample
    loss = out.square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_fwd_bwd_vs_diffusers(config: UNetConfig, batch: int, repeats: int = 10, seed: int = 0,
                              device: str | torch.device = "cpu", warmup: int = 2) -> dict:
    """Median seconds of one forward+backward (loss = mean(out^2)) of our UNet2D and of diffusers'
    UNet2DModel built from ``config.to_diffusers_config()`` with the same weights.

    Returns ``{"ours_s", "diffusers_s", "ratio"}`` with ``ratio = ours / diffusers`` (< 1: ours is faster).
    """
    import diffusers

    device = torch.device(device)
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**config.to_diffusers_config()).to(device).train()
    ours = from_diffusers_unet2d(ref).train()
    size = config.sample_size if isinstance(config.sample_size, int) else 32
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)

    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    models = {"ours": ours, "diffusers": ref}
    for i in range(warmup + repeats):
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            _fwd_bwd(model, x, t)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    ours_s, diffusers_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return {"ours_s": ours_s, "diffusers_s": diffusers_s, "ratio": ours_s / diffusers_s}


def small_unet_config() -> UNetConfig:
    """The configuration of the reported ratio: widths (32, 64, 64), attention at 8x8 and 4x4, 16x16 inputs."""
    return UNetConfig(
        sample_size=16, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"widths (32, 64, 64), 16x16, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads")
    cfg = small_unet_config()
    for run in range(args.runs):
        r = unet_fwd_bwd_vs_diffusers(cfg, args.batch, args.repeats, seed=run, device=args.device)
        print(f"run {run}: ours {r['ours_s'] * 1e3:.1f} ms, diffusers {r['diffusers_s'] * 1e3:.1f} ms, "
              f"ratio {r['ratio']:.3f}")
