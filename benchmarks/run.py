"""Every figure the book quotes comes from here.

    .venv/bin/python benchmarks/run.py --chapter 01 --profile cpu

prints the chapter's measurements as readable lines, and as its last line one JSON object:
``{"chapter": "01", "profile": "cpu", "metrics": {...}, "speed": {...}, "machine": {...}}``.
Each chapter's measurement lives in ``benchmarks/chNN.py`` as ``run(profile) -> {"metrics", "speed"}``
and calls the same package function the chapter calls (``diffusion_core.experiments``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import diffusion_core as dc  # noqa: E402
from diffusion_core.profiles import PROFILES  # noqa: E402

CHAPTERS = sorted(p.stem[2:] for p in Path(__file__).resolve().parent.glob("ch[0-9][0-9].py"))


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _plain(obj):
    """JSON-able copy: tensors dropped, floats rounded to 6 significant digits."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if not torch.is_tensor(v)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure a chapter's figures.")
    parser.add_argument("--chapter", required=True, help=f"one of {', '.join(CHAPTERS)}")
    parser.add_argument("--profile", default=None, choices=list(PROFILES), help="the compute profile (default: detected)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true",
                        help="also write the JSON, with the commit measured, to benchmarks/results/NN-PROFILE.json "
                             "(the run a chapter's reading quotes)")
    args = parser.parse_args(argv)
    chapter = args.chapter.zfill(2)
    if chapter not in CHAPTERS:
        parser.error(f"unknown chapter {args.chapter!r}; benchmarks exist for {', '.join(CHAPTERS)}")
    profile = dc.setup(args.profile, seed=args.seed)
    start = time.perf_counter()
    result = importlib.import_module(f"ch{chapter}").run(profile)
    out = {"chapter": chapter, "profile": profile.name, "metrics": _plain(result.get("metrics", {})),
           "speed": _plain(result.get("speed", {})), "machine": machine(),
           "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(out))
    if args.save:
        out = {"commit": _commit(), **out}
        path = Path(__file__).resolve().parent / "results" / f"{chapter}-{profile.name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"saved {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}", file=sys.stderr)
    return 0


def _commit() -> str:
    """The git commit measured (with "+dirty" when the tree has changes), or "unknown"."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


if __name__ == "__main__":
    raise SystemExit(main())
