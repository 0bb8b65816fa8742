"""Speed of the conditional UNet and the KL autoencoder against diffusers', with the same weights.

    .venv/bin/python benchmarks/speed_cond.py            # the mid-size configs of the report

Forward + backward (loss = mean(out^2)); the two models alternate (A, B, A, B, ...) after a
warm-up so that a noisy, shared machine slows both alike; each number is a median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from diffusion_core.models.unet_cond import CondUNetConfig, from_diffusers_unet_2d_condition
from diffusion_core.models.vae import VAEConfig, from_diffusers_autoencoder_kl


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(steps: dict[str, Callable[[], torch.Tensor]], models: dict[str, torch.nn.Module],
                 repeats: int, warmup: int, device: torch.device) -> dict:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step().square().mean().backward()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            models[name].zero_grad(set_to_none=True)
    ours_s, diffusers_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return {"ours_s": ours_s, "diffusers_s": diffusers_s, "ratio": ours_s / diffusers_s}


def cond_unet_fwd_bwd_vs_diffusers(config: CondUNetConfig, batch: int, repeats: int = 10, seed: int = 0,
                                   device: str | torch.device = "cpu", warmup: int = 2, tokens: int = 8) -> dict:
    """Median seconds of one forward+backward of our UNet2DCondition and of diffusers'
    UNet2DConditionModel (same config, same weights), on ``(batch, C, sample_size, sample_size)``
    latents with ``tokens`` context tokens.

    Returns ``{"ours_s", "diffusers_s", "ratio"}``, ``ratio = ours / diffusers`` (< 1: ours is faster).
    """
    import diffusers

    device = torch.device(device)
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config.to_diffusers_config()).to(device).train()
    ours = from_diffusers_unet_2d_condition(ref).train()
    g = torch.Generator().manual_seed(seed)
    s = config.sample_size
    x = torch.randn(batch, config.in_channels, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = (torch.randn(batch, tokens, config.cross_attention_dim, generator=g).to(device)
           if config.cross_attention_dim is not None else None)
    labels = (torch.randint(0, config.num_class_embeds, (batch,), generator=g).to(device)
              if config.num_class_embeds else None)
    steps = {
        "ours": lambda: ours(x, t, ctx, class_labels=labels),
        "diffusers": lambda: ref(x, t, ctx, class_labels=labels).sample,
    }
    return _interleaved(steps, {"ours": ours, "diffusers": ref}, repeats, warmup, device)


def vae_fwd_bwd_vs_diffusers(config: VAEConfig, batch: int, repeats: int = 10, seed: int = 0,
                             device: str | torch.device = "cpu", warmup: int = 2) -> dict:
    """As :func:`cond_unet_fwd_bwd_vs_diffusers` for the autoencoder: encode, take the posterior
    mean, decode, on ``(batch, C, sample_size, sample_size)`` images."""
    import diffusers

    device = torch.device(device)
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**config.to_diffusers_config()).to(device).train()
    ours = from_diffusers_autoencoder_kl(ref).train()
    g = torch.Generator().manual_seed(seed)
    s = config.sample_size
    x = torch.randn(batch, config.in_channels, s, s, generator=g).to(device)
    steps = {
        "ours": lambda: ours(x),
        "diffusers": lambda: ref(x).sample,
    }
    return _interleaved(steps, {"ours": ours, "diffusers": ref}, repeats, warmup, device)


def mid_unet_config() -> CondUNetConfig:
    """The reported UNet: widths (32, 64, 64), cross-attention (dim 64, 4 heads) at 32x32 and 16x16
    and in the middle, 32x32 latents."""
    return CondUNetConfig(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=64, num_attention_heads=4, norm_num_groups=16,
    )


def mid_vae_config() -> VAEConfig:
    """The reported autoencoder: f = 4, widths (32, 64, 64), 64x64 images."""
    return VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                     norm_num_groups=16, sample_size=64)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is far steadier on a shared, oversubscribed machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for label, fn, cfg in (("unet", cond_unet_fwd_bwd_vs_diffusers, mid_unet_config()),
                           ("vae", vae_fwd_bwd_vs_diffusers, mid_vae_config())):
        for run in range(args.runs):
            r = fn(cfg, args.batch, args.repeats, seed=run, device=args.device)
            print(f"{label} run {run}: ours {r['ours_s'] * 1e3:.1f} ms, diffusers {r['diffusers_s'] * 1e3:.1f} ms, "
                  f"ratio {r['ratio']:.3f}", flush=True)
