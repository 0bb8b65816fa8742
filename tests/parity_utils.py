"""Helpers of the parity tests against diffusers/transformers: move every weight, compare outputs."""

import torch


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move every parameter (norm scales, biases and zero-initialised layers included) off its initial
    value, so that a parity test compares all of them and none sits at a value that hides a wrong wiring."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
