"""The generation loop that chapters 01-06's experiments share: batches of x_T through a sampler under
the profile's mixed precision, the results in float32 on the CPU, optionally decoded, concatenated.

Each experiment keeps only what is its own: which sampler (ancestral, DDIM, guided DDIM), where its
noise comes from, its condition and its decoder. :func:`generate` owns the rest, in one order that
every caller's numbers depend on, batch by batch:

1. the condition of images i..j-1 (``condition(i, j)``: labels moved to the device, caption states),
   outside autocast;
2. x_T for them: a slice of an x_T drawn beforehand, or ``x_T(j - i)`` drawn now (:func:`gaussian`);
3. the sampler, ``sample(x_T, condition)``, under ``profile.autocast()``; a sampler that draws noise
   draws it from its own generator, after x_T when it shares x_T's generator;
4. ``.float().cpu()``, then ``decode`` (float32, outside autocast).

Whether x_T is drawn all at once (equal seeds give equal x_T whatever the batch) or per batch, from
which generator on which device, is the caller's choice, so the experiments' committed numbers stay
what they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..profiles import Profile, current

#: ``sample(x_T, condition) -> x_0``: one batch through a sampler (``condition`` is None without one)
Sampler = Callable[[torch.Tensor, Any], torch.Tensor]


def gaussian(generator: torch.Generator, shape: tuple[int, ...], device: torch.device | str
             ) -> Callable[[int], torch.Tensor]:
    """``draw(k)``: k samples of N(0, I) of ``shape`` from ``generator``, drawn on the generator's
    device and moved to ``device``."""

    def draw(k: int) -> torch.Tensor:
        return torch.randn(k, *shape, generator=generator, device=generator.device).to(device)

    return draw


@torch.no_grad()
def generate(sample: Sampler, x_T: torch.Tensor | Callable[[int], torch.Tensor], *, batch: int,
             n: int | None = None, profile: Profile | None = None,
             condition: Callable[[int, int], Any] | None = None,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``n`` samples, ``batch`` at a time, in the order of the module docstring: ``sample`` under the
    profile's autocast, float32 on the CPU, then ``decode`` if given. ``x_T`` is a tensor (n, ...) to
    slice (``n`` defaults to its length) or a function ``draw(k)`` called once per batch (``n``
    required)."""
    profile = profile or current()
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"generate: batch must be a positive int, got {batch!r}")
    if callable(x_T):
        if n is None:
            raise TypeError("generate: n is required when x_T is drawn per batch")
    elif n is None:
        n = x_T.shape[0]
    out = []
    for i in range(0, n, batch):
        j = min(i + batch, n)
        cond = None if condition is None else condition(i, j)
        x = x_T(j - i) if callable(x_T) else x_T[i:j]
        with profile.autocast():
            x0 = sample(x, cond)
        x0 = x0.float().cpu()
        out.append(x0 if decode is None else decode(x0))
    return torch.cat(out)
