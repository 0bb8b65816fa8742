"""Run times as the build records them (diffusion_core.runtimes, the store's event log, build --cold),
and the book's committed measurements against book.toml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from diffusion_core import book as bk
from diffusion_core import runtimes, store
from tests.test_book import make_book

# a chapter cell that registers a tiny recipe (in the kernel) and loads it from the store
TOY = """
import torch
from diffusion_core import store
for name in {names!r}:
    if name not in store.RECIPES:
        store.register(store.Recipe(name, 1, lambda p: {{"n": 1}}, lambda c: torch.nn.Linear(1, 1),
                                    lambda m, c, p: {{"train_seconds": 0.25}}))
    store.load(name, verbose=False)
"""


def build(root: Path, **kwargs) -> bk.BuildReport:
    lines: list[str] = []
    report = bk.build(root, profile="smoke", cache=root / "cache", log=lines.append, **kwargs)
    assert report.exit_code == 0, lines
    return report


def records_by_chapter(root: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runtimes.read_records(root / "_build" / "runtimes.json"):
        out.setdefault(r["chapter"], []).append(r)
    return out


def test_the_build_records_what_each_chapter_trained_and_loaded_and_names_the_kind(tmp_path):
    root = make_book(tmp_path, {("01", "first"): [TOY.format(names=["toy-a"])],
                                ("02", "second"): [TOY.format(names=["toy-a", "toy-b"])]})
    order = ["01_first", "02_second"]
    build(root)   # one cache shared in reading order, empty at the start
    recs = records_by_chapter(root)
    first, second = recs["01_first"][-1], recs["02_second"][-1]
    assert first["cache_was_empty"] and first["trained"] == {"toy-a": 0.25} and first["loaded"] == []
    assert not second["cache_was_empty"] and second["trained"] == {"toy-b": 0.25} and second["loaded"] == ["toy-a"]
    assert first["profile"] == "smoke" and first["seconds"] > 0 and first["machine"]["cores"] >= 1
    every = runtimes.read_records(root / "_build" / "runtimes.json")
    assert runtimes.kind(first, every, order) == "reading order"   # nothing before chapter 01
    assert runtimes.kind(second, every, order) == "reading order"
    assert not list((root / "_build").glob(".store-*"))   # the logs are removed

    build(root, cold=True)   # each chapter from its own empty cache; up-to-date chapters run again
    recs = records_by_chapter(root)
    cold = recs["02_second"][-1]
    assert cold["cache_was_empty"] and set(cold["trained"]) == {"toy-a", "toy-b"} and cold["loaded"] == []
    every = runtimes.read_records(root / "_build" / "runtimes.json")
    assert runtimes.kind(cold, every, order) == "cold"   # chapter 01 uses toy-a: not how a reader meets it
    assert not (root / "_build" / ".cold-cache" / "02_second").exists()
    assert len(list((root / "cache").glob("*.safetensors"))) == 2   # the shared cache is untouched

    build(root, force=True)   # everything cached now
    recs = records_by_chapter(root)
    every = runtimes.read_records(root / "_build" / "runtimes.json")
    assert runtimes.kind(recs["02_second"][-1], every, order) == "cached"
    best = runtimes.latest(every, order, "smoke")
    assert set(best["02_second"]) == {"reading order", "cold", "cached"}
    assert set(best["01_first"]) == {"reading order", "cold", "cached"}   # its cold run is also in reading order
    text = runtimes.table(every, order, "smoke")
    assert "02_second" in text and "cores" in text


def record(chapter, trained=(), loaded=(), empty=False, started="2026-12-06T00:00:00", profile="cpu"):
    return runtimes.make_record(chapter, profile, 60.0,
                                [{"recipe": r, "event": "trained", "seconds": 1.0} for r in trained]
                                + [{"recipe": r, "event": "loaded"} for r in loaded], empty, started, host={})


def test_kind_needs_the_earlier_chapters_records_to_call_a_run_reading_order():
    order = ["01", "02", "03"]
    r3 = record("03", trained=["c"], loaded=["a"])
    assert runtimes.kind(r3, [r3], order) == "warm"   # nothing known of 01 and 02
    smoke = [record("01", trained=["a"], empty=True, profile="smoke"), record("02", loaded=["a"], profile="smoke")]
    assert runtimes.kind(r3, smoke + [r3], order) == "reading order"   # usage is the same at any profile
    assert runtimes.kind(record("03", trained=["c", "a"], loaded=["b"]), smoke, order) == "warm"   # retrained a
    # loaded nothing: it trained all it uses, as from an empty cache, whatever else the cache held
    assert runtimes.kind(record("03", trained=["c", "a"]), smoke, order) == "cold"
    assert runtimes.kind(record("03", trained=["c"]), smoke, order) == "reading order"
    assert set(runtimes.latest(smoke + [record("03", trained=["c"])], order, "cpu")["03"]) == {"reading order", "cold"}
    assert runtimes.kind(record("03", trained=["c"], loaded=["z"]), smoke, order) == "warm"   # z: from where?
    assert runtimes.kind(record("03", trained=["c"], empty=True), smoke, order) == "reading order"
    assert runtimes.kind(record("03", trained=["c", "a"], empty=True), smoke, order) == "cold"
    assert runtimes.kind(record("03", loaded=["a", "c"]), smoke, order) == "cached"
    only_reuses = record("03", loaded=["a"])   # trains nothing of its own: reading order, and cached
    assert runtimes.kind(only_reuses, smoke, order) == "reading order"
    assert set(runtimes.latest(smoke + [only_reuses], order, "cpu")["03"]) == {"reading order", "cached"}
    assert set(runtimes.latest(smoke + [only_reuses], order, "cpu")["03"]) <= set(runtimes.KINDS)
    with pytest.raises(ValueError, match="not in the book's order"):
        runtimes.kind(record("09"), smoke, order)


def test_latest_keeps_the_newest_run_of_each_kind():
    order = ["01"]
    old = record("01", trained=["a"], empty=True, started="2026-12-01T00:00:00")
    new = dict(record("01", trained=["a"], empty=True, started="2026-12-06T00:00:00"), seconds=30.0)
    assert runtimes.latest([new, old], order, "cpu")["01"]["cold"]["seconds"] == 30.0
    assert runtimes.latest([old, new], order, "smoke") == {}


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="seconds"):
        runtimes.make_record("01", "cpu", float("nan"), [], True)
    with pytest.raises(ValueError, match="seconds"):
        runtimes.make_record("01", "cpu", -1, [], True)
    bad = tmp_path / "runtimes.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="runtimes.json: not JSON"):
        runtimes.read_records(bad)
    bad.write_text(json.dumps({"records": [{"chapter": "01"}]}))
    with pytest.raises(ValueError, match="expected"):
        runtimes.read_records(bad)
    log = tmp_path / "store.jsonl"
    log.write_text('{"recipe": "a", "event": "trained"}\n{"recipe": "a", "event": "eaten"}\n')
    with pytest.raises(ValueError, match="line 2"):
        store.read_log(log)
    assert store.read_log(tmp_path / "absent.jsonl") == []
    assert runtimes.minutes(600) == 10 and runtimes.minutes(601) == 11 and runtimes.minutes(5) == 1
    for bad in (float("nan"), float("inf"), -3, "60", True):
        with pytest.raises(ValueError, match="seconds"):
            runtimes.minutes(bad)
    # the command line: a runtimes file the reader names must exist (an empty table would read "nothing measured")
    assert bk.main(["runtimes", str(tmp_path / "absent.json")]) == 2
    assert "files: no runtimes file at" in capsys.readouterr().err


def test_measured_minutes_are_written_into_book_toml(tmp_path):
    from tests.test_book import BOOK_TOML, CHAPTER_TOML

    text = BOOK_TOML + CHAPTER_TOML.format(number="01", slug="first", title="First") + \
        CHAPTER_TOML.format(number="02", slug="second", title="Second")
    order = ["01_first", "02_second"]
    recs = [dict(record("01_first", trained=["a"], empty=True), seconds=301.0),
            dict(record("01_first", trained=["a"], empty=True, profile="smoke"), seconds=20.0),
            dict(record("02_second", trained=["b"], loaded=["a"]), seconds=59.0),
            dict(record("02_second", trained=["a", "b"], empty=True), seconds=400.0)]
    measured = runtimes.measured_minutes(recs, order)
    assert measured == {"01_first": {"smoke": 1, "cpu": 6, "cpu_cold": 6}, "02_second": {"cpu": 1, "cpu_cold": 7}}
    gpu = dict(record("01_first", trained=["a"], empty=True, profile="gpu"), seconds=90.0)
    assert runtimes.measured_minutes(recs + [gpu], order)["01_first"]["gpu"] == 2   # a GPU run fills that column
    new = runtimes.update_book_toml(text, measured, {"01": "01_first", "02": "02_second"})
    (tmp_path / "book.toml").write_text(new)
    book = bk.load_book(tmp_path)
    assert book.chapter("01").runtime_minutes == {"smoke": 1, "cpu": 6, "gpu": 3, "cpu_cold": 6}
    assert book.chapter("02").runtime_minutes == {"smoke": 1, "cpu": 1, "gpu": 3, "cpu_cold": 7}
    assert "measured by the build" in new and new.count("[[chapters]]") == 2
    # a hand-written note on the line is kept after the build's; the build's own is replaced next time
    noted = text.replace("gpu = 3 }", "gpu = 3 }   # gpu: an estimate", 1)
    once = runtimes.update_book_toml(noted, measured, {"01": "01_first", "02": "02_second"})
    assert "smoke, cpu, cpu_cold | gpu: an estimate" in once
    assert runtimes.update_book_toml(once, measured, {"01": "01_first", "02": "02_second"}) == once
    assert "1 min (7 cold)" in bk.readme_table(book) and "6 min |" in bk.readme_table(book)
    with pytest.raises(ValueError, match="runtime_minutes"):
        runtimes.update_book_toml(text.replace("runtime_minutes", "runtime"), measured, {"01": "01_first"})


# --------------------------------------------------------------------------------------------
# The book's committed measurements
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "benchmarks" / "results" / "runtimes" / "cpu.json"
SMOKE = ROOT / "benchmarks" / "results" / "runtimes" / "smoke.json"


def test_book_toml_quotes_the_measured_cpu_run_times():
    """Where the committed build records have a reading-order (or cold) run of a chapter at ``cpu``,
    book.toml's ``cpu`` (``cpu_cold``) is that run in whole minutes, rounded up; and every record
    came from a run of the book's build on a machine it describes."""
    book = bk.load_book(ROOT)
    order = [ch.name for ch in book.chapters]
    records = runtimes.read_records(MEASURED) + runtimes.read_records(SMOKE)
    assert records, f"{MEASURED} holds no records"
    best = runtimes.latest(records, order, "cpu")
    assert best, "no cpu run of any chapter"
    for ch in book.chapters:
        runs = best.get(ch.name, {})
        for kind, key in (("reading order", "cpu"), ("cold", "cpu_cold")):
            if kind in runs:
                assert ch.runtime_minutes.get(key) == runtimes.minutes(runs[kind]["seconds"]), (ch.name, kind)
        smoke_runs = runtimes.latest(records, order, "smoke").get(ch.name, {})
        if "reading order" in smoke_runs:
            assert ch.runtime_minutes["smoke"] == runtimes.minutes(smoke_runs["reading order"]["seconds"]), ch.name
    for r in records:
        assert r["machine"].get("cores") and r["machine"].get("cpu") and r.get("started"), r["chapter"]
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0


def test_each_measured_chapter_quotes_its_measured_time():
    """A chapter whose run the committed records hold says so in its run-time paragraph: "X minutes in
    reading order" (and "Y minutes cold" where a separate cold run was measured), X and Y to a tenth."""
    book = bk.load_book(ROOT)
    order = [ch.name for ch in book.chapters]
    records = runtimes.read_records(MEASURED) + runtimes.read_records(SMOKE)
    for ch in book.chapters:
        runs = runtimes.latest(records, order, "cpu").get(ch.name, {})
        lines = (ROOT / ch.notebook).with_suffix(".py").read_text(encoding="utf-8").splitlines()
        text = " ".join(line.lstrip("#").strip() for line in lines)   # the Markdown, line breaks undone
        if "reading order" in runs:
            want = f"{runs['reading order']['seconds'] / 60:.1f} minutes in reading order"
            assert want in text, f"{ch.name}: its run-time paragraph should say {want!r}"
        if "cold" in runs and runs["cold"] is not runs.get("reading order"):
            want = f"{runs['cold']['seconds'] / 60:.1f} minutes cold"
            assert want in text, f"{ch.name}: its run-time paragraph should say {want!r}"
