"""benchmarks/run.py refuses a bad chapter or profile with one clear line, before measuring anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--chapter", "99", "--profile", "smoke"], "unknown chapter '99'"),
    (["--chapter", "01", "--profile", "bogus"], "argument --profile: invalid choice: 'bogus'"),
    (["--profile", "smoke"], "the following arguments are required: --chapter"),
])
def test_bad_arguments_are_one_clear_line(run_module, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run_module.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
