"""diffusion_core: the tested package behind 'Diffusion from the Papers'.

Arrows point one way: chapters -> samplers / train -> process -> models.
"""

from .profiles import Profile, setup

__version__ = "0.1.0"
__all__ = ["Profile", "setup", "__version__"]
