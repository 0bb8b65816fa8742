"""The book builder (diffusion_core.book) on tiny throwaway books in a temporary folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from diffusion_core import book as bk

BOOK_TOML = """
title = "Tiny Book"
subtitle = "for the tests"
repository = "https://github.com/owner/tiny-book"
branch = "main"
"""

CHAPTER_TOML = """
[[chapters]]
number = "{number}"
slug = "{slug}"
title = "{title}"
notebook = "chapters/{number}_{slug}.ipynb"
runtime_minutes = {{ smoke = 1, cpu = 2, gpu = 3 }}

[[chapters.papers]]
title = "A Paper About {title}"
authors = "Ada Lovelace, Alan Turing"
year = 2020
arxiv = "2006.11239"
"""


def make_book(root: Path, chapters: dict[tuple[str, str], list[str]]) -> Path:
    """A book in ``root``: {(number, slug): [code cell sources]}, each with a title cell first."""
    (root / "chapters").mkdir(parents=True, exist_ok=True)
    toml = BOOK_TOML
    for (number, slug), cells in chapters.items():
        title = slug.capitalize()
        toml += CHAPTER_TOML.format(number=number, slug=slug, title=title)
        write_notebook(root / f"chapters/{number}_{slug}.ipynb", [f"# {title}"], cells)
    (root / "book.toml").write_text(toml)
    (root / "README.md").write_text("# Tiny\n\n<!-- chapters:begin -->\nold\n<!-- chapters:end -->\n\nThe end.\n")
    return root


def write_notebook(path: Path, markdown: list[str], code: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(m) for m in markdown] + [nbformat.v4.new_code_cell(c) for c in code]
    nbformat.write(nb, str(path))


def run(root: Path, **kwargs) -> tuple[bk.BuildReport, list[str]]:
    lines: list[str] = []
    report = bk.build(root, profile="smoke", cache=root / "cache", log=lines.append, **kwargs)
    return report, lines


def statuses(report: bk.BuildReport) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


PRINT_ENV = "import os\nprint(os.environ['DIFFUSION_PROFILE'], os.environ['DIFFUSION_HEADLESS'], os.environ['DIFFUSION_CACHE'])"
FIGURE = ("import numpy as np\nfrom diffusion_core import viz\n"
          "viz.image_grid(np.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8), title='grid')")


def test_build_executes_renders_navigation_and_second_build_is_up_to_date(tmp_path):
    root = make_book(tmp_path, {("01", "first"): [PRINT_ENV], ("02", "second"): [FIGURE]})
    report, lines = run(root)
    assert report.exit_code == 0, lines
    assert statuses(report) == {"01_first": "executed", "02_second": "executed"}
    assert any(line.startswith("[1/2] 01_first: executing (profile smoke)") for line in lines)

    executed = nbformat.read(str(root / "_build/notebooks/01_first.ipynb"), as_version=4)
    assert executed.cells[1].outputs[0]["text"].split() == ["smoke", "1", str((root / "cache").resolve())]

    first, second = (root / "_build/01_first.html").read_text(), (root / "_build/02_second.html").read_text()
    assert 'href="02_second.html"' in first and 'href="01_first.html"' in second
    assert 'href="index.html"' in first and 'href="index.html"' in second
    assert "data:image/png;base64" in second  # the figure is embedded in the page
    index = (root / "_build/index.html").read_text()
    assert index.index("01_first.html") < index.index("02_second.html")
    assert "A Paper About First" in index and "https://arxiv.org/abs/2006.11239" in index

    report, lines = run(root)
    assert statuses(report) == {"01_first": "up to date", "02_second": "up to date"}
    assert not any("executing" in line for line in lines)
    assert report.exit_code == 0


def test_changed_notebook_is_executed_again_and_force_executes_all(tmp_path):
    root = make_book(tmp_path, {("01", "only"): ["x = 1"]})
    assert statuses(run(root)[0]) == {"01_only": "executed"}

    # Outputs and metadata do not count: only the cells' sources do.
    nb = nbformat.read(str(root / "chapters/01_only.ipynb"), as_version=4)
    nb.metadata["touched"] = True
    nbformat.write(nb, str(root / "chapters/01_only.ipynb"))
    assert statuses(run(root)[0]) == {"01_only": "up to date"}

    write_notebook(root / "chapters/01_only.ipynb", ["# Only"], ["x = 2\nprint(x)"])
    report, _ = run(root)
    assert statuses(report) == {"01_only": "executed"}
    executed = nbformat.read(str(root / "_build/notebooks/01_only.ipynb"), as_version=4)
    assert executed.cells[1].outputs[0]["text"] == "2\n"

    assert statuses(run(root, force=True)[0]) == {"01_only": "executed"}


def test_failing_cell_names_chapter_and_cell_and_the_others_still_build(tmp_path, capsys):
    root = make_book(tmp_path, {("01", "broken"): ["a = 1", "raise ValueError('the loss is nan')"],
                                ("02", "fine"): ["b = 2"]})
    code = bk.main(["--root", str(root), "build", "--profile", "smoke", "--cache", str(root / "cache")])
    out = capsys.readouterr().out
    assert code == 1
    assert "01_broken failed in cell 3 of 3" in out and "ValueError: the loss is nan" in out
    assert "02_fine: done" in out
    state = json.loads((root / "_build/.state.json").read_text())
    assert state["chapters"]["01_broken"]["status"] == "failed"
    assert "This chapter failed to build" in (root / "_build/01_broken.html").read_text()

    # A failed chapter is never "up to date": the next build tries it again.
    report, lines = run(root)
    assert statuses(report) == {"01_broken": "failed", "02_fine": "up to date"}
    assert report.exit_code == 1


def test_fingerprint_follows_cells_profile_and_package_but_not_outputs(tmp_path):
    path = tmp_path / "nb.ipynb"
    write_notebook(path, ["# T"], ["print(1)"])
    base = bk.fingerprint(path, "smoke", "pkg")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[1].execution_count = 1
    nbformat.write(nb, str(path))
    assert bk.fingerprint(path, "smoke", "pkg") == base
    assert bk.fingerprint(path, "cpu", "pkg") != base
    assert bk.fingerprint(path, "smoke", "pkg2") != base
    write_notebook(path, ["# T"], ["print(2)"])
    assert bk.fingerprint(path, "smoke", "pkg") != base


def test_missing_notebook_fails_the_build(tmp_path):
    root = make_book(tmp_path, {("01", "gone"): ["x = 1"]})
    (root / "chapters/01_gone.ipynb").unlink()
    report, lines = run(root)
    assert statuses(report) == {"01_gone": "missing"}
    assert report.exit_code == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": -5}, "timeout must be a positive number"),
    ({"timeout": 0}, "timeout must be a positive number"),
    ({"timeout": float("nan")}, "timeout must be a positive number"),
    ({"timeout": "60"}, "timeout must be a positive number"),
    ({"out": "file.txt"}, "out: cannot make the output folder"),
    ({"cache": "file.txt"}, "cache: cannot make the model cache folder"),
])
def test_bad_build_arguments_are_clear_errors_before_anything_runs(tmp_path, kwargs, message):
    root = make_book(tmp_path, {("01", "one"): ["x = 1"]})
    (tmp_path / "file.txt").write_text("a file, not a folder")
    kwargs = {k: tmp_path / v if k in ("out", "cache") else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        bk.build(root, log=lambda s: None, **kwargs)
    assert not (root / "_build" / "01_one.html").exists()
    assert bk.main(["--root", str(root), "build", "--timeout", "-5"]) == 2   # the command line says so too


def test_validation_lists_every_problem():
    data = {"title": "T", "repository": "https://gitlab.com/x/y", "branch": "main", "chapters": [
        {"number": 1, "slug": "Bad Slug", "title": "", "notebook": "x.ipynb",
         "runtime_minutes": {"smoke": 1, "cpu": 0}, "papers": [{"title": "P", "year": "2020", "arxiv": "abc"}]},
    ]}
    problems = "\n".join(bk.validate_book_data(data))
    for needle in ("repository must be", "number must be", "slug must be", "notebook must be",
                   "runtime_minutes.cpu", "runtime_minutes.gpu", "missing 'authors'", "year must be",
                   "arxiv must be", "empty title"):
        assert needle in problems


def test_readme_table_is_generated_between_markers(tmp_path):
    root = make_book(tmp_path, {("01", "first"): ["x = 1"]})
    book = bk.load_book(root)
    assert bk.update_readme(book, check=True) is True
    assert "old" in (root / "README.md").read_text()  # check only reports
    assert bk.update_readme(book) is True
    text = (root / "README.md").read_text()
    assert "old" not in text and text.endswith("The end.\n")
    row = next(line for line in text.splitlines() if line.startswith("| 01 "))
    assert "[A Paper About First](https://arxiv.org/abs/2006.11239), Ada Lovelace, Alan Turing (2020)" in row
    assert "| 1 min | 2 min | 3 min |" in row
    assert ("(https://colab.research.google.com/github/owner/tiny-book/blob/main/chapters/01_first.ipynb)"
            in row)
    assert bk.update_readme(book, check=True) is False
    assert bk.main(["--root", str(root), "readme", "--check"]) == 0


def test_colab_url_follows_repository_and_branch(tmp_path):
    root = make_book(tmp_path, {("01", "first"): ["x = 1"]})
    book = bk.load_book(root)
    assert bk.colab_url(book, book.chapter("01")) == (
        "https://colab.research.google.com/github/owner/tiny-book/blob/main/chapters/01_first.ipynb")
    with pytest.raises(KeyError):
        book.chapter("99")


# ---- a chapter's conventions (what tests/test_repo.py checks on every real chapter) ----------------

GOOD_CHAPTER = '''# %% [markdown]
# # First
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/owner/tiny-book/blob/main/chapters/01_first.ipynb)

# %%
import subprocess, sys
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    subprocess.run([sys.executable, "-m", "pip", "install", "git+https://github.com/owner/tiny-book"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "open_clip_torch>=2.20"], check=True)
import diffusion_core as dc
profile = dc.setup()
'''


def paired_chapter(root: Path, text: str) -> tuple[bk.Book, bk.Chapter]:
    import jupytext

    make_book(root, {("01", "first"): []})
    (root / "chapters/01_first.py").write_text(text)
    jupytext.write(jupytext.reads(text, fmt="py:percent"), root / "chapters/01_first.ipynb")
    book = bk.load_book(root)
    return book, book.chapter("01")


def test_a_chapter_following_the_conventions_has_no_problems(tmp_path):
    book, ch = paired_chapter(tmp_path, GOOD_CHAPTER)
    assert bk.chapter_problems(book, ch) == []
    assert bk.main(["--root", str(tmp_path), "check"]) == 0


def test_unsynced_pair_and_committed_outputs_are_reported(tmp_path):
    book, ch = paired_chapter(tmp_path, GOOD_CHAPTER)
    (tmp_path / "chapters/01_first.py").write_text(GOOD_CHAPTER + "\n# %%\nx = 1\n")
    assert "jupytext --sync" in " ".join(bk.pairing_problems(tmp_path / ch.notebook))
    nb = nbformat.read(str(tmp_path / ch.notebook), as_version=4)
    nb.cells[1].execution_count = 3
    nbformat.write(nb, str(tmp_path / ch.notebook))
    assert bk.output_problems(tmp_path / ch.notebook) == [
        "01_first.ipynb cell 2 holds outputs or an execution count: clear them (`jupytext --sync` from the .py does)"]
    (tmp_path / "chapters/01_first.py").unlink()
    assert "has no paired 01_first.py" in bk.pairing_problems(tmp_path / ch.notebook)[0]


@pytest.mark.parametrize("change, complaint", [
    (("# # First", "# # Something else"), "lacks the title"),
    (("blob/main/", "blob/dev/"), "lacks the badge"),
    (("profile = dc.setup()", "profile = None"), "no setup cell"),
    (("if IN_COLAB:\n    subprocess", "if True:\n    subprocess"), "only in Colab"),
    (('"git+https://github.com/owner/tiny-book"', '"torch>=2.1", "git+https://github.com/owner/tiny-book"'),
     "never (re)install torch"),
    (("github.com/owner/tiny-book\"", "github.com/someone/else\""), "not from the book's repository"),
])
def test_a_chapter_breaking_a_convention_is_reported(tmp_path, change, complaint):
    book, ch = paired_chapter(tmp_path, GOOD_CHAPTER.replace(*change))
    problems = bk.chapter_problems(book, ch)
    assert any(complaint in p for p in problems), problems
    assert bk.main(["--root", str(tmp_path), "check"]) == 1


# ---- the build's kernels and its pages ---------------------------------------------------------------

PID = "import os\nprint(os.getpid())"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def test_each_kernel_is_shut_down_and_each_page_written_as_soon_as_its_chapter_is_done(tmp_path, monkeypatch):
    runtime = tmp_path / "runtime"  # where the kernels' connection files go
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    root = make_book(tmp_path / "book", {("01", "first"): [PID], ("02", "second"): [PID, "raise ValueError('no')"]})
    out = root / "_build"

    def pid(name: str) -> int:
        return int(nbformat.read(str(out / f"notebooks/{name}.ipynb"), as_version=4).cells[1].outputs[0]["text"])

    seen: dict[str, object] = {}

    def log(line: str) -> None:
        if "02_second: executing" in line:  # chapter 01 is done: its kernel gone, its page written
            seen["kernel alive"] = alive(pid("01_first"))
            seen["connection files"] = sorted(p.name for p in runtime.glob("kernel-*.json"))
            seen["page"] = (out / "01_first.html").is_file()
            seen["index links it"] = 'href="01_first.html"' in (out / "index.html").read_text()
            seen["index says running"] = "running in this build" in (out / "index.html").read_text()

    report = bk.build(root, profile="smoke", cache=root / "cache", log=log)
    assert statuses(report) == {"01_first": "executed", "02_second": "failed"}
    assert seen == {"kernel alive": False, "connection files": [], "page": True, "index links it": True,
                    "index says running": True}
    assert not alive(pid("02_second"))  # a failed chapter's kernel is shut down too
    assert not list(runtime.glob("kernel-*.json"))
    index = (out / "index.html").read_text()
    assert "in this build" not in index and 'href="02_second.html"' in index


def tqdm_widget(nb, model: str, left: str, value: float, top: float, right: str) -> dict:
    """A tqdm.notebook bar as nbclient records it: an HBox of HTML, FloatProgress, HTML, and its view."""
    state = nb.metadata.setdefault("widgets", {}).setdefault(
        "application/vnd.jupyter.widget-state+json", {"state": {}, "version_major": 2, "version_minor": 0})["state"]
    kids = [(f"{model}-l", "HTMLModel", {"value": left}), (f"{model}-b", "FloatProgressModel", {"value": value, "max": top}),
            (f"{model}-r", "HTMLModel", {"value": right})]
    for kid, name, st in kids:
        state[kid] = {"model_name": name, "state": st}
    state[model] = {"model_name": "HBoxModel", "state": {"children": [f"IPY_MODEL_{k}" for k, _, _ in kids]}}
    return nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": model, "version_major": 2, "version_minor": 0},
        "text/plain": "  0%|          | 0/300"})


def test_a_page_is_static_and_offline_and_a_smoke_page_says_so(tmp_path):
    root = make_book(tmp_path, {("01", "first"): [], ("02", "second"): []})
    book = bk.load_book(root)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# First\n{bk.colab_badge(book, book.chapter('01'))}\n\n"
                                              "See $x_t$ and [the next one](02_second.ipynb)."),
                nbformat.v4.new_code_cell("train()"), nbformat.v4.new_code_cell("explore(draw, t=(0, 9, 1))"),
                nbformat.v4.new_code_cell("w = IntSlider()\nw")]
    nb.cells[1].outputs = [tqdm_widget(nb, "bar", "toy&#x2007;DDPM: 100%", 300, 300, "300/300 [00:01&lt;00:00]")]
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="Shown at t=4\n")]
    nb.cells[3].outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "slider"}, "text/plain": "IntSlider(value=0)"})]
    first, second = book.chapter("01"), book.chapter("02")

    page = bk.render_chapter_page(nb, book, first, None, second, profile="smoke", linked={"01_first"})
    for external in ("cdnjs", "unpkg", "require.js", "colab-badge.svg", "widget-state+json"):
        assert external not in page
    assert 'src="_static/mathjax/MathJax.js' in page and "$x_t$" in page
    assert 'href="02_second.html"' not in page.split("</nav>")[0]  # 02 has no page: not linked in the bar
    assert 'href="02_second.html">the next one' in page  # a link to a chapter's notebook leads to its page
    assert 'class="book-colab-badge"' in page
    assert "toy\u2007DDPM: 100%" in page and "300/300 [00:01&lt;00:00]" in page
    assert re.search(r'<progress (?=[^>]*value="300")(?=[^>]*max="300")', page)
    assert " 0/300" not in page  # the bar's last state, not its first text
    assert "sliders move it" in page and "An interactive control was here" in page
    assert "barely trained" in page

    page = bk.render_chapter_page(nb, book, first, None, second, profile="cpu")
    assert "barely trained" not in page and 'href="02_second.html" title=' in page
    assert "widgets" in nb.metadata  # the notebook itself is left as it was
