"""Test defaults shared by every test: the smoke profile, headless widgets, a test-only model cache.

``make test`` sets the same variables; these defaults make a plain ``pytest`` behave alike. The
nbval kernels inherit them, so chapters run at the smoke profile with a cache of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DIFFUSION_PROFILE", "smoke")
os.environ.setdefault("DIFFUSION_HEADLESS", "1")
os.environ.setdefault("DIFFUSION_CACHE", str(ROOT / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (where book.toml and pyproject.toml are)."""
    return ROOT
