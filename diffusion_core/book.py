"""Build the book from ``book.toml``: execute the chapters incrementally and render them as HTML.

Commands (run from the repository root; ``make book`` calls the first)::

    python -m diffusion_core.book build [--profile smoke|cpu|gpu] [--force] [--only 01 ddpm ...]
    python -m diffusion_core.book readme [--check]   # the chapter table in README.md
    python -m diffusion_core.book check              # validate book.toml against chapters/
    python -m diffusion_core.book badge 01           # the "Open in Colab" badge for a first cell

``build`` executes every chapter listed in ``book.toml`` in a fresh kernel of this Python, with
``DIFFUSION_PROFILE``, ``DIFFUSION_HEADLESS=1`` and ``DIFFUSION_CACHE`` (trained models shared
across chapters; default ``.cache/models``) set, and writes ``_build/index.html`` plus one page per
chapter. A chapter is executed again only when its fingerprint changed: the hash of its notebook's
cells, of every ``diffusion_core/**/*.py`` and of the profile. A failing chapter is reported with
its cell, the others still build, and the exit code is 1.

The format of ``book.toml``: top-level ``title``, ``subtitle``, ``repository``
(``https://github.com/OWNER/REPO``) and ``branch``; then one ``[[chapters]]`` table per chapter in
reading order with ``number`` (``"01"``, or ``"A"`` for an appendix), ``slug``, ``title``,
``notebook`` (``chapters/<number>_<slug>.ipynb``), ``runtime_minutes = {smoke, cpu, gpu}`` and one
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
import sys
import time
from collections.abc import Callable, Iterable, Sequence
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
                for p in PROFILES:
                    v = rt.get(p)
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                        problems.append(f"{where}: runtime_minutes.{p} must be a positive number, got {v!r}")
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
                runtime_minutes={p: ch["runtime_minutes"][p] for p in PROFILES},
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


def readme_table(book: Book) -> str:
    """The README's chapter table (Markdown), generated from book.toml."""
    rows = ["| # | Chapter | Paper | smoke | cpu | gpu | |", "|---|---|---|---|---|---|---|"]
    for ch in book.chapters:
        papers = "<br>".join(f"[{p.title}]({p.url}), {p.authors} ({p.year})" for p in ch.papers)
        rt = " | ".join(_minutes(ch.runtime_minutes[p]) for p in PROFILES)
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
    h = hashlib.sha256()
    for py in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in py.parts:
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

    client = NotebookClient(nb, km=_kernel_manager(), timeout=timeout, allow_errors=False,
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


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
.book-nav{font-family:system-ui,sans-serif;font-size:15px;display:flex;gap:1.5em;align-items:center;
 padding:.6em 1.2em;background:#f6f8fa;border-bottom:1px solid #d0d7de}
.book-nav.bottom{border-top:1px solid #d0d7de;border-bottom:none;margin-top:2em}
.book-nav a{color:#0969da;text-decoration:none}.book-nav .spacer{flex:1}
.book-failed{font-family:system-ui,sans-serif;background:#ffebe9;border:1px solid #ff8182;padding:.8em 1.2em;
 margin:1em}
.book-failed pre{white-space:pre-wrap;font-size:13px}
"""

_INDEX_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328}
h1{margin-bottom:.1em}.subtitle{color:#59636e;margin-top:0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.45em .6em;border-bottom:1px solid #d0d7de;
 vertical-align:top}th{background:#f6f8fa}a{color:#0969da;text-decoration:none}
.ok{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}.missing,.pending{color:#9a6700}.small{font-size:.9em;
 color:#59636e}
"""


def _nav(book: Book, prev: Chapter | None, nxt: Chapter | None, chapter: Chapter, bottom: bool = False) -> str:
    def link(ch: Chapter | None, arrow: str) -> str:
        if ch is None:
            return "<span></span>"
        text = f"{arrow} {ch.number} {html.escape(ch.title)}" if arrow == "&larr;" else \
            f"{ch.number} {html.escape(ch.title)} {arrow}"
        return f'<a href="{ch.name}.html">{text}</a>'

    return (f'<nav class="book-nav{" bottom" if bottom else ""}">{link(prev, "&larr;")}'
            f'<a href="index.html">&#8593; {html.escape(book.title)}</a>'
            f'<a href="notebooks/{chapter.name}.ipynb">notebook with outputs</a>'
            f'<a href="{html.escape(colab_url(book, chapter))}">open in Colab</a>'
            f'<span class="spacer"></span>{link(nxt, "&rarr;")}</nav>')


def _inject(page: str, top: str, bottom: str) -> str:
    page = page.replace("</head>", f"<style>{_CSS}</style>\n</head>", 1)
    m = re.search(r"<body[^>]*>", page)
    if m is None:
        return top + page + bottom
    page = page[:m.end()] + "\n" + top + page[m.end():]
    i = page.rfind("</body>")
    return page[:i] + bottom + "\n" + page[i:] if i >= 0 else page + bottom


def render_chapter_page(nb: Any, book: Book, chapter: Chapter, prev: Chapter | None, nxt: Chapter | None,
                        failure: str | None = None, exporter: Any = None) -> str:
    """The chapter's HTML page: nbconvert's lab template, figures embedded, navigation added."""
    if exporter is None:
        exporter = _html_exporter()
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": f"{chapter.number} {chapter.title}"}})
    top = _nav(book, prev, nxt, chapter)
    if failure:
        top += (f'<div class="book-failed"><b>This chapter failed to build.</b> The outputs below stop at the '
                f"failing cell.<pre>{html.escape(failure)}</pre></div>")
    return _inject(body, top, _nav(book, prev, nxt, chapter, bottom=True))


def _html_exporter() -> Any:
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", embed_images=True, exclude_input_prompt=True,
                        exclude_output_prompt=True)


def render_index(book: Book, state: dict[str, Any], profile: str) -> str:
    rows = []
    for ch in book.chapters:
        entry = state["chapters"].get(ch.name, {})
        status = entry.get("status", "missing" if not (book.root / ch.notebook).is_file() else "pending")
        title = html.escape(ch.title)
        if status in ("ok", "failed"):
            title = f'<a href="{ch.name}.html">{title}</a>'
        papers = "<br>".join(f'<a href="{p.url}">{html.escape(p.title)}</a><br><span class="small">'
                             f"{html.escape(p.authors)} ({p.year})</span>" for p in ch.papers)
        expected = " / ".join(f"{ch.runtime_minutes[p]:g}" for p in PROFILES)
        ran = ""
        if "seconds" in entry:
            ran = f'{_duration(entry["seconds"])} <span class="small">({html.escape(entry.get("profile", "?"))})</span>'
        summary = f'<br><span class="small">{html.escape(ch.summary)}</span>' if ch.summary else ""
        rows.append(f"<tr><td>{ch.number}</td><td>{title}{summary}</td><td>{papers}</td><td>{expected}</td>"
                    f'<td>{ran}</td><td class="{status}">{status}</td></tr>')
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(book.title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_INDEX_CSS}</style></head>
<body><h1>{html.escape(book.title)}</h1><p class="subtitle">{html.escape(book.subtitle)}</p>
<p class="small">Built {when} with profile <b>{html.escape(profile)}</b>. Source:
<a href="{html.escape(book.repository)}">{html.escape(book.repository)}</a>.</p>
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


def build(root: str | os.PathLike[str] = ".", profile: str | None = None, force: bool = False,
          only: Sequence[str] | None = None, out: str | os.PathLike[str] | None = None,
          cache: str | os.PathLike[str] | None = None, timeout: int | None = 3600,
          log: Callable[[str], None] = print) -> BuildReport:
    """Execute the chapters that changed and render the book; see the module docstring."""
    book = load_book(root)
    profile = check_profile(profile) if profile else detect_profile()
    out = Path(out).resolve() if out is not None else book.root / "_build"
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    state_path = out / ".state.json"
    state = _load_state(state_path)
    cache = Path(cache or os.environ.get("DIFFUSION_CACHE") or book.root / ".cache" / "models").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DIFFUSION_PROFILE=profile, DIFFUSION_HEADLESS="1", DIFFUSION_CACHE=str(cache))
    package_dir = _package_dir(book.root)
    if package_dir.parent == book.root:  # the chapters import this tree's package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(book.root), env.get("PYTHONPATH", "")) if p)
    digest = _package_digest(package_dir)

    import nbformat

    report = BuildReport(out=out, profile=profile)
    selected = _select(book, only)
    log(f"Building {book.title!r}: {len(selected)} chapter(s), profile {profile}, output {out}")
    for i, ch in enumerate(selected, 1):
        tag = f"[{i}/{len(selected)}] {ch.name}"
        src = book.root / ch.notebook
        if not src.is_file():
            log(f"{tag}: MISSING {ch.notebook}")
            state["chapters"].pop(ch.name, None)
            report.results.append(ChapterResult(ch.name, "missing", error=f"{ch.notebook} does not exist"))
            continue
        fp = fingerprint(src, profile, digest)
        entry = state["chapters"].get(ch.name, {})
        executed_nb = out / "notebooks" / f"{ch.name}.ipynb"
        if (not force and entry.get("status") == "ok" and entry.get("hash") == fp and executed_nb.is_file()):
            log(f"{tag}: up to date (last run {_duration(entry.get('seconds', 0))}, profile {profile})")
            report.results.append(ChapterResult(ch.name, "up to date", entry.get("seconds", 0.0)))
            continue
        nb = nbformat.read(str(src), as_version=4)
        log(f"{tag}: executing (profile {profile})...")
        start = time.monotonic()
        bar = _progress(nb, tag)
        try:
            execute_notebook(nb, src.parent, env, timeout=timeout, on_cell=bar.update_to if bar else None)
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
        finally:
            if bar:
                bar.close()
        nbformat.write(nb, str(executed_nb))
        _save_state(state_path, state)

    _render_pages(book, state, out, log)
    _save_state(state_path, state)
    (out / "index.html").write_text(render_index(book, state, profile), encoding="utf-8")
    done = sum(r.status in ("executed", "up to date") for r in report.results)
    log(f"{done} of {len(report.results)} chapter(s) built; the book is at {out / 'index.html'}")
    if report.failed:
        log("FAILED: " + "; ".join(r.error for r in report.failed))
    return report


def _render_pages(book: Book, state: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    """(Re)write each chapter page whose notebook, status or neighbours changed."""
    import nbformat

    exporter = None
    chapters = list(book.chapters)
    for k, ch in enumerate(chapters):
        entry = state["chapters"].get(ch.name)
        executed_nb = out / "notebooks" / f"{ch.name}.ipynb"
        if not entry or not executed_nb.is_file():
            continue
        prev = chapters[k - 1] if k > 0 else None
        nxt = chapters[k + 1] if k + 1 < len(chapters) else None
        key = hashlib.sha256(json.dumps([entry.get("hash"), entry["status"], entry.get("error", ""),
                                         prev and prev.name, nxt and nxt.name, prev and prev.title,
                                         nxt and nxt.title, ch.title, book.title, book.repository,
                                         book.branch, executed_nb.stat().st_mtime_ns]).encode()).hexdigest()
        page = out / f"{ch.name}.html"
        if entry.get("page") == key and page.is_file():
            continue
        exporter = exporter or _html_exporter()
        failure = None
        if entry["status"] == "failed":
            failure = entry.get("error", "") + ("\n\n" + entry["trace"] if entry.get("trace") else "")
        nb = nbformat.read(str(executed_nb), as_version=4)
        page.write_text(render_chapter_page(nb, book, ch, prev, nxt, failure, exporter), encoding="utf-8")
        entry["page"] = key


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
    b.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run (default: 3600)")
    r = sub.add_parser("readme", help="regenerate README.md's chapter table")
    r.add_argument("--check", action="store_true", help="only report whether it is stale (exit 1 if so)")
    sub.add_parser("check", help="validate book.toml and each chapter's conventions (pairing, first cell, ...)")
    g = sub.add_parser("badge", help="print a chapter's Open in Colab badge (Markdown)")
    g.add_argument("chapter")
    args = parser.parse_args(list(argv) if argv is not None else None)

    try:
        if args.command == "build":
            return build(args.root, profile=args.profile, force=args.force, only=args.only, out=args.out,
                         cache=args.cache, timeout=args.timeout or None,
                         log=lambda s: print(s, flush=True)).exit_code
        book = load_book(args.root)
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
    except (BookError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
