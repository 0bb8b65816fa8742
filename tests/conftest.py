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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make nbval hold a ``# NBVAL_CHECK_OUTPUT`` cell to printing nothing.

    nbval compares a cell's outputs only when the committed cell has run (an execution count).
    Chapters are committed without outputs, so it would compare nothing, and a check cell that
    prints, say, a wrong value would pass. Marking such a cell as run with no outputs makes any
    output it prints a failure ("Unexpected output fields"), as the book's convention intends.
    """
    for item in items:
        cell, options = getattr(item, "cell", None), getattr(item, "options", None)
        if cell is None or not isinstance(options, dict) or not options.get("check"):
            continue
        if cell.get("execution_count") is None and not cell.get("outputs") and "NBVAL_CHECK_OUTPUT" in cell.source:
            cell["execution_count"] = 0


@pytest.fixture(autouse=True)
def _one_thread():
    """The package's tests use tiny models: one thread is as fast as two, and immune to the
    oversubscription that makes two threads crawl on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
