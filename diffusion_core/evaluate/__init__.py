"""Evaluators trained by the package, and the distances computed with them."""

from .frechet import frechet_distance, frechet_distance_from_stats

__all__ = ["frechet_distance", "frechet_distance_from_stats"]
