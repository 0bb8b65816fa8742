"""Samples made once and reused across a chapter's measurements (the ``Setting`` of chapters 09, 11, 13)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class SampleMemo:
    """Mixin: :meth:`run` keeps each named batch of samples (``self.samples``) and the seconds it took to
    make (``self.seconds``), so that a claim and the figure beside it use the same images, made once."""

    def run(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The samples called ``name``: made once by ``make()`` (timed), then reused."""
        samples: dict[str, torch.Tensor] = self.__dict__.setdefault("samples", {})
        seconds: dict[str, float] = self.__dict__.setdefault("seconds", {})
        if name not in samples:
            start = time.perf_counter()
            samples[name] = make()
            seconds[name] = time.perf_counter() - start
        return samples[name]
