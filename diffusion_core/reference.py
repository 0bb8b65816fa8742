"""The book's reference runs: the ``cpu`` benchmark of each chapter, committed with the repository.

A chapter's readings quote ``benchmarks/results/NN-cpu.json`` (written by ``benchmarks/run.py
--chapter NN --profile cpu --save``, checked against the text by ``tests/test_readings.py``). A reader
who runs the chapter on other hardware, or at another profile, gets other numbers; each claim cell
prints them side by side with :func:`compare`: the paper, the book's reference run, this run.

    ref = reference_run("01")                        # None where the repository is not at hand
    compare([("FD, L_simple", "FID 3.17", ("fd_l_simple",), row["fd"])], ref)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: where the committed runs live, relative to the repository root (a clone; not in a pip install)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def reference_run(chapter: str | int, profile: str = "cpu", root: Path | None = None) -> dict[str, Any] | None:
    """The committed benchmark run of ``chapter`` at ``profile`` (the JSON's top level: ``commit``,
    ``machine``, ``metrics``, ``speed``, ...), or None where there is none (a pip install without the
    repository, or a chapter not yet measured)."""
    chapter = str(chapter).zfill(2)
    if not (chapter.isdigit() and len(chapter) == 2):
        raise ValueError(f"chapter must be a two-digit chapter number such as '01', got {chapter!r}")
    if profile not in ("smoke", "cpu", "gpu"):
        raise ValueError(f"profile must be 'smoke', 'cpu' or 'gpu', got {profile!r}")
    path = (root or RESULTS) / f"{chapter}-{profile}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def lookup(run: dict[str, Any] | None, path: Sequence[Any]) -> Any:
    """``run["metrics"][path[0]][path[1]]...`` (or from ``speed`` when the first key is there), keys
    compared as strings as JSON stores them; None when ``run`` is None or a key is missing."""
    if run is None:
        return None
    for section in ("metrics", "speed"):
        node: Any = run.get(section, {})
        for key in path:
            if not isinstance(node, dict):
                node = None
                break
            node = node.get(str(key), node.get(_json_key(key)))
            if node is None:
                break
        if node is not None:
            return node
    return None


def _json_key(key: Any) -> str:
    return f"{key:g}" if isinstance(key, float) else str(key)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, fmt)


def compare(rows: Sequence[tuple[str, Any, Sequence[Any] | None, Any]], reference: dict[str, Any] | None,
            fmt: str = ".4g", paper_label: str = "paper") -> str:
    """Print (and return) a table of ``(quantity, paper, key path in the reference run, this run)``
    rows: the paper's number or a few words, the reference run's value (:func:`lookup`, or
    ``path(run)`` when the path is a function: a quantity derived from the run), this run's.
    The header names the reference run's commit and machine, or says there is none."""
    if not rows:
        raise ValueError("rows must hold at least one (quantity, paper, key path, this run) row")
    for row in rows:
        if len(row) != 4:
            raise ValueError(f"each row must be (quantity, paper, key path, this run), got {row!r}")
    if reference is None:
        ref_label = "reference run: none here"
    else:
        m = reference.get("machine", {})
        ref_label = f"reference run ({str(reference.get('commit', '?'))[:7]}, {m.get('cpus', '?')} CPUs)"
    table = [("quantity", paper_label, ref_label, "this run")]
    for quantity, paper, path, this in rows:
        if callable(path):   # a quantity derived from the run: path(run) -> value
            ref = None if reference is None else path(reference)
        else:
            ref = lookup(reference, path) if path is not None else None
        table.append((quantity, _cell(paper, fmt), _cell(ref, fmt), _cell(this, fmt)))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text
