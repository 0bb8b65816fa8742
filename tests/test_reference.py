"""diffusion_core.reference: the committed reference runs a chapter prints beside its own."""

from __future__ import annotations

import json

import pytest

from diffusion_core.reference import RESULTS, compare, lookup, reference_run


def test_reference_run_reads_a_committed_run_and_is_none_where_there_is_none(tmp_path):
    run = {"commit": "abcdef0123", "machine": {"cpus": 2}, "metrics": {"fd": {"1.0": 2.5, "4": 7.0}, "n": 300},
           "speed": {"ratio": 0.9}}
    (tmp_path / "03-cpu.json").write_text(json.dumps(run))
    assert reference_run("3", root=tmp_path) == run and reference_run(3, root=tmp_path) == run
    assert reference_run("04", root=tmp_path) is None
    with pytest.raises(ValueError, match="chapter"):
        reference_run("x1", root=tmp_path)
    with pytest.raises(ValueError, match="profile"):
        reference_run("03", profile="cpu2", root=tmp_path)
    # keys as JSON stores them: a float 1.0 was written "1.0", an int 4 "4"; speed is searched too
    assert lookup(run, ("fd", 1.0)) == 2.5 and lookup(run, ("fd", 4)) == 7.0 and lookup(run, ("ratio",)) == 0.9
    assert lookup(run, ("fd", 8)) is None and lookup(run, ("n", "x")) is None and lookup(None, ("n",)) is None


def test_compare_prints_paper_reference_and_this_run(capsys):
    run = {"commit": "abcdef0123", "machine": {"cpus": 2}, "metrics": {"fd": 2.6612}}
    text = compare([("FD", "FID 3.17", ("fd",), 2.7), ("NLL", 3.75, None, 2.5)], run)
    assert text == capsys.readouterr().out.rstrip("\n")
    header, _, fd, nll = text.splitlines()
    assert "abcdef0" in header and "2 CPUs" in header and "this run" in header
    assert fd.split() == ["FD", "FID", "3.17", "2.661", "2.7"] and nll.split() == ["NLL", "3.75", "-", "2.5"]
    assert "none here" in compare([("FD", None, ("fd",), 1.0)], None)
    derived = compare([("2 FD", None, lambda r: 2 * lookup(r, ("fd",)), 1.0)], run).splitlines()[-1]
    assert derived.split()[-2:] == ["5.322", "1"]
    with pytest.raises(ValueError, match="row"):
        compare([("FD", 1.0, ("fd",))], run)
    with pytest.raises(ValueError, match="at least one"):
        compare([], run)


def test_every_committed_run_names_its_commit_and_machine():
    runs = sorted(RESULTS.glob("*-cpu.json"))
    assert runs, "no committed reference run"
    for path in runs:
        run = json.loads(path.read_text())
        assert run["chapter"] == path.name[:2] and run["profile"] == "cpu"
        assert run["commit"] and run["machine"]["cpus"] >= 1 and run["metrics"]
