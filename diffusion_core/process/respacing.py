"""Choosing K of the T training timesteps to sample with (chapters 02 and 03).

A model trained with T steps can be sampled in K < T steps by running the process restricted to a
subsequence tau = (tau_0 < tau_1 < ... < tau_{K-1}) of 0..T-1 (Improved DDPM Sec. 4, DDIM Sec. 4.2).
The common choices differ in where they put the steps and in their ends:

    kind         tau_i (i = 0..K-1)                               from
    -----------  -----------------------------------------------  -----------------------------------
    uniform      round( i (T - 1) / (K - 1) )                      Improved DDPM Sec. 4 ("evenly spaced
                 (also called "linspace")                          real numbers between 1 and T,
                                                                   rounded"); diffusers' "linspace"
    leading      i * floor(T / K) + offset                         DDIM's "linear" tau_i = floor(c i);
                                                                   diffusers' default "leading"
    trailing     round( T - (K - 1 - i) T / K ) - 1                Lin et al. 2024 ("Common diffusion
                                                                   noise schedules ... are flawed",
                                                                   Table 2); diffusers' "trailing"
    quadratic    floor( c i^2 ),  c = (T - 1) / (K - 1)^2          DDIM Sec. D.2 (used for CIFAR-10)

``uniform`` and ``trailing`` end at tau_{K-1} = T - 1, the step the network saw with the most noise
(for K = 1 ``uniform`` gives [0], as diffusers' "linspace" does: a one-step sampler wants
``trailing``). ``leading`` ends at (K - 1) floor(T / K) (+ offset), so its first sampling step starts
from less noise than x_T ~ N(0, I) really has. ``quadratic`` spends more of its steps at low noise.

Timesteps are returned ascending, the order :meth:`GaussianDiffusion.respace` takes; a sampler runs
them in reverse (diffusers' ``scheduler.timesteps`` is this list reversed).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

SPACINGS = ("uniform", "linspace", "leading", "trailing", "quadratic")


def space_timesteps(T: int, K: int, kind: str = "uniform", offset: int = 0) -> torch.Tensor:
    """K distinct training timesteps in 0..T-1, ascending, shape (K,), dtype long.

    ``kind`` is one of ``uniform`` (= ``linspace``), ``leading``, ``trailing``, ``quadratic`` (see the
    module docstring for the formulas). ``offset`` shifts ``leading`` (diffusers' ``steps_offset``;
    Stable Diffusion uses 1) and is an error for the other kinds.

    For ``quadratic`` with K close to T the first values of floor(c i^2) collide (0, 0, 0, 1, ...);
    each collision is moved up to one past its predecessor so that the K steps stay distinct
    (DDIM's released code keeps the duplicates instead).
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"the number of training steps T must be a positive integer, got {T!r}")
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"the number of sampling steps K must be a positive integer, got {K!r}")
    if K > T:
        raise ValueError(f"cannot sample in K = {K} steps from a process with only T = {T} steps")
    if kind not in SPACINGS:
        raise ValueError(f"unknown spacing {kind!r}; expected one of {SPACINGS}")
    if not isinstance(offset, numbers.Integral) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset (steps_offset) must be an integer >= 0, got {offset!r}; a negative one "
                         f"would start the steps at timestep {offset} < 0")
    offset = int(offset)
    if offset and kind != "leading":
        raise ValueError(f"offset (steps_offset) only applies to 'leading' spacing, not {kind!r}")

    if kind in ("uniform", "linspace"):
        # tau_i = round( i (T - 1) / (K - 1) ): evenly spaced over [0, T - 1], both ends included
        ts = np.linspace(0, T - 1, K).round()
    elif kind == "leading":
        # tau_i = i * floor(T / K) + offset: strides from 0, so the last step stops short of T - 1
        ts = np.arange(K) * (T // K) + offset
        if ts[-1] >= T:
            raise ValueError(f"offset {offset} pushes the last timestep to {int(ts[-1])}, past T - 1 = {T - 1}")
    elif kind == "trailing":
        # tau_{K-1-j} = round(T - j T / K) - 1 for j = 0..K-1: back from T in strides of T / K, so the
        # last step is T - 1. The values come from a float arange, exactly as diffusers makes them
        # (rounding at .5 ties then agrees); for some T, K (e.g. T = 100, K = 29) that arange has an
        # extra K+1-th value that diffusers keeps as a timestep of -1: we stop at K.
        ts = (np.round(np.arange(T, 0, -T / K)[:K]) - 1)[::-1]
    else:
        # tau_i = floor(c i^2), with c chosen so that tau_{K-1} = T - 1
        # in integers, so that tau_{K-1} = T - 1 exactly: floor((T - 1) i^2 / (K - 1)^2)
        i = np.arange(K, dtype=np.int64)
        ts = (T - 1) * i**2 // max(K - 1, 1) ** 2
        for j in range(1, K):  # keep the steps distinct where floor(c i^2) collides
            ts[j] = max(ts[j], ts[j - 1] + 1)
    out = torch.tensor(ts.tolist(), dtype=torch.long)
    if out.numel() != K or (out.numel() > 1 and not bool((out[1:] > out[:-1]).all())):
        raise ValueError(f"{kind!r} spacing of T = {T} into K = {K} steps gave {out.numel()} values "
                         f"that are not strictly increasing")
    return out
