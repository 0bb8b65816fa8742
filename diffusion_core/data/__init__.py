"""Embedded data only: generated, or shipped inside a package. Nothing is downloaded."""

from .digits import box_blur, digits, gaussian_baseline, quantize
from .toy2d import toy2d

__all__ = ["box_blur", "digits", "gaussian_baseline", "quantize", "toy2d"]
