"""Embedded data only: generated, or shipped inside a package. Nothing is downloaded."""

from .digits import box_blur, digits, gaussian_baseline, quantize
from .toy2d import toy2d

__all__ = ["box_blur", "digits", "gaussian_baseline", "quantize", "toy2d"]

# the world of shapes (chapters 04-09, 11-13)
from .shapes import Scenes, ShapesDataset, ShapesWorld, parse_mentions, zero_shot_prompts  # noqa: E402

__all__ += ["Scenes", "ShapesDataset", "ShapesWorld", "parse_mentions", "zero_shot_prompts"]
