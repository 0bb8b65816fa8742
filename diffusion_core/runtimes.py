"""Measured run times of the chapters, as the book's build records them.

Every chapter the build executes successfully appends one record to ``<out>/runtimes.json``:
the chapter, profile, wall seconds, date, the machine (CPU model, cores usable, threads, GPU) and
what the model store did meanwhile (``$DIFFUSION_STORE_LOG``, :func:`diffusion_core.store.read_log`):
which recipes it *trained* (with their training seconds) and which it *loaded* from the cache, and
whether the cache held any model when the chapter started.

From those facts alone :func:`kind` names what a run measured:

- ``cold``: the chapter trained every model it uses (the cache was empty, or held none of them);
- ``reading order``: it trained exactly the models no earlier chapter uses and loaded the earlier
  chapters' ones, as a reader who ran the chapters in order has them (known from the records of the
  earlier chapters at any profile: which models a chapter uses does not depend on it, and a smoke
  build records every chapter's; a cold run of a chapter that shares no model with an earlier one,
  chapter 01's for one, is also in reading order, and the other way round);
- ``cached``: it trained nothing (a chapter that only reuses earlier chapters' models, run in
  reading order, is both);
- ``warm``: anything else (some models cached, and the earlier chapters' records cannot say which).

``python -m diffusion_core.book runtimes`` prints the table; the book's committed measurements are
``benchmarks/results/runtimes/cpu.json`` and ``book.toml``'s ``runtime_minutes`` quotes them
(``tests/test_runtimes.py`` checks that it does).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "machine", "make_record", "append_record", "read_records", "kind", "latest", "minutes",
           "table", "measured_minutes", "update_book_toml"]

KINDS = ("cold", "reading order", "cached", "warm")   # what `kind` can answer


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores this process may use, OMP_NUM_THREADS,
    memory and the GPU (None without CUDA)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    memory = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": _cpu_model(), "cores": cores, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "memory_gib": memory, "gpu": gpu, "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def _check_seconds(seconds: object) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")   # NaN fails the range too


def make_record(chapter: str, profile: str, seconds: float, events: Iterable[dict[str, Any]],
                cache_was_empty: bool, started: str | None = None, host: dict[str, Any] | None = None,
                commit: str | None = None) -> dict[str, Any]:
    """One chapter run: ``events`` are the store's log lines of that run."""
    _check_seconds(seconds)
    trained: dict[str, float | None] = {}
    loaded: list[str] = []
    for e in events:
        if e["event"] == "trained":
            trained[e["recipe"]] = e.get("seconds")
        elif e["recipe"] not in loaded and e["recipe"] not in trained:
            loaded.append(e["recipe"])
    return {"chapter": chapter, "profile": profile, "seconds": round(float(seconds), 1),
            "started": started or _dt.datetime.now().isoformat(timespec="seconds"),
            "cache_was_empty": bool(cache_was_empty), "trained": trained, "loaded": sorted(loaded),
            "machine": host if host is not None else machine(), "commit": commit}


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a runtimes file (an absent file: none); a damaged file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"chapter", "profile", "seconds"} <= r.keys()
                                                for r in records):
        raise ValueError(f"{path}: expected {{\"records\": [{{chapter, profile, seconds, ...}}, ...]}}")
    return records


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Add ``record`` to the runtimes file (written atomically)."""
    path = Path(path)
    records = read_records(path) + [record]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"records": records}, indent=1), encoding="utf-8")
    tmp.replace(path)


def _uses(record: dict[str, Any]) -> set[str]:
    return set(record.get("trained", {})) | set(record.get("loaded", []))


def kind(record: dict[str, Any], records: Sequence[dict[str, Any]], order: Sequence[str]) -> str:
    """What ``record`` measured (see the module docstring); ``order``: the chapters in reading order,
    ``records``: every record known (the earlier chapters' ones say which models a reader has)."""
    trained, loaded = set(record.get("trained", {})), set(record.get("loaded", []))
    if record["chapter"] not in order:
        raise ValueError(f"chapter {record['chapter']!r} is not in the book's order {list(order)}")
    earlier = order[:order.index(record["chapter"])]
    # which models a chapter uses does not depend on the profile: any record of it says (a smoke build
    # of the whole book records every chapter's in a few minutes)
    known = {r["chapter"] for r in records}
    before: set[str] = set()
    for r in records:
        if r["chapter"] in earlier:
            before |= _uses(r)
    complete = all(c in known for c in earlier)
    if record.get("cache_was_empty") or not loaded:   # it trained all it uses, as from an empty cache
        return "reading order" if complete and not (trained & before) else "cold"
    if complete and loaded <= before and not (trained & before):
        return "reading order"   # a chapter that only reuses earlier chapters' models trains nothing here
    return "cached" if not trained else "warm"


def latest(records: Sequence[dict[str, Any]], order: Sequence[str], profile: str) -> dict[str, dict[str, dict]]:
    """``{chapter: {kind: record}}``, the newest record of each kind at ``profile``. A cold run that is
    also in reading order counts as both."""
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        if r["profile"] != profile or r["chapter"] not in order:
            continue
        k = kind(r, records, order)
        kinds = [k]
        if k == "reading order" and (r.get("cache_was_empty") or not r.get("loaded")):
            kinds.append("cold")      # it trained everything it uses
        if k == "reading order" and not r.get("trained"):
            kinds.append("cached")    # everything it uses was cached
        for k in kinds:
            slot = out.setdefault(r["chapter"], {})
            if k not in slot or r.get("started", "") >= slot[k].get("started", ""):
                slot[k] = r
    return out


def minutes(seconds: float) -> int:
    """The whole minutes a table quotes for a run of ``seconds``: rounded up (a chapter measured at
    14 min 10 s is listed as 15)."""
    _check_seconds(seconds)
    return max(1, math.ceil(seconds / 60 - 1e-9))


def table(records: Sequence[dict[str, Any]], order: Sequence[str], profile: str) -> str:
    """A plain-text table: per chapter, the newest reading-order, cold and cached run."""
    best = latest(records, order, profile)
    lines = [f"{'chapter':<28} {'reading order':>14} {'cold':>10} {'cached':>10}  measured on"]
    for ch in order:
        runs = best.get(ch, {})
        cells = [f"{runs[k]['seconds'] / 60:.1f} min" if k in runs else "-" for k in ("reading order", "cold", "cached")]
        any_run = next((runs[k] for k in ("reading order", "cold", "cached", "warm") if k in runs), None)
        where = ""
        if any_run:
            m = any_run.get("machine", {})
            where = f"{any_run.get('started', '?')[:10]}, {m.get('cores', '?')} cores, {m.get('cpu', '?')}"
            if m.get("gpu"):
                where += f", {m['gpu']}"
        lines.append(f"{ch:<28} {cells[0]:>14} {cells[1]:>10} {cells[2]:>10}  {where}")
    return "\n".join(lines)


def measured_minutes(records: Sequence[dict[str, Any]], order: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{chapter: {"smoke": m, "cpu": m, "cpu_cold": m, "gpu": m}}``: the whole minutes (:func:`minutes`)
    of the newest reading-order run at each profile and the newest cold run at ``cpu``, where the
    records have one (book.toml's ``runtime_minutes`` keys)."""
    out: dict[str, dict[str, int]] = {}
    for profile, wanted in (("smoke", (("reading order", "smoke"),)),
                            ("cpu", (("reading order", "cpu"), ("cold", "cpu_cold"))),
                            ("gpu", (("reading order", "gpu"),))):
        for ch, runs in latest(records, order, profile).items():
            for k, key in wanted:
                if k in runs:
                    out.setdefault(ch, {})[key] = minutes(runs[k]["seconds"])
    return out


def update_book_toml(text: str, measured: dict[str, dict[str, int]], names: dict[str, str]) -> str:
    """book.toml's text with each measured chapter's ``runtime_minutes`` entries replaced (others kept,
    ``gpu`` included). ``names``: chapter number -> name (``"01"`` -> ``"01_ddpm"``)."""
    import re

    blocks = re.split(r"(?m)^(?=\[\[chapters\]\]\s*$)", text)
    for i, block in enumerate(blocks):
        num = re.search(r'(?m)^number\s*=\s*"([^"]+)"', block)
        if not num or names.get(num.group(1)) not in measured:
            continue
        values = measured[names[num.group(1)]]
        line = re.search(r"(?m)^runtime_minutes\s*=\s*\{([^}]*)\}.*$", block)
        if not line:
            raise ValueError(f"book.toml: chapter {num.group(1)} has no one-line runtime_minutes = {{...}}")
        entries = dict(re.findall(r"(\w+)\s*=\s*([0-9.]+)", line.group(1)))
        entries.update({k: str(v) for k, v in values.items()})
        order = ["smoke", "cpu", "cpu_cold", "gpu"]
        body = ", ".join(f"{k} = {entries[k]}" for k in order + sorted(set(entries) - set(order)) if k in entries)
        note = f"measured by the build (benchmarks/results/runtimes/): {', '.join(values)}"
        old = line.group(0).split("#", 1)[1].strip() if "#" in line.group(0) else ""
        if old.startswith("measured by the build"):   # an earlier note of this function: keep what followed it
            old = old.split(" | ", 1)[1] if " | " in old else ""
        blocks[i] = (block[:line.start()] + f"runtime_minutes = {{ {body} }}   # {note}" + (f" | {old}" if old else "")
                     + block[line.end():])
    return "".join(blocks)
