"""Interpolating between latents x_T (chapter 03, DDIM Sec. 5.3).

Because DDIM with eta = 0 maps x_T to x_0 deterministically, interpolating between two x_T gives a
path of images. A straight line is a poor path: for x_T ~ N(0, I) in d dimensions, ||x_T|| is
close to sqrt(d), but the midpoint of two independent draws has norm close to sqrt(d / 2), a point
the sampler never saw. DDIM therefore uses spherical linear interpolation (Shoemake 1985, as used for
GAN latents by White 2016):

    theta = arccos( <z0, z1> / (||z0|| ||z1||) )
    slerp(z0, z1; alpha) = sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1

which moves along the great circle and keeps the norm when ||z0|| = ||z1||.

Shapes: z0 and z1 have the same shape. A 1-D z is one vector; for z of shape (B, ...) each of the B
rows is one vector (theta per row). ``alpha`` is a number, giving the shape of z, or a 1-D tensor
(N,) of N alphas, which broadcasts against the rows: (1, ...) latents and N alphas give (N, ...), the
batch a sampler takes; a 1-D z and N alphas give (N, d).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _prepare(z0: torch.Tensor, z1: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    if not (torch.is_tensor(z0) and torch.is_tensor(z1)):
        raise TypeError("z0 and z1 must be tensors")
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if z0.ndim == 0:
        raise ValueError("z0 and z1 must have at least one dimension")
    dtype = z0.dtype if z0.is_floating_point() else torch.float32
    a = torch.as_tensor(alpha, dtype=dtype, device=z0.device)
    if a.numel() and not bool(torch.isfinite(a).all()):
        raise ValueError(f"alpha must be finite, got {a.tolist()}")
    if a.ndim > 1:
        raise ValueError(f"alpha must be a number or a 1-D tensor of alphas, got shape {tuple(a.shape)}")
    # rows: (R, D) with R = 1 for a single vector
    single = z0.ndim == 1
    r0 = z0.reshape(1, -1).to(dtype) if single else z0.reshape(z0.shape[0], -1).to(dtype)
    r1 = z1.reshape(1, -1).to(dtype) if single else z1.reshape(z1.shape[0], -1).to(dtype)
    R, N = r0.shape[0], a.numel()
    if a.ndim == 1 and R != 1 and N != 1 and R != N:
        raise ValueError(f"{N} alphas cannot broadcast against {R} rows of z (need N = B, N = 1 or B = 1)")
    rows = max(R, N) if a.ndim == 1 else R
    if single:
        out_shape = (z0.shape[0],) if a.ndim == 0 else (rows, z0.shape[0])
    else:
        out_shape = (rows, *z0.shape[1:])
    return r0, r1, a.reshape(-1, 1), out_shape


def lerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Linear interpolation (1 - alpha) z0 + alpha z1, with the shapes of the module docstring."""
    r0, r1, a, out_shape = _prepare(z0, z1, alpha)
    return ((1.0 - a) * r0 + a * r1).reshape(out_shape)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor,
          eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation (DDIM Sec. 5.3), with the shapes of the module docstring:

        slerp(z0, z1; alpha) = sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1

    alpha = 0 gives z0 and alpha = 1 gives z1. Where z0 and z1 are (nearly) parallel or opposite
    (sin theta < eps), the great circle is undefined and the rows fall back to :func:`lerp`.
    """
    r0, r1, a, out_shape = _prepare(z0, z1, alpha)
    norms = r0.norm(dim=1, keepdim=True) * r1.norm(dim=1, keepdim=True)
    # theta = arccos( <z0, z1> / (||z0|| ||z1||) ), per row
    cos = ((r0 * r1).sum(dim=1, keepdim=True) / norms.clamp_min(torch.finfo(r0.dtype).tiny)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    degenerate = sin < eps
    safe_sin = torch.where(degenerate, torch.ones_like(sin), sin)
    w0 = torch.where(degenerate, 1.0 - a, torch.sin((1.0 - a) * theta) / safe_sin)
    w1 = torch.where(degenerate, a, torch.sin(a * theta) / safe_sin)
    return (w0 * r0 + w1 * r1).reshape(out_shape)
