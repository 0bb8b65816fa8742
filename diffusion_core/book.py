"""Build the book from ``book.toml``: execute the chapters incrementally and render them as HTML.

Commands (run from the repository root; ``make book`` calls the first)::

    python -m diffusion_core.book build [--profile smoke|cpu|gpu] [--force] [--only 01 ddpm ...]
    python -m diffusion_core.book build --cold       # each chapter from an empty model cache
    python -m diffusion_core.book runtimes           # the run times the builds recorded
    python -m diffusion_core.book readme [--check]   # the chapter table in README.md
    python -m diffusion_core.book check              # validate book.toml against chapters/
    python -m diffusion_core.book badge 01           # the "Open in Colab" badge for a first cell

``build`` executes every chapter listed in ``book.toml`` in a fresh kernel of this Python, with
``DIFFUSION_PROFILE``, ``DIFFUSION_HEADLESS=1`` and ``DIFFUSION_CACHE`` (trained models shared
across chapters; default ``.cache/models``) set, shuts that kernel down (and removes its connection
file) as soon as the chapter is done, writes the chapter's page ``_build/<number>_<slug>.html`` at
once, and rewrites ``_build/index.html`` after every chapter. A chapter is executed again only when
its fingerprint changed: the hash of its notebook's cells, of every ``diffusion_core/**/*.py`` but
this builder and of the profile. A failing chapter is reported with its cell, the others still
build, and the exit code is 1.

The pages work offline, opened from disk: MathJax is copied into ``_build/_static/mathjax`` (from
the jupyter-server-mathjax package), nothing is loaded from a CDN, widgets show what they drew, the
Colab badge is text, and a page built at the smoke profile says on top that its models are barely
trained. With a Chromium (or Chrome) on PATH, ``build`` also saves ``_build/screenshot-index.png``
and ``_build/screenshot-<chapter>.png``, taken offline at 1280 px wide (``--no-screenshots``: not).

The format of ``book.toml``: top-level ``title``, ``subtitle``, ``repository``
(``https://github.com/OWNER/REPO``) and ``branch``; then one ``[[chapters]]`` table per chapter in
reading order with ``number`` (``"01"``, or ``"A"`` for an appendix), ``slug``, ``title``,
``notebook`` (``chapters/<number>_<slug>.ipynb``), ``runtime_minutes = {smoke, cpu, gpu}`` (``cpu`` in
reading order; optional ``cpu_cold``, from an empty model cache) and one
or more ``[[chapters.papers]]`` with ``title``, ``authors``, ``year`` and ``arxiv``. Optional:
``summary`` (one line shown in the index).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import html
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .profiles import PROFILES, check_profile, detect_profile

__all__ = [
    "Paper", "Chapter", "Book", "BookError", "ChapterResult", "BuildReport",
    "load_book", "validate_book_data", "notebook_problems", "pairing_problems", "output_problems",
    "first_cell_problems", "setup_problems", "chapter_problems", "fingerprint",
    "build", "readme_table", "update_readme", "colab_url", "colab_badge", "main",
]

PACKAGE_DIR = Path(__file__).resolve().parent
COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
README_BEGIN = "<!-- chapters:begin"
README_END = "<!-- chapters:end -->"
_README_BEGIN_LINE = (README_BEGIN + " (generated from book.toml by `python -m diffusion_core.book readme`;"
                      " edit book.toml, not this table) -->")
_STATE_VERSION = 1
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class BookError(ValueError):
    """book.toml is missing or malformed; the message lists every problem found."""


# --------------------------------------------------------------------------------------------
# book.toml
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    year: int
    arxiv: str

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


@dataclass(frozen=True)
class Chapter:
    number: str
    slug: str
    title: str
    notebook: str  # relative to the book's root
    runtime_minutes: dict[str, float]
    papers: tuple[Paper, ...]
    summary: str = ""

    @property
    def name(self) -> str:
        """``01_ddpm``: the notebook's stem and the name of its page."""
        return f"{self.number}_{self.slug}"


@dataclass(frozen=True)
class Book:
    root: Path
    title: str
    subtitle: str
    repository: str
    branch: str
    chapters: tuple[Chapter, ...]

    @property
    def github(self) -> tuple[str, str]:
        """(owner, repo) of the GitHub repository."""
        m = re.match(r"https?://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?$", self.repository)
        if not m:
            raise BookError(f"repository must be https://github.com/OWNER/REPO, got {self.repository!r}")
        return m.group(1), m.group(2)

    def chapter(self, key: str) -> Chapter:
        """The chapter whose number, slug or name is ``key``."""
        for ch in self.chapters:
            if key in (ch.number, ch.slug, ch.name):
                return ch
        raise KeyError(f"no chapter {key!r} in book.toml (have: {', '.join(c.name for c in self.chapters)})")


_REQUIRED_TOP = ("title", "repository", "branch")
#: optional in runtime_minutes: the cpu run time from an empty model cache (``cpu`` is in reading order)
_OPTIONAL_RUNTIMES = ("cpu_cold",)
_REQUIRED_CHAPTER = ("number", "slug", "title", "notebook", "runtime_minutes", "papers")
_REQUIRED_PAPER = ("title", "authors", "year", "arxiv")


def validate_book_data(data: dict[str, Any]) -> list[str]:
    """Every problem with the structure of a parsed book.toml (an empty list when it is valid)."""
    problems = [f"book.toml: missing top-level field {k!r}" for k in _REQUIRED_TOP if not data.get(k)]
    repo = data.get("repository", "")
    if repo and not re.match(r"https?://github\.com/[^/]+/[^/]+?/?$", str(repo)):
        problems.append(f"book.toml: repository must be https://github.com/OWNER/REPO, got {repo!r}")
    chapters = data.get("chapters")
    if not isinstance(chapters, list) or not chapters:
        return problems + ["book.toml: no [[chapters]]"]
    seen: dict[str, set[str]] = {"number": set(), "slug": set()}
    for i, ch in enumerate(chapters, 1):
        where = f"book.toml chapter {i} ({ch.get('number', '?')}_{ch.get('slug', '?')})"
        problems += [f"{where}: missing {k!r}" for k in _REQUIRED_CHAPTER if k not in ch]
        number, slug = str(ch.get("number", "")), str(ch.get("slug", ""))
        if "number" in ch and not (isinstance(ch["number"], str) and re.fullmatch(r"\d{2}|[A-Z]", number)):
            problems.append(f"{where}: number must be a string of two digits (\"01\") or a letter, got {ch['number']!r}")
        if "slug" in ch and not re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", slug):
            problems.append(f"{where}: slug must be lower_snake_case, got {slug!r}")
        for key, value in (("number", number), ("slug", slug)):
            if value in seen[key]:
                problems.append(f"{where}: duplicate {key} {value!r}")
            seen[key].add(value)
        if "notebook" in ch and ch["notebook"] != f"chapters/{number}_{slug}.ipynb":
            problems.append(f"{where}: notebook must be chapters/{number}_{slug}.ipynb, got {ch['notebook']!r}")
        if "title" in ch and not str(ch["title"]).strip():
            problems.append(f"{where}: empty title")
        rt = ch.get("runtime_minutes")
        if rt is not None:
            if not isinstance(rt, dict):
                problems.append(f"{where}: runtime_minutes must be a table {{smoke, cpu, gpu}}")
            else:
                for p in PROFILES + _OPTIONAL_RUNTIMES:
                    v = rt.get(p)
                    if p in _OPTIONAL_RUNTIMES and v is None:
                        continue
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                        problems.append(f"{where}: runtime_minutes.{p} must be a positive number, got {v!r}")
                extra = sorted(set(rt) - set(PROFILES) - set(_OPTIONAL_RUNTIMES))
                if extra:
                    problems.append(f"{where}: runtime_minutes has unknown keys {extra} (expected "
                                    f"{', '.join(PROFILES + _OPTIONAL_RUNTIMES)})")
        papers = ch.get("papers")
        if papers is not None:
            if not isinstance(papers, list) or not papers:
                problems.append(f"{where}: papers must hold at least one [[chapters.papers]]")
            else:
                for j, paper in enumerate(papers, 1):
                    pw = f"{where} paper {j}"
                    problems += [f"{pw}: missing {k!r}" for k in _REQUIRED_PAPER if not paper.get(k)]
                    year = paper.get("year")
                    if year is not None and not (isinstance(year, int) and 1900 < year < 2100):
                        problems.append(f"{pw}: year must be an integer, got {year!r}")
                    arxiv = paper.get("arxiv")
                    if arxiv is not None and not re.fullmatch(r"\d{4}\.\d{4,5}", str(arxiv)):
                        problems.append(f"{pw}: arxiv must be an identifier like \"2006.11239\", got {arxiv!r}")
    return problems


def load_book(root: str | os.PathLike[str] = ".") -> Book:
    """Read and validate ``root/book.toml``; raises :class:`BookError` listing every problem."""
    root = Path(root).resolve()
    path = root / "book.toml"
    if not path.is_file():
        raise BookError(f"no book.toml in {root}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BookError(f"book.toml is not valid TOML: {exc}") from exc
    problems = validate_book_data(data)
    if problems:
        raise BookError("\n".join(problems))
    chapters = tuple(
        Chapter(number=ch["number"], slug=ch["slug"], title=ch["title"], notebook=ch["notebook"],
                runtime_minutes={p: ch["runtime_minutes"][p] for p in PROFILES + _OPTIONAL_RUNTIMES
                                 if p in ch["runtime_minutes"]},
                papers=tuple(Paper(str(p["title"]), str(p["authors"]), int(p["year"]), str(p["arxiv"]))
                             for p in ch["papers"]),
                summary=str(ch.get("summary", "")))
        for ch in data["chapters"])
    return Book(root=root, title=data["title"], subtitle=data.get("subtitle", ""),
                repository=data["repository"].rstrip("/"), branch=data["branch"], chapters=chapters)


def notebook_problems(book: Book) -> list[str]:
    """Notebooks that book.toml names but that do not exist, and chapters/*.ipynb it does not list."""
    problems = [f"book.toml names {ch.notebook}, which does not exist"
                for ch in book.chapters if not (book.root / ch.notebook).is_file()]
    listed = {ch.notebook for ch in book.chapters}
    for nb in sorted((book.root / "chapters").glob("*.ipynb")):
        rel = nb.relative_to(book.root).as_posix()
        if rel not in listed:
            problems.append(f"{rel} is not listed in book.toml")
    return problems


def colab_url(book: Book, chapter: Chapter) -> str:
    owner, repo = book.github
    return f"https://colab.research.google.com/github/{owner}/{repo}/blob/{book.branch}/{chapter.notebook}"


def colab_badge(book: Book, chapter: Chapter) -> str:
    """The Markdown badge a chapter's first cell carries."""
    return f"[![Open In Colab]({COLAB_BADGE_IMAGE})]({colab_url(book, chapter)})"


# --------------------------------------------------------------------------------------------
# A chapter's conventions (tests/test_repo.py checks every chapter with these)
# --------------------------------------------------------------------------------------------

def _read(path: Path) -> Any:
    import nbformat

    return nbformat.read(str(path), as_version=4)


def pairing_problems(notebook: str | os.PathLike[str]) -> list[str]:
    """The notebook and its jupytext twin (``.py``, percent format) must hold the same cells."""
    import jupytext

    nb = Path(notebook)
    py = nb.with_suffix(".py")
    if not py.is_file():
        return [f"{nb.name} has no paired {py.name}: run `jupytext --set-formats ipynb,py:percent {nb}`"]
    a = [(c.cell_type, c.source.strip()) for c in jupytext.read(nb).cells]
    b = [(c.cell_type, c.source.strip()) for c in jupytext.read(py).cells]
    if a != b:
        where = next((i for i, (x, y) in enumerate(zip(a, b), 1) if x != y), min(len(a), len(b)) + 1)
        return [f"{py.name} and {nb.name} differ (first at cell {where}): run `jupytext --sync {py}`"]
    return []


def output_problems(notebook: str | os.PathLike[str]) -> list[str]:
    """A committed notebook holds no outputs and no execution counts (the build makes them)."""
    nb = _read(Path(notebook))
    return [f"{Path(notebook).name} cell {i} holds outputs or an execution count: clear them "
            f"(`jupytext --sync` from the .py does)"
            for i, c in enumerate(nb.cells, 1)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def first_cell_problems(book: Book, chapter: Chapter) -> list[str]:
    """The first cell is Markdown with the chapter's title (in a heading) and its Open in Colab badge."""
    cells = _read(book.root / chapter.notebook).cells
    first = cells[0] if cells else None
    if first is None or first.cell_type != "markdown":
        return [f"{chapter.name}: the first cell must be Markdown with the title and the Colab badge"]
    problems = []
    headings = [line.lower() for line in first.source.splitlines() if line.lstrip().startswith("#")]
    if not any(chapter.title.lower() in h for h in headings):
        problems.append(f"{chapter.name}: the first cell lacks the title {chapter.title!r} in a heading")
    if colab_url(book, chapter) not in first.source or "open in colab" not in first.source.lower():
        problems.append(f"{chapter.name}: the first cell lacks the badge {colab_badge(book, chapter)}")
    return problems


_INSTALL = re.compile(r"""pip["',\s]+install""")
_TORCH_REQ = re.compile(r"^(torch|torchvision|torchaudio)([<>=!~;].*)?$")


def setup_problems(book: Book, chapter: Chapter) -> list[str]:
    """A ``diffusion_core.setup(`` (or ``dc.setup(``) call, and a Colab-only install without torch.

    The install cell runs pip only under an ``if`` that names Colab (``if IN_COLAB:``), never names
    torch, torchvision or torchaudio (Colab's torch meets the package's lower bound and must stay),
    and, where it installs from git, takes the package from the book's repository.
    """
    code = [c.source for c in _read(book.root / chapter.notebook).cells if c.cell_type == "code"]
    problems = []
    if not any(re.search(r"\b(diffusion_core|dc)\.setup\(", src) for src in code):
        problems.append(f"{chapter.name}: no setup cell calling diffusion_core.setup(...) (or dc.setup(...))")
    installs = [src for src in code if _INSTALL.search(src)]
    if not installs:
        problems.append(f"{chapter.name}: no Colab install cell (pip install of the package under `if IN_COLAB:`)")
    for src in installs:
        if not re.search(r"^\s*if\b.*colab", src, re.M | re.I):
            problems.append(f"{chapter.name}: pip install must run only in Colab (under `if IN_COLAB:`)")
        for line in src.splitlines():
            match = _INSTALL.search(line)
            if match is None:
                continue
            if any(_TORCH_REQ.match(tok) for tok in re.findall(r"""[^\s"',\[\]()]+""", line[match.end():])):
                problems.append(f"{chapter.name}: the Colab install must never (re)install torch: {line.strip()}")
            for url in re.findall(r"git\+([^\s\"'@#]+)", line):
                if url.rstrip("/").removesuffix(".git") != book.repository:
                    problems.append(f"{chapter.name}: the Colab install takes the package from {url}, "
                                    f"not from the book's repository {book.repository}")
    return problems


def chapter_problems(book: Book, chapter: Chapter) -> list[str]:
    """Every convention above, for one chapter (a missing notebook is the only problem reported)."""
    path = book.root / chapter.notebook
    if not path.is_file():
        return [f"book.toml names {chapter.notebook}, which does not exist"]
    return (pairing_problems(path) + output_problems(path) + first_cell_problems(book, chapter)
            + setup_problems(book, chapter))


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------

def _minutes(v: float) -> str:
    return f"{v:g} min"


def _cpu_minutes(ch: Chapter) -> str:
    """``cpu`` in reading order, and from an empty cache where book.toml has it and it differs."""
    cpu, cold = ch.runtime_minutes["cpu"], ch.runtime_minutes.get("cpu_cold")
    return _minutes(cpu) if cold is None or cold == cpu else f"{_minutes(cpu)} ({cold:g} cold)"


def readme_table(book: Book) -> str:
    """The README's chapter table (Markdown), generated from book.toml."""
    rows = ["| # | Chapter | Paper | smoke | cpu | gpu | |", "|---|---|---|---|---|---|---|"]
    for ch in book.chapters:
        papers = "<br>".join(f"[{p.title}]({p.url}), {p.authors} ({p.year})" for p in ch.papers)
        rt = " | ".join(_cpu_minutes(ch) if p == "cpu" else _minutes(ch.runtime_minutes[p]) for p in PROFILES)
        rows.append(f"| {ch.number} | [{ch.title}]({ch.notebook}) | {papers} | {rt} | {colab_badge(book, ch)} |")
    return "\n".join(rows)


def _readme_block(book: Book) -> str:
    return f"{_README_BEGIN_LINE}\n{readme_table(book)}\n{README_END}"


def update_readme(book: Book, path: str | os.PathLike[str] | None = None, check: bool = False) -> bool:
    """Rewrite the table between the README's markers; True when it was (or, with check, is) stale.

    With ``check=True`` nothing is written.
    """
    path = Path(path) if path is not None else book.root / "README.md"
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise BookError(f"{path} has no chapter table markers ({README_BEGIN} ... -->, {README_END})")
    new = text[:start] + _readme_block(book) + text[end + len(README_END):]
    if new == text:
        return False
    if not check:
        path.write_text(new, encoding="utf-8")
    return True


# --------------------------------------------------------------------------------------------
# Fingerprints and state
# --------------------------------------------------------------------------------------------

def _package_dir(root: Path) -> Path:
    """The package the chapters import: this tree's when the book's root holds one."""
    local = root / "diffusion_core"
    return local if (local / "__init__.py").is_file() else PACKAGE_DIR


def _package_digest(package_dir: Path) -> str:
    """Hash of the package's code that the chapters run: every module but this one (the builder,
    which no chapter imports; a change to how pages look re-renders them, see _renderer_digest)."""
    h = hashlib.sha256()
    for py in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in py.parts or py.relative_to(package_dir).as_posix() == "book.py":
            continue
        h.update(py.relative_to(package_dir).as_posix().encode() + b"\0")
        h.update(py.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(notebook: str | os.PathLike[str], profile: str, package_digest: str) -> str:
    """Hash of the notebook's cells (type and source), the package's code and the profile.

    Outputs and metadata do not count: re-saving a notebook in Jupyter does not rebuild it.
    """
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    h = hashlib.sha256(f"profile={profile}\0package={package_digest}\0".encode())
    for cell in nb.cells:
        h.update(f"{cell.cell_type}\0{cell.source}\0".encode())
    return h.hexdigest()


def _renderer_digest() -> str:
    """Hash of this module: part of every page's key, so a change to the renderer rewrites the pages
    (without executing any chapter again)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"version": _STATE_VERSION, "chapters": {}}
    if state.get("version") != _STATE_VERSION:
        return {"version": _STATE_VERSION, "chapters": {}}
    return state


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------

class ChapterFailed(Exception):
    """A chapter's notebook stopped with an error; ``cell`` is 1-based over all its cells."""

    def __init__(self, cell: int | None, ncells: int, first_line: str, error: str, trace: str = ""):
        self.cell, self.ncells, self.first_line, self.error, self.trace = cell, ncells, first_line, error, trace
        where = f"cell {cell} of {ncells}" if cell else "starting the kernel"
        super().__init__(f"{where} ({first_line!r}): {error}" if first_line else f"{where}: {error}")


def _kernel_manager() -> Any:
    """A kernel manager that always starts ipykernel in *this* Python (the book's environment).

    A ``python3`` kernelspec elsewhere (a user's ~/.local/share/jupyter) cannot take over.
    """
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class _ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            # log level ERROR: no "running over TCP without encryption" warning for every chapter
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                                    "--IPKernelApp.log_level=ERROR"],
                              display_name="Python 3 (diffusion book)", language="python",
                              resource_dir=str(PACKAGE_DIR))

    return KernelManager(kernel_name="python3", kernel_spec_manager=_ThisPython())


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()[:80]
    return ""


def execute_notebook(nb: Any, cwd: Path, env: dict[str, str], timeout: int | None = None,
                     on_cell: Callable[[int], None] | None = None) -> None:
    """Run every cell of ``nb`` (in place) in a fresh kernel; raises :class:`ChapterFailed`."""
    from nbclient import NotebookClient

    current: dict[str, int] = {}

    def started(cell: Any, cell_index: int) -> None:
        current["index"] = cell_index

    def executed(cell: Any, cell_index: int, execute_reply: Any) -> None:
        if on_cell is not None:
            on_cell(cell_index)

    km = _kernel_manager()
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False,
                            resources={"metadata": {"path": str(cwd)}},
                            on_cell_start=started, on_cell_executed=executed)
    try:
        client.execute(env=env)
    except Exception as exc:
        index = current.get("index")
        cell = nb.cells[index] if index is not None else None
        error, trace = f"{type(exc).__name__}: {exc}".splitlines()[0], ""
        for out in cell.get("outputs", []) if cell is not None else []:
            if out.get("output_type") == "error":
                error = f"{out.get('ename')}: {out.get('evalue')}"
                trace = _ANSI.sub("", "\n".join(out.get("traceback", [])))
        raise ChapterFailed(None if index is None else index + 1, len(nb.cells),
                            _first_line(cell.source) if cell is not None else "", error, trace) from exc
    finally:
        _shutdown_kernel(client, km)


def _shutdown_kernel(client: Any, km: Any) -> None:
    """Stop the chapter's kernel now and remove its connection file.

    nbclient leaves a kernel it was handed (``km=``) running; a build of the whole book would
    otherwise hold every finished chapter's kernel (and its memory) until it exits.
    """
    kc = getattr(client, "kc", None)
    if kc is not None:
        try:
            kc.stop_channels()
        except Exception:
            pass
    try:
        if km.has_kernel:
            km.shutdown_kernel(now=False)  # asks politely, kills after km.shutdown_wait_time
    except Exception:
        try:
            km.shutdown_kernel(now=True)
        except Exception:
            pass
    try:
        km.cleanup_resources()  # the connection file, also when the kernel never started
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
# Pages work offline, opened from disk: no script, stylesheet or image is loaded from the network.
# nbconvert's lab template loads require.js, MathJax and the widget manager from CDNs; the book's
# template (below) drops require.js and the widget manager, and loads MathJax 2 from a copy in
# _build/_static/mathjax, taken from the jupyter-server-mathjax package (the book extra).

STATIC_DIR = "_static"
MATHJAX_DIR = f"{STATIC_DIR}/mathjax"
# Not copied: the accessibility explorer, translations (English is built in) and the SVG output's fonts.
_MATHJAX_SKIP = {"extensions/a11y", "localization", "jax/output/SVG"}
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_EXPLORE_CALL = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?explore\(", re.M)
_EXTERNAL_IMG = re.compile(r"<img\b[^>]*?\bsrc=[\"']((?:https?:)?//[^\"']*)[\"'][^>]*>", re.I)
_CHAPTER_LINK = re.compile(r"""href=(["'])(?:\./)?(?:chapters/)?([0-9A-Z]{1,2}_[a-z0-9_]+)\.ipynb(#[^"']*)?\1""")
SCREENSHOT_WIDTH = 1280

_SLIDER_NOTE = ('<div class="book-note">On this page the figure is drawn once, at the values printed above. '
                "Run the chapter in Jupyter (<code>make lab</code>) or in Colab and its sliders move it.</div>")
_WIDGET_NOTE = ('<div class="book-note">An interactive control was here: it moves only when the chapter runs '
                "in Jupyter (<code>make lab</code>) or in Colab.</div>")
_COLAB_BADGE = ('<span class="book-colab-badge" role="img" aria-label="Open In Colab">'
                "<span>Open in</span><span>Colab</span></span>")

_MATHJAX_HEAD = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: {inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]], displayMath: [["$$", "$$"], ["\\\\[", "\\\\]"]],
            processEscapes: true, processEnvironments: true},
  TeX: {equationNumbers: {autoNumber: "AMS", useLabelIds: true}},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null,
               linebreaks: {automatic: true},
               // MathJax's font probe, url('about:blank'), is a CORS error in a page opened from disk
               styles: {"@font-face": {"font-family": "MathJax_Blank", src: "local('MathJax Blank')"}}},
  "fast-preview": {disabled: true},
  menuSettings: {CHTMLpreview: false},
  displayAlign: "center", messageStyle: "none", showMathMenu: true
});
</script>
<script src="MATHJAX_DIR/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"></script>""".replace(
    "MATHJAX_DIR", MATHJAX_DIR)

_NO_MATHJAX_HEAD = ("<!-- formulas are left as TeX: jupyter-server-mathjax (the book extra) was not installed "
                    "when this page was built -->")

# nbconvert's lab template with the network taken out (see above).
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
{{ resources.book_mathjax }}
{%- endblock html_head_js_mathjax -%}
"""

# The last rule: MathJax's hidden MathML for screen readers would ask for TeX fonts
# (MathJax_AMS-Regular.otf, ...) that jupyter-server-mathjax does not ship: a failed load each.
_CSS = """
.book-nav{font-family:system-ui,sans-serif;font-size:15px;display:flex;flex-wrap:nowrap;gap:1.2em;align-items:center;
 white-space:nowrap;padding:.6em 1.2em;background:#f6f8fa;border-bottom:1px solid #d0d7de}
.book-nav>*{flex:none}
.book-nav .prev,.book-nav .next{flex:0 1 auto;min-width:5em;display:flex}
.book-nav .title{overflow:hidden;text-overflow:ellipsis}
.book-nav .spacer{flex:1 1 0;min-width:0}.book-nav .prev:empty,.book-nav .next:empty{display:none}
.book-nav.bottom{border-top:1px solid #d0d7de;border-bottom:none;margin-top:2em}
.book-nav a{color:#0969da;text-decoration:none}.book-nav .unbuilt{color:#6e7781}
@media (max-width:720px){.book-nav{flex-wrap:wrap;white-space:normal}}
.book-failed,.book-smoke{font-family:system-ui,sans-serif;padding:.8em 1.2em;margin:1em}
.book-failed{background:#ffebe9;border:1px solid #ff8182}
.book-failed pre{white-space:pre-wrap;font-size:13px}
.book-smoke{background:#fff8c5;border:1px solid #d4a72c}.book-smoke code{white-space:nowrap}
.book-note{font-family:system-ui,sans-serif;font-size:13px;color:#59636e;border-left:3px solid #d0d7de;
 padding:.2em .8em;margin:.3em 0}
.book-progress{font-family:var(--jp-code-font-family,monospace);font-size:12px;color:#59636e;display:flex;
 gap:.6em;align-items:center;white-space:pre}
.book-progress progress{width:14em;height:.9em}
.book-colab-badge{display:inline-flex;font:600 12px/20px system-ui,sans-serif;border-radius:3px;overflow:hidden;
 vertical-align:middle}
.book-colab-badge span{padding:0 6px;color:#fff;background:#555}.book-colab-badge span+span{background:#f9ab00;color:#000}
.book-external-image{font-family:system-ui,sans-serif;color:#59636e}
.MJX_Assistive_MathML,.MJX_Assistive_MathML *{font-family:inherit!important}
"""

_INDEX_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328}
h1{margin-bottom:.1em}.subtitle{color:#59636e;margin-top:0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.45em .6em;border-bottom:1px solid #d0d7de;
 vertical-align:top}th{background:#f6f8fa}a{color:#0969da;text-decoration:none}
.ok{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}.missing,.pending{color:#9a6700}.small{font-size:.9em;
 color:#59636e}
.book-smoke{background:#fff8c5;border:1px solid #d4a72c;padding:.8em 1.2em;margin:1em 0}
.book-smoke code{white-space:nowrap}
"""


def _smoke_banner(index: bool = False) -> str:
    where, it = ("in these pages", "They were") if index else ("on this page", "It was")
    return (f'<div class="book-smoke"><b>Smoke profile: the models {where} are barely trained, and their '
            f"numbers mean nothing.</b> {it} built with <code>--profile smoke</code>, which trains every model for "
            "a few steps only, to check that the code runs: scores of zero, flat curves and grey blobs are "
            "expected. For the real results build with <code>make book PROFILE=cpu</code> (or <code>gpu</code>), "
            "or run the chapter in Colab.</div>")


def mathjax_source() -> Path | None:
    """MathJax 2's files as the jupyter-server-mathjax package ships them; None without it."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        return None
    static = Path(jupyter_server_mathjax.__file__).resolve().parent / "static"
    return static if (static / "MathJax.js").is_file() else None


def copy_mathjax(out: Path) -> bool:
    """Copy MathJax into ``out/_static/mathjax`` (once per source); False when it is not installed."""
    import shutil

    src = mathjax_source()
    if src is None:
        return False
    dest = out / MATHJAX_DIR
    stamp = dest / ".copied-from"
    mark = f"{src}\n{(src / 'MathJax.js').stat().st_mtime_ns}\n{sorted(_MATHJAX_SKIP)}\n"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == mark:
        return True

    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if (Path(folder) / n).relative_to(src).as_posix() in _MATHJAX_SKIP]

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=skip)
    stamp.write_text(mark, encoding="utf-8")
    return True


def _text(html_value: Any) -> str:
    """The text of a (tqdm) HTML widget's value, escaped again."""
    return html.escape(html.unescape(re.sub(r"<[^>]*>", "", str(html_value or ""))))


def _static_widget(model_id: str, state: dict[str, Any]) -> str:
    """HTML for a widget in a static page: a tqdm bar as its last text, any other widget as a note."""
    model = state.get(model_id) or {}
    kids = [state.get(str(c).removeprefix("IPY_MODEL_")) or {} for c in model.get("state", {}).get("children", [])]
    names = [k.get("model_name") for k in kids]
    if (model.get("model_name") == "HBoxModel" and len(kids) == 3 and names[0] == names[2] == "HTMLModel"
            and names[1] in ("FloatProgressModel", "IntProgressModel")):
        left, bar, right = (k.get("state", {}) for k in kids)
        try:
            value, top = float(bar.get("value", 0)), float(bar.get("max", 0))
        except (TypeError, ValueError):
            value, top = 0.0, 0.0
        meter = f'<progress value="{value:g}" max="{top:g}"></progress>' if top > 0 else ""
        return (f'<div class="book-progress"><span>{_text(left.get("value"))}</span>{meter}'
                f'<span>{_text(right.get("value"))}</span></div>')
    return _WIDGET_NOTE


def static_notebook(nb: Any) -> Any:
    """A copy of an executed notebook for a static page: widgets become what they showed (a tqdm bar's
    last text) or a note, and a cell calling ``explore(`` gets a note that its sliders move in Jupyter
    or Colab. The widget state goes: nothing in the page needs the widget manager."""
    import copy

    import nbformat

    nb = copy.deepcopy(nb)
    state = nb.metadata.pop("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data and _WIDGET_VIEW in data:
                model_id = str((data[_WIDGET_VIEW] or {}).get("model_id", ""))
                out["data"] = nbformat.from_dict({"text/html": _static_widget(model_id, state)})
        if cell.get("outputs") and _EXPLORE_CALL.search(cell.source):
            cell.outputs.append(nbformat.v4.new_output("display_data", data={"text/html": _SLIDER_NOTE}))
    return nb


def _offline(page: str, book: Book) -> str:
    """No image from the network (the Colab badge becomes a text badge); links to a chapter's notebook
    lead to its page."""
    def image(m: re.Match[str]) -> str:
        if html.unescape(m.group(1)) == COLAB_BADGE_IMAGE:
            return _COLAB_BADGE
        alt = re.search(r"\balt=[\"']([^\"']*)[\"']", m.group(0))
        return (f'<span class="book-external-image" title="{m.group(1)}">'
                f'[image: {alt.group(1) if alt and alt.group(1) else "not shown offline"}]</span>')

    names = {ch.name for ch in book.chapters}

    def chapter_link(m: re.Match[str]) -> str:
        quote, name, fragment = m.group(1), m.group(2), m.group(3) or ""
        return f"href={quote}{name}.html{fragment}{quote}" if name in names else m.group(0)

    return _CHAPTER_LINK.sub(chapter_link, _EXTERNAL_IMG.sub(image, page))


def _nav(book: Book, prev: Chapter | None, nxt: Chapter | None, chapter: Chapter, bottom: bool = False,
         linked: Container[str] | None = None) -> str:
    """The navigation bar. A neighbour without a page (not built) is shown as text, not linked."""
    def link(ch: Chapter | None, cls: str) -> str:
        if ch is None:
            return f'<span class="{cls}"></span>'
        label = f"{ch.number} {html.escape(ch.title)}"
        text = (f'&larr;&nbsp;<span class="title">{label}</span>' if cls == "prev" else
                f'<span class="title">{label}</span>&nbsp;&rarr;')
        if linked is not None and ch.name not in linked:
            return f'<span class="{cls} unbuilt" title="{label} (not built)">{text}</span>'
        return f'<a class="{cls}" href="{ch.name}.html" title="{label}">{text}</a>'

    return (f'<nav class="book-nav{" bottom" if bottom else ""}">{link(prev, "prev")}'
            f'<a href="index.html">&#8593; {html.escape(book.title)}</a>'
            f'<a href="notebooks/{chapter.name}.ipynb">notebook with outputs</a>'
            f'<a href="{html.escape(colab_url(book, chapter))}">open in Colab</a>'
            f'<span class="spacer"></span>{link(nxt, "next")}</nav>')


def _inject(page: str, top: str, bottom: str) -> str:
    page = page.replace("</head>", f"<style>{_CSS}</style>\n</head>", 1)
    m = re.search(r"<body[^>]*>", page)
    if m is None:
        return top + page + bottom
    page = page[:m.end()] + "\n" + top + page[m.end():]
    i = page.rfind("</body>")
    return page[:i] + bottom + "\n" + page[i:] if i >= 0 else page + bottom


def render_chapter_page(nb: Any, book: Book, chapter: Chapter, prev: Chapter | None, nxt: Chapter | None,
                        failure: str | None = None, exporter: Any = None, profile: str | None = None,
                        linked: Container[str] | None = None, mathjax: bool = True) -> str:
    """The chapter's HTML page: nbconvert's lab template without the network (MathJax from
    ``_static/mathjax``, widgets shown as what they drew), figures embedded, navigation added, and
    a warning on top when the ``profile`` was smoke. ``linked``: the chapters that have a page
    (None: all)."""
    if exporter is None:
        exporter = _html_exporter()
    resources = {"metadata": {"name": f"{chapter.number} {chapter.title}"},
                 "book_mathjax": _MATHJAX_HEAD if mathjax else _NO_MATHJAX_HEAD}
    body, _ = exporter.from_notebook_node(static_notebook(nb), resources=resources)
    top = _nav(book, prev, nxt, chapter, linked=linked)
    if profile == "smoke":
        top += _smoke_banner()
    if failure:
        top += (f'<div class="book-failed"><b>This chapter failed to build.</b> The outputs below stop at the '
                f"failing cell.<pre>{html.escape(failure)}</pre></div>")
    return _inject(_offline(body, book), top, _nav(book, prev, nxt, chapter, bottom=True, linked=linked))


def _html_exporter() -> Any:
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", template_file="book.html.j2",
                        extra_loaders=[DictLoader({"book.html.j2": _TEMPLATE})], embed_images=True,
                        exclude_input_prompt=True, exclude_output_prompt=True)


def render_index(book: Book, state: dict[str, Any], profile: str, pages: Container[str] | None = None,
                 building: dict[str, str] | None = None) -> str:
    """The index: every chapter with its papers, expected and last run times and status. ``pages``:
    the chapters that have a page (None: those whose status is ok or failed); ``building``: chapters
    this build has yet to finish, with "queued" or "running"."""
    building = building or {}
    rows, smoke = [], profile == "smoke"
    for ch in book.chapters:
        entry = state["chapters"].get(ch.name, {})
        status = entry.get("status", "missing" if not (book.root / ch.notebook).is_file() else "pending")
        title = html.escape(ch.title)
        has_page = status in ("ok", "failed") if pages is None else ch.name in pages
        if has_page:
            title = f'<a href="{ch.name}.html">{title}</a>'
        papers = "<br>".join(f'<a href="{p.url}">{html.escape(p.title)}</a><br><span class="small">'
                             f"{html.escape(p.authors)} ({p.year})</span>" for p in ch.papers)
        expected = " / ".join(f"{ch.runtime_minutes[p]:g}" for p in PROFILES)
        ran = ""
        if "seconds" in entry:
            ran = f'{_duration(entry["seconds"])} <span class="small">({html.escape(entry.get("profile", "?"))})</span>'
            smoke = smoke or (has_page and entry.get("profile") == "smoke")
        if ch.name in building:
            ran += f'{"<br>" if ran else ""}<span class="small">{html.escape(building[ch.name])} in this build</span>'
        summary = f'<br><span class="small">{html.escape(ch.summary)}</span>' if ch.summary else ""
        rows.append(f"<tr><td>{ch.number}</td><td>{title}{summary}</td><td>{papers}</td><td>{expected}</td>"
                    f'<td>{ran}</td><td class="{status}">{status}</td></tr>')
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    banner = _smoke_banner(index=True) if smoke else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(book.title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_INDEX_CSS}</style></head>
<body><h1>{html.escape(book.title)}</h1><p class="subtitle">{html.escape(book.subtitle)}</p>
<p class="small">Built {when} with profile <b>{html.escape(profile)}</b>. Source:
<a href="{html.escape(book.repository)}">{html.escape(book.repository)}</a>.</p>{banner}
<table><thead><tr><th>#</th><th>Chapter</th><th>Paper</th><th>Expected minutes<br>(smoke / cpu / gpu)</th>
<th>Last run</th><th>Status</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------

@dataclass
class ChapterResult:
    name: str
    status: str  # "executed", "up to date", "failed", "missing", "skipped"
    seconds: float = 0.0
    error: str = ""


@dataclass
class BuildReport:
    out: Path
    profile: str
    results: list[ChapterResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ChapterResult]:
        return [r for r in self.results if r.status in ("failed", "missing")]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _select(book: Book, only: Sequence[str] | None) -> list[Chapter]:
    if not only:
        return list(book.chapters)
    wanted = [book.chapter(k) for k in only]
    return [ch for ch in book.chapters if ch in wanted]


def _git_commit(root: Path) -> str | None:
    """The commit the book was built from (with ``+`` when the tree has changes), or None."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty else "")


def _make_folder(path: Path, error: str) -> None:
    """``path`` and its parents, or a BookError saying ``error`` and why (a file in the way, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BookError(f"{error} ({exc.strerror or exc})") from None


def build(root: str | os.PathLike[str] = ".", profile: str | None = None, force: bool = False,
          only: Sequence[str] | None = None, out: str | os.PathLike[str] | None = None,
          cache: str | os.PathLike[str] | None = None, timeout: int | None = 3600,
          log: Callable[[str], None] = print, screenshots: bool = False, cold: bool = False) -> BuildReport:
    """Execute the chapters that changed and render the book; see the module docstring.

    Every chapter executed successfully appends its run time, machine and what the model store did
    (trained / loaded) to ``<out>/runtimes.json`` (:mod:`diffusion_core.runtimes`). ``cold``: each
    chapter starts from its own empty model cache (``<out>/.cold-cache``, removed afterwards), to
    measure what a chapter costs a reader who runs it first.

    Each chapter's page is written as soon as the chapter is done (and its kernel shut down), and
    the index after every chapter. ``screenshots``: also save PNGs of the index and one chapter
    (``screenshot-*.png``) when a Chromium is found (``make book`` does)."""
    book = load_book(root)
    profile = check_profile(profile) if profile else detect_profile()
    force = force or cold  # a cold run is a measurement: up-to-date chapters run again
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):   # NaN fails the range too
        raise ValueError(f"timeout must be a positive number of seconds one cell may run (None: no limit), "
                         f"got {timeout!r}")
    out = Path(out).resolve() if out is not None else book.root / "_build"
    _make_folder(out / "notebooks", f"out: cannot make the output folder {out}")
    state_path = out / ".state.json"
    state = _load_state(state_path)
    cache = Path(cache or os.environ.get("DIFFUSION_CACHE") or book.root / ".cache" / "models").resolve()
    _make_folder(cache, f"cache: cannot make the model cache folder {cache}")
    env = dict(os.environ, DIFFUSION_PROFILE=profile, DIFFUSION_HEADLESS="1", DIFFUSION_CACHE=str(cache))
    package_dir = _package_dir(book.root)
    if package_dir.parent == book.root:  # the chapters import this tree's package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(book.root), env.get("PYTHONPATH", "")) if p)
    digest = _package_digest(package_dir)

    import nbformat

    report = BuildReport(out=out, profile=profile)
    selected = _select(book, only)
    log(f"Building {book.title!r}: {len(selected)} chapter(s), profile {profile}, output {out}")
    mathjax = copy_mathjax(out)
    if not mathjax:
        log("note: jupyter-server-mathjax is not installed, so the pages show formulas as TeX "
            "(pip install -e \".[book]\")")
    building = {ch.name: "queued" for ch in selected}
    from . import runtimes, store
    host, commit = runtimes.machine(), _git_commit(book.root)

    def publish() -> None:
        """(Re)write the pages that changed, then the index."""
        _render_pages(book, state, out, log, mathjax=mathjax)
        _save_state(state_path, state)
        pages = {ch.name for ch in book.chapters if (out / f"{ch.name}.html").is_file()
                 and state["chapters"].get(ch.name, {}).get("status") in ("ok", "failed")}
        (out / "index.html").write_text(render_index(book, state, profile, pages=pages, building=building),
                                        encoding="utf-8")

    publish()
    for i, ch in enumerate(selected, 1):
        tag = f"[{i}/{len(selected)}] {ch.name}"
        src = book.root / ch.notebook
        if not src.is_file():
            log(f"{tag}: MISSING {ch.notebook}")
            state["chapters"].pop(ch.name, None)
            report.results.append(ChapterResult(ch.name, "missing", error=f"{ch.notebook} does not exist"))
            building.pop(ch.name, None)
            publish()
            continue
        fp = fingerprint(src, profile, digest)
        entry = state["chapters"].get(ch.name, {})
        executed_nb = out / "notebooks" / f"{ch.name}.ipynb"
        if (not force and entry.get("status") == "ok" and entry.get("hash") == fp and executed_nb.is_file()):
            log(f"{tag}: up to date (last run {_duration(entry.get('seconds', 0))}, profile {profile})")
            report.results.append(ChapterResult(ch.name, "up to date", entry.get("seconds", 0.0)))
            building.pop(ch.name, None)
            publish()
            continue
        nb = nbformat.read(str(src), as_version=4)
        building[ch.name] = "running"
        publish()
        log(f"{tag}: executing (profile {profile}{', from an empty model cache' if cold else ''})...")
        chapter_cache = out / ".cold-cache" / ch.name if cold else cache
        if cold:
            shutil.rmtree(chapter_cache, ignore_errors=True)
            chapter_cache.mkdir(parents=True)
        store_log = out / f".store-{ch.name}.jsonl"
        store_log.unlink(missing_ok=True)
        chapter_env = dict(env, DIFFUSION_CACHE=str(chapter_cache), **{store.LOG_VAR: str(store_log)})
        cache_was_empty = not any(chapter_cache.glob("*.safetensors"))
        started = _dt.datetime.now().isoformat(timespec="seconds")
        start = time.monotonic()
        bar = _progress(nb, tag)
        try:
            execute_notebook(nb, src.parent, chapter_env, timeout=timeout, on_cell=bar.update_to if bar else None)
        except ChapterFailed as exc:
            seconds = time.monotonic() - start
            message = f"{ch.name} failed in {exc}"
            detail = "\n".join(exc.trace.strip().splitlines()[-12:]) if exc.trace else ""
            log(f"{tag}: FAILED after {_duration(seconds)}\n  {message}" +
                (("\n" + "\n".join("    " + line for line in detail.splitlines())) if detail else ""))
            state["chapters"][ch.name] = {"status": "failed", "hash": "", "profile": profile, "seconds": seconds,
                                          "error": message, "trace": detail, "page": ""}
            report.results.append(ChapterResult(ch.name, "failed", seconds, message))
        else:
            seconds = time.monotonic() - start
            log(f"{tag}: done in {_duration(seconds)}")
            state["chapters"][ch.name] = {"status": "ok", "hash": fp, "profile": profile, "seconds": seconds,
                                          "built": _dt.datetime.now().isoformat(timespec="seconds"), "page": ""}
            report.results.append(ChapterResult(ch.name, "executed", seconds))
            runtimes.append_record(out / "runtimes.json", runtimes.make_record(
                ch.name, profile, seconds, store.read_log(store_log), cache_was_empty, started, host, commit))
        finally:
            if bar:
                bar.close()
            store_log.unlink(missing_ok=True)
            if cold:
                shutil.rmtree(chapter_cache, ignore_errors=True)
        nbformat.write(nb, str(executed_nb))
        building.pop(ch.name, None)
        publish()  # this chapter's page (and its neighbours' navigation) now, not at the end

    publish()
    if screenshots:
        take_screenshots(book, out, [r.name for r in report.results], log)
    done = sum(r.status in ("executed", "up to date") for r in report.results)
    log(f"{done} of {len(report.results)} chapter(s) built; the book is at {out / 'index.html'}")
    if report.failed:
        log("FAILED: " + "; ".join(r.error for r in report.failed))
    return report


def _render_pages(book: Book, state: dict[str, Any], out: Path, log: Callable[[str], None],
                  mathjax: bool = True) -> None:
    """(Re)write each chapter page whose notebook, status, profile or neighbours changed."""
    import nbformat

    exporter = None
    chapters = list(book.chapters)
    linked = {ch.name for ch in chapters if state["chapters"].get(ch.name)
              and (out / "notebooks" / f"{ch.name}.ipynb").is_file()}
    for k, ch in enumerate(chapters):
        entry = state["chapters"].get(ch.name)
        executed_nb = out / "notebooks" / f"{ch.name}.ipynb"
        if ch.name not in linked or entry is None:
            continue
        prev = chapters[k - 1] if k > 0 else None
        nxt = chapters[k + 1] if k + 1 < len(chapters) else None
        key = hashlib.sha256(json.dumps([_renderer_digest(), entry.get("hash"), entry["status"], entry.get("error", ""),
                                         entry.get("profile"), mathjax, prev and prev.name, nxt and nxt.name,
                                         prev and prev.title, nxt and nxt.title, prev and prev.name in linked,
                                         nxt and nxt.name in linked, ch.title, book.title, book.repository,
                                         book.branch, executed_nb.stat().st_mtime_ns]).encode()).hexdigest()
        page = out / f"{ch.name}.html"
        if entry.get("page") == key and page.is_file():
            continue
        exporter = exporter or _html_exporter()
        failure = None
        if entry["status"] == "failed":
            failure = entry.get("error", "") + ("\n\n" + entry["trace"] if entry.get("trace") else "")
        nb = nbformat.read(str(executed_nb), as_version=4)
        text = render_chapter_page(nb, book, ch, prev, nxt, failure, exporter, profile=entry.get("profile"),
                                   linked=linked, mathjax=mathjax)
        tmp = page.with_suffix(".html.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(page)  # a reader reloading the page never sees half of it
        entry["page"] = key


# --------------------------------------------------------------------------------------------
# Screenshots (headless Chromium, offline)
# --------------------------------------------------------------------------------------------

# Headless, and offline: every host name fails to resolve and every request goes to a proxy that
# is not there, so a page that still loaded anything from the network would show it.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                  "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update", "--mute-audio",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                  "--proxy-bypass-list=<-loopback>")


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: ``$CHROMIUM`` if set, else the first of the usual names on PATH."""
    import shutil

    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "chrome"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def screenshot(page: Path, png: Path, chromium: str | None = None, width: int = SCREENSHOT_WIDTH,
               height: int = 900, timeout: float = 60) -> bool:
    """Save a PNG of ``page`` (a file) as offline headless Chromium draws it; False if it could not."""
    import subprocess
    import tempfile

    chromium = chromium or find_chromium()
    if chromium is None:
        return False
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="book-chromium-") as profile_dir:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}",
               "--virtual-time-budget=20000", f"--screenshot={png}", page.resolve().as_uri()]
        try:
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=timeout, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
    return png.is_file() and png.stat().st_size > 0


def take_screenshots(book: Book, out: Path, built: Sequence[str], log: Callable[[str], None]) -> list[Path]:
    """``out/screenshot-index.png`` and ``out/screenshot-<chapter>.png`` (the first chapter of this
    build that has a page, else the book's first), at 1280 px wide; nothing, quietly, without Chromium."""
    chromium = find_chromium()
    if chromium is None:
        return []
    for old in out.glob("screenshot-*.png"):
        old.unlink()
    names = [n for n in built if (out / f"{n}.html").is_file()]
    names += [ch.name for ch in book.chapters if (out / f"{ch.name}.html").is_file()]
    shots = [("index", 900)] + ([(names[0], 2000)] if names else [])
    saved = []
    for name, height in shots:
        png = out / f"screenshot-{name}.png"
        if screenshot(out / f"{name}.html", png, chromium, height=height):
            saved.append(png)
    if saved:
        log("screenshots: " + ", ".join(str(p) for p in saved))
    return saved


class _Bar:
    """A tqdm bar over a notebook's code cells, only on a terminal."""

    def __init__(self, nb: Any, tag: str):
        from tqdm.auto import tqdm

        self.code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        self.bar = tqdm(total=len(self.code), desc=f"{tag} cells", leave=False, unit="cell")

    def update_to(self, cell_index: int) -> None:
        self.bar.n = sum(i <= cell_index for i in self.code)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _progress(nb: Any, tag: str) -> _Bar | None:
    return _Bar(nb, tag) if sys.stderr.isatty() else None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_core.book", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="the folder holding book.toml (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute changed chapters and render _build/")
    b.add_argument("--profile", choices=PROFILES, default=None,
                   help="compute profile (default: $DIFFUSION_PROFILE, else gpu with CUDA, else cpu)")
    b.add_argument("--force", action="store_true", help="execute every chapter, even those up to date")
    b.add_argument("--only", nargs="+", metavar="CHAPTER", help="chapter numbers, slugs or names to build")
    b.add_argument("--out", default=None, help="output folder (default: _build)")
    b.add_argument("--cache", default=None, help="DIFFUSION_CACHE for trained models (default: .cache/models)")
    b.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run (default: 3600; 0: no limit)")
    b.add_argument("--cold", action="store_true",
                   help="run each chapter from its own empty model cache (measures a first run; trains everything)")
    b.add_argument("--no-screenshots", action="store_true",
                   help="do not save screenshot-*.png of the index and a chapter (taken only when Chromium is found)")
    t = sub.add_parser("runtimes", help="the measured run times the build recorded, per chapter and kind")
    t.add_argument("files", nargs="*", default=None,
                   help="runtimes files (default: _build/runtimes.json and benchmarks/results/runtimes/*.json)")
    t.add_argument("--profile", choices=PROFILES, default="cpu")
    t.add_argument("--update", action="store_true",
                   help="write the measured minutes into book.toml's runtime_minutes and README.md's table")
    r = sub.add_parser("readme", help="regenerate README.md's chapter table")
    r.add_argument("--check", action="store_true", help="only report whether it is stale (exit 1 if so)")
    sub.add_parser("check", help="validate book.toml and each chapter's conventions (pairing, first cell, ...)")
    g = sub.add_parser("badge", help="print a chapter's Open in Colab badge (Markdown)")
    g.add_argument("chapter")
    args = parser.parse_args(list(argv) if argv is not None else None)

    try:
        if args.command == "build":
            return build(args.root, profile=args.profile, force=args.force, only=args.only, out=args.out,
                         cache=args.cache, timeout=args.timeout or None, screenshots=not args.no_screenshots,
                         cold=args.cold, log=lambda s: print(s, flush=True)).exit_code
        book = load_book(args.root)
        if args.command == "runtimes":
            from . import runtimes

            files = [Path(f) for f in args.files] if args.files else (
                [book.root / "_build" / "runtimes.json"] + sorted((book.root / "benchmarks" / "results" / "runtimes").glob("*.json")))
            missing = [str(f) for f in args.files or () if not Path(f).is_file()]
            if missing:   # a file the reader named must exist: an empty table would look like "nothing measured"
                raise ValueError(f"files: no runtimes file at {', '.join(missing)}")
            records = [r for f in files for r in runtimes.read_records(f)]
            order = [ch.name for ch in book.chapters]
            print(runtimes.table(records, order, args.profile))
            if args.update:
                path = book.root / "book.toml"
                measured = runtimes.measured_minutes(records, order)
                text = runtimes.update_book_toml(path.read_text(encoding="utf-8"), measured,
                                                 {ch.number: ch.name for ch in book.chapters})
                path.write_text(text, encoding="utf-8")
                update_readme(load_book(args.root))
                print(f"book.toml and README.md: measured minutes of {len(measured)} chapter(s) written")
            return 0
        if args.command == "readme":
            stale = update_readme(book, check=args.check)
            if args.check:
                print("README.md's chapter table is stale: run `python -m diffusion_core.book readme`"
                      if stale else "README.md's chapter table is up to date")
                return 1 if stale else 0
            print("README.md: chapter table updated" if stale else "README.md: chapter table already up to date")
            return 0
        if args.command == "check":
            problems = notebook_problems(book)
            problems += [p for ch in book.chapters if (book.root / ch.notebook).is_file()
                         for p in chapter_problems(book, ch)]
            for p in problems:
                print(p)
            print(f"book.toml: {len(book.chapters)} chapter(s), {len(problems)} problem(s)")
            return 1 if problems else 0
        if args.command == "badge":
            print(colab_badge(book, book.chapter(args.chapter)))
            return 0
    except (BookError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
