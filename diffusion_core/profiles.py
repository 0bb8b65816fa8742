"""Compute profiles: ``smoke`` (CI), ``cpu`` (a 2-core laptop), ``gpu`` (Colab, best quality).

Every chapter starts with one call, :func:`setup`, which picks the profile (a GPU means ``gpu``;
the environment variable ``DIFFUSION_PROFILE`` overrides), the device and the seed. A chapter then
chooses its sizes with ``profile.pick(smoke=..., cpu=..., gpu=...)`` so that every profile runs the
same code path: smoke only makes it smaller, it never skips a step.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")
ENV_VAR = "DIFFUSION_PROFILE"
AMP_ENV_VAR = "DIFFUSION_AMP"   # "0" turns mixed precision off, "1" forces it on (CPU without native bf16: slow)

T = TypeVar("T")


class UnknownProfileError(ValueError):
    """Raised for a profile name that is not one of :data:`PROFILES`."""


def check_profile(name: str) -> str:
    """Return ``name`` normalised, or raise :class:`UnknownProfileError` naming the choices."""
    key = str(name).strip().lower()
    if key not in PROFILES:
        raise UnknownProfileError(
            f"unknown compute profile {name!r}: expected one of {', '.join(PROFILES)} "
            f"(set it with the environment variable {ENV_VAR} or setup(profile=...))"
        )
    return key


def detect_profile() -> str:
    """``$DIFFUSION_PROFILE`` if set, else ``gpu`` when CUDA is available, else ``cpu``."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return check_profile(env)
    return "gpu" if torch.cuda.is_available() else "cpu"


def default_device(profile: str) -> torch.device:
    if profile == "gpu":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so that autocast speeds
    convolutions up rather than emulating them. Measured on the book's 2-core reference machine
    (AVX512-BF16): a training step of chapter 01's UNet 1.6x faster, sampling 2.2x."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype_for(device_type: str, capability: tuple[int, int] | None = None,
                  cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for a device, or ``None`` for no mixed precision (the pure rule, no
    environment): on CUDA bfloat16 from Ampere on (compute capability 8.0), float16 before it (a T4,
    Colab's free GPU, is 7.5: it has float16 tensor cores but none for bfloat16), where
    :func:`diffusion_core.train.train` scales the loss; ``capability=None`` (unknown) means bfloat16.
    On a CPU bfloat16 when it is native (``cpu_bf16``), else none; never on other devices (MPS)."""
    if device_type == "cuda":
        return torch.float16 if capability is not None and tuple(capability) < (8, 0) else torch.bfloat16
    if device_type == "cpu":
        return torch.bfloat16 if cpu_bf16 else None
    return None


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of the CUDA device, or ``None`` where CUDA is not available."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def _amp_env() -> str:
    env = os.environ.get(AMP_ENV_VAR, "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"{AMP_ENV_VAR} must be 0 or 1, got {env!r}")
    return env


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device`` (:func:`amp_dtype_for` with this machine's CUDA
    capability and CPU), or ``None`` when it is off. ``$DIFFUSION_AMP`` = 0 turns it off, 1 turns it
    on where the device has none (a CPU without native bf16: bfloat16, emulated and slow)."""
    env = _amp_env()
    if device.type not in ("cuda", "cpu") or env == "0":
        return None
    dtype = amp_dtype_for(device.type, cuda_capability(device), device.type == "cpu" and cpu_has_native_bf16())
    if dtype is None and env == "1":
        dtype = torch.bfloat16
    return dtype


def amp_enabled(device: torch.device) -> bool:
    """Mixed precision for ``device`` (:func:`amp_dtype`: bfloat16, or float16 on CUDA before
    Ampere): on CUDA, and on CPUs with native bf16; ``$DIFFUSION_AMP`` = 0 / 1 overrides. Never on MPS."""
    return amp_dtype(device) is not None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Profile:
    """The compute profile a chapter runs under.

    ``name`` is one of ``smoke``, ``cpu``, ``gpu``; ``amp`` is whether training and sampling run
    under autocast (:func:`amp_enabled`: CUDA, or a CPU with native bf16) and ``amp_dtype`` in which
    dtype (bfloat16; float16 on a CUDA GPU before Ampere, such as Colab's T4). Likelihoods
    (bits/dim) are always computed in float32.
    """

    name: str
    device: torch.device
    seed: int = 0

    @property
    def amp(self) -> bool:
        return self.amp_dtype is not None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """``torch.bfloat16``, ``torch.float16`` (CUDA before Ampere) or ``None`` (no mixed precision)."""
        return amp_dtype(self.device)

    def autocast(self) -> torch.autocast:
        """``with profile.autocast(): ...``: autocast to :attr:`amp_dtype` where :attr:`amp` is on, else
        a no-op. Model outputs come back in that dtype; the diffusion arithmetic around them promotes
        to float32."""
        dtype = self.amp_dtype
        return torch.autocast(self.device.type if self.device.type in ("cuda", "cpu") else "cpu",
                              dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def pick(self, *, smoke: T, cpu: T, gpu: T) -> T:
        """The value for this profile: ``profile.pick(smoke=200, cpu=6000, gpu=40000)``."""
        return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[self.name]

    def generator(self, offset: int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator seeded with ``seed + offset`` (on ``device``, default CPU)."""
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(self.seed + offset)
        return g

    def __str__(self) -> str:  # what a chapter prints after setup
        dtype = self.amp_dtype  # amp=bfloat16, amp=float16 or amp=False
        amp = str(dtype).removeprefix("torch.") if dtype is not None else False
        return f"profile={self.name} device={self.device} seed={self.seed} amp={amp}"


_CURRENT: Profile | None = None


def setup(profile: str | None = None, seed: int = 0, device: str | torch.device | None = None,
          threads: int | None = None, verbose: bool = True) -> Profile:
    """The one call a chapter makes first: pick the profile, the device and the seed.

    ``profile=None`` detects it (``$DIFFUSION_PROFILE``, else ``gpu`` with CUDA, else ``cpu``).
    On CPU, torch uses every core (``threads``, else ``$OMP_NUM_THREADS``, overrides); results are
    deterministic for a seed.
    """
    global _CURRENT
    name = check_profile(profile) if profile is not None else detect_profile()
    dev = torch.device(device) if device is not None else default_device(name)
    if dev.type == "cpu":
        torch.set_num_threads(threads or _threads_from_env() or max(1, os.cpu_count() or 1))
    seed_everything(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _CURRENT = Profile(name=name, device=dev, seed=seed)
    if verbose:
        print(_CURRENT)
    return _CURRENT


def _threads_from_env() -> int | None:
    """``$OMP_NUM_THREADS`` when set to a positive integer (a shared machine's way to ask for fewer)."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None


def current() -> Profile:
    """The profile chosen by the last :func:`setup` (detected if none was made)."""
    return _CURRENT if _CURRENT is not None else setup(verbose=False)


def in_colab() -> bool:
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


