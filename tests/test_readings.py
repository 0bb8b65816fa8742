"""A chapter's readings quote its committed benchmark run.

Where ``benchmarks/results/NN-cpu.json`` exists (written by ``benchmarks/run.py --chapter NN --profile
cpu --save``), every number in the chapter's ``*Reading (cpu profile ...)*`` paragraphs must be a value of
that run's metrics or speed, at the precision it is quoted (0.438 matches 0.437705; 68% matches 0.68; 2,000 matches
2000). Numbers without a decimal point below 100 are structure (section and chapter numbers, image sizes)
and settings written as ``$t = 250$`` or ``$s = 10$`` are the experiment's inputs, a year after "et al." a citation: none is checked. A reading that quotes a number the run does not hold fails here, so a reader who runs
the benchmark can find every quoted figure in its output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*-cpu.json"))
NUMBER = re.compile(r"(?<![\w.])(?<!=\s)(?<!=)(\d[\d,]*(?:\.\d+)?)")  # not a setting: "$t = 250$", "$s = 10$"


def _values(obj) -> list[float]:
    out: list[float] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            try:
                out.append(float(k))
            except ValueError:
                pass
            out += _values(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _values(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.append(float(obj))
    return out


def quoted_numbers(text: str) -> list[tuple[str, float, int]]:
    """(as written, value, decimals) of every number in ``text`` that the test checks."""
    out = []
    for m in NUMBER.finditer(text):
        if re.search(r"(et al\.,?|al\.,) $", text[max(0, m.start() - 8):m.start()]):
            continue   # a citation's year: "Karras et al. 2022"
        s = m.group(1).rstrip(",")
        value = float(s.replace(",", ""))
        decimals = len(s.split(".")[1]) if "." in s else 0
        if decimals == 0 and value < 100:
            continue
        out.append((s, value, decimals))
    return out


def unmatched(text: str, values: list[float]) -> list[str]:
    def found(v: float, d: int) -> bool:
        tol = 0.5 * 10 ** -d + 1e-9
        # the sign is prose ("-0.121", "ahead by 20.7"): a quoted number matches a value's magnitude
        return any(abs(abs(x) - v) <= tol or abs(100 * abs(x) - v) <= tol for x in values)
    return [s for s, v, d in quoted_numbers(text) if not found(v, d)]


def readings(chapter: str) -> list[str]:
    """The chapter's reading paragraphs: a Markdown paragraph (lines up to an empty ``#`` line) that starts
    with ``*Reading (cpu profile``. The paragraphs after it (the paper's figures) are not checked."""
    [py] = (ROOT / "chapters").glob(f"{chapter}_*.py")
    paragraphs = re.split(r"\n#[ \t]*\n|\n# %%[^\n]*\n", py.read_text())
    return [p.strip() for p in paragraphs if p.strip().startswith("# *Reading (cpu profile")]


def test_the_check_catches_a_misquote():
    values = [0.437705, 2000.0, 0.68]
    assert unmatched("identity 0.438 after 2,000 steps, pose 68%", values) == []
    assert unmatched("identity 0.44 (section 6, 32x32)", values) == []
    assert unmatched("identity 0.451", values) == ["0.451"]
    assert unmatched("after 2,500 steps", values) == ["2,500"]
    assert unmatched("a difference of -0.121 (interval -0.780 to +0.577)", [-0.120545, -0.779745, 0.577439]) == []
    assert unmatched("at $t = 250$ it is 0.438", values) == []
    assert unmatched("(Karras et al. 2022, Sec. 4) 0.438", values) == [] and unmatched("in 2022", values) == ["2022"]


@pytest.mark.parametrize("result", RESULTS, ids=[p.stem for p in RESULTS])
def test_readings_quote_the_committed_run(result):
    run = json.loads(result.read_text())
    assert run.get("commit") and run["profile"] == "cpu", f"{result.name} lacks its commit or is not a cpu run"
    chapter = run["chapter"]
    paragraphs = readings(chapter)
    assert paragraphs, f"chapter {chapter} has a committed cpu run but no '*Reading (cpu profile' paragraph"
    values = _values(run["metrics"]) + _values(run.get("speed", {}))
    bad = {i: miss for i, p in enumerate(paragraphs) if (miss := unmatched(p, values))}
    assert not bad, f"chapter {chapter}'s readings quote numbers not in {result.name}: {bad}"
