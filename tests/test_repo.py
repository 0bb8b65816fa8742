"""The repository's invariants: dependencies, book.toml, the chapters' pairing and first cells, README."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from diffusion_core import book as bk

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def bounds(requirements: list[str]) -> dict[str, tuple[str, str]]:
    """{name: (specifier, marker)} with names canonicalised, e.g. scikit_learn -> scikit-learn."""
    out = {}
    for line in requirements:
        req = Requirement(line)
        out[canonicalize_name(req.name)] = (str(req.specifier), str(req.marker or ""))
    return out


def pyproject_requirements() -> list[str]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return project["dependencies"] + extras["book"] + extras["test"]


def environment_yml() -> tuple[list[str], list[str]]:
    """(conda packages, pip requirements) of environment.yml."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [line for d in env["dependencies"] if isinstance(d, dict) for line in d.get("pip", [])]
    return conda, [line for line in pip if not line.startswith("-")]


def requirements_nodeps() -> list[str]:
    lines = (ROOT / "requirements-nodeps.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_environment_yml_and_pyproject_list_the_same_dependencies_and_lower_bounds():
    conda, pip = environment_yml()
    assert bounds(pip) == bounds(pyproject_requirements())
    python = next(Requirement(d) for d in conda if Requirement(d).name == "python")
    assert str(python.specifier) == PYPROJECT["project"]["requires-python"]


def test_no_dependency_anywhere_is_pinned():
    conda, pip = environment_yml()
    everything = pyproject_requirements() + PYPROJECT["build-system"]["requires"] + conda + pip
    everything += requirements_nodeps()
    for line in everything:
        for spec in Requirement(line).specifier:
            assert spec.operator not in ("==", "==="), f"{line} is pinned: use a lower bound (>=)"


def test_torch_is_a_lower_bound_that_the_local_wheel_and_colab_meet():
    torch_req = Requirement(next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")))
    assert [s.operator for s in torch_req.specifier] == [">="]
    assert torch_req.specifier.contains("2.13.0")


def test_requirements_nodeps_starts_with_open_clip():
    assert requirements_nodeps()[0] == "open_clip_torch>=2.20"


def test_book_toml_is_valid():
    book = bk.load_book(ROOT)  # raises BookError listing every problem
    assert book.chapters and book.chapters[0].number == "01"


def test_every_notebook_named_in_book_toml_exists_and_every_notebook_is_listed():
    assert bk.notebook_problems(bk.load_book(ROOT)) == []


def test_readme_chapter_table_is_current():
    assert not bk.update_readme(bk.load_book(ROOT), check=True), (
        "README.md's chapter table is stale: run `python -m diffusion_core.book readme`")


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def chapter_of(notebook: Path) -> tuple[bk.Book, bk.Chapter]:
    book = bk.load_book(ROOT)
    rel = notebook.relative_to(ROOT).as_posix()
    chapter = next((ch for ch in book.chapters if ch.notebook == rel), None)
    if chapter is None:
        pytest.fail(f"{rel} is not listed in book.toml")
    return book, chapter


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_and_its_py_hold_the_same_cells(notebook):
    assert bk.pairing_problems(notebook) == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_holds_no_outputs(notebook):
    assert bk.output_problems(notebook) == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_first_cell_holds_the_title_and_the_open_in_colab_badge(notebook):
    assert bk.first_cell_problems(*chapter_of(notebook)) == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_chapter_calls_setup_and_installs_in_colab_without_torch(notebook):
    assert bk.setup_problems(*chapter_of(notebook)) == []


def test_nbval_fails_a_check_cell_that_prints_and_passes_one_that_only_asserts(tmp_path):
    """The convention `make test` relies on (see pytest_collection_modifyitems in conftest.py)."""
    import shutil
    import subprocess
    import sys

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nassert 1 + 1 == 2"),
                nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('a wrong value')"),
                nbformat.v4.new_code_cell("print('an ordinary cell may print')")]
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    nbformat.write(nb, str(tmp_path / "check.ipynb"))
    run = subprocess.run([sys.executable, "-m", "pytest", "tests", "check.ipynb", "--nbval-lax", "--nbval-current-env",
                          "-p", "no:cacheprovider", "-q", "-rN", "--color=no"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "1 failed, 2 passed" in run.stdout, run.stdout + run.stderr
    assert "check.ipynb::Cell 1" in run.stdout and "Unexpected output fields" in run.stdout


@pytest.mark.skipif(__import__("shutil").which("make") is None, reason="make is not installed")
def test_make_setup_passes_torch_to_pip_as_arguments_and_only_when_no_torch_is_importable():
    """`make setup TORCH="torch==2.13.0 --index-url ..."` (the README's CPU wheel on Linux) reaches pip
    as separate arguments, in the branch taken only when `import torch` fails. `make -n` runs nothing."""
    import subprocess

    torch_args = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    out = subprocess.run(["make", "-n", "-B", "setup", f"TORCH={torch_args}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    guard = out.index('-c "import torch"')
    otherwise = out.index("else", guard)
    install = out.index(f"-m pip install {torch_args};", otherwise)
    assert guard < otherwise < install < out.index("fi", install), out
