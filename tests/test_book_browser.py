"""The built book in a real browser: headless Chromium, offline, on a tiny synthetic book.

The book is built by ``python -m diffusion_core.book build`` (what ``make book`` runs), then each page
is opened from disk in headless Chromium with the network cut off (every host name fails to resolve
and every request goes to a proxy that is not there) and driven over the DevTools protocol on a
pipe (``--remote-debugging-pipe``: no port, no websocket library). The browser tests are skipped
when no Chromium or Chrome binary is found (``$CHROMIUM`` names one; on Debian ``apt-get install
chromium``); the check of the built files runs without one.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from test_book import make_book, write_notebook

from diffusion_core import book as bk

CHROMIUM = bk.find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary found (apt-get install chromium, or set $CHROMIUM): "
                             "the rendered book is not checked in a browser")

FIRST_MARKDOWN = [
    "# First\n"
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/owner/tiny-book/blob/main/chapters/01_first.ipynb)",
    "Inline math $\\bar\\alpha_t = \\prod_{s \\le t} \\alpha_s$ and a display:\n\n"
    "$$x_t = \\sqrt{\\bar\\alpha_t}\\,x_0 + \\sqrt{1 - \\bar\\alpha_t}\\,\\epsilon,\\quad"
    " \\epsilon \\sim \\mathcal N(0, I),\\quad \\mathbb E[\\epsilon] = 0$$\n\n"
    "Then read [the second chapter](02_second.ipynb).",
]
FIRST_CODE = [
    "import matplotlib\nimport matplotlib.pyplot as plt\n"
    "fig, ax = plt.subplots(figsize=(3, 2))\nax.plot([0, 1, 2], [0, 1, 4])\nax.set_title('a parabola')\nplt.show()",
    "from diffusion_core.widgets import explore\n"
    "def draw(t=1):\n    print('t is', t)\n"
    "explore(draw, t=(0, 10, 1, 3))",
]
SECOND_MARKDOWN = ["# Second", "Euler: $e^{i\\pi} + 1 = 0$.\n\n$$\\int_0^1 x\\,dx = \\frac{1}{2}$$"]
SECOND_CODE = ["x = 2\nprint(x * x)"]


# ---- a minimal DevTools client over --remote-debugging-pipe ------------------------------------

class Browser:
    """Headless Chromium, offline, driven over the DevTools protocol on fds 3 (in) and 4 (out)."""

    def __init__(self, chromium: str, width: int = bk.SCREENSHOT_WIDTH, height: int = 900):
        self.width, self.height = width, height
        self.profile = tempfile.TemporaryDirectory(prefix="book-test-chromium-")
        cmd_read, self._cmd_write = os.pipe()
        self._out_read, out_write = os.pipe()

        def child_fds() -> None:  # fds 3 and 4 of the browser are the two pipes
            a = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(out_write, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [chromium, *bk.CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=False)
        os.close(cmd_read)
        os.close(out_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._out_read, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e["method"] == event:
                return self.events.pop(i)
        while True:
            reply = self._read_message(deadline)
            if reply.get("method") == event:
                return reply
            if "method" in reply:
                self.events.append(reply)

    def evaluate(self, expression: str, timeout: float = 60):
        result = self.call("Runtime.evaluate", session=True, timeout=timeout, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path) -> None:
        """Load a page and wait until it is loaded and MathJax (if the page has it) has typeset."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        deadline = time.monotonic() + 90
        while not self.evaluate("!window.MathJax || (MathJax.Hub.Startup.signal.posted.map(String).includes('End')"
                                " && !MathJax.Hub.queue.pending && !MathJax.Hub.queue.running)"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path.name}: MathJax did not finish typesetting in 90 s")
            time.sleep(0.2)

    def console_errors(self) -> list[str]:
        """Errors the page logged: console.error, uncaught exceptions, failed loads (Log domain)."""
        self.call("Runtime.evaluate", session=True, expression="1")  # flush pending events
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:300])
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return errors

    def screenshot(self, png: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        png.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_write)
        os.close(self._out_read)
        self.profile.cleanup()


# What the page shows once its scripts ran: checked in the browser, not in the HTML file.
PAGE_FACTS = """(() => {
    const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const nav = document.querySelector('nav.book-nav');
    const navLinks = nav ? [...nav.querySelectorAll('a')] : [];
    const markdown = [...document.querySelectorAll('.jp-MarkdownCell, .jp-RenderedMarkdown')];
    return {
        images: [...document.images].map(img => ({src: img.getAttribute('src').slice(0, 80),
                                                   loaded: img.complete && img.naturalWidth > 0})),
        math: document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_SVG, .katex').length,
        mathErrors: document.querySelectorAll('.MathJax_Error, merror').length,
        markdownText: markdown.map(el => el.innerText).join('\\n'),
        navHeight: nav ? nav.getBoundingClientRect().height : 0,
        navLineHeight: nav ? parseFloat(getComputedStyle(nav).fontSize) * 3.2 : 0,
        navTops: navLinks.filter(visible).map(a => Math.round(a.getBoundingClientRect().top)),
        text: document.body.innerText,
    };
})()"""


class Sources(HTMLParser):
    """Every src/href of a page's elements, as (tag, attribute, value, whether inside a <nav>)."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, str, bool]] = []
        self._nav = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "nav":
            self._nav += 1
        for name in ("src", "href"):
            if attrs.get(name) is not None:
                self.found.append((tag, name, attrs[name], self._nav > 0))

    def handle_endtag(self, tag):
        if tag == "nav":
            self._nav -= 1


def sources(page: Path) -> list[tuple[str, str, str, bool]]:
    parser = Sources()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.found


def is_external(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https") or url.startswith("//")


def local_target(page: Path, url: str) -> Path:
    return page.parent / unquote(urlsplit(url).path)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The tiny book, built as `make book` builds (the command line, screenshots included)."""
    root = make_book(tmp_path_factory.mktemp("browser-book"),
                     {("01", "first"): FIRST_CODE, ("02", "second"): SECOND_CODE})
    write_notebook(root / "chapters/01_first.ipynb", FIRST_MARKDOWN, FIRST_CODE)
    write_notebook(root / "chapters/02_second.ipynb", SECOND_MARKDOWN, SECOND_CODE)
    code = bk.main(["--root", str(root), "build", "--profile", "smoke", "--cache", str(root / "cache")])
    assert code == 0
    return root / "_build"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium")
    browser = Browser(CHROMIUM)
    yield browser
    browser.close()


def test_built_pages_load_nothing_from_the_network_and_every_local_reference_exists(out):
    for page in [out / "index.html", out / "01_first.html", out / "02_second.html"]:
        for tag, attr, url, in_nav in sources(page):
            if tag in ("script", "img", "link", "iframe", "source", "video", "audio", "embed") and attr == "src" \
                    or (tag == "link" and attr == "href"):
                assert not is_external(url), f"{page.name}: <{tag} {attr}={url}> loads from the network"
            if url.startswith(("data:", "#", "mailto:")) or is_external(url):
                assert not (in_nav and url.startswith("#")), f"{page.name}: empty navigation link"
                continue
            assert local_target(page, url).is_file(), f"{page.name}: <{tag} {attr}={url}> does not exist"
    html = (out / "01_first.html").read_text()
    assert "cdnjs" not in html and "unpkg" not in html and "require.js" not in html
    assert 'href="02_second.html"' in html  # the markdown link to the other chapter's notebook
    assert (out / bk.MATHJAX_DIR / "MathJax.js").is_file()


@needs_chromium
def test_index_in_the_browser_lists_every_chapter_with_working_links(out, browser):
    browser.open(out / "index.html")
    facts = browser.evaluate(PAGE_FACTS)
    assert browser.console_errors() == []
    assert "First" in facts["text"] and "Second" in facts["text"]
    assert "barely trained" in facts["text"]  # a smoke build says so at the top
    links = [url for tag, attr, url, _ in sources(out / "index.html") if tag == "a" and not is_external(url)]
    assert links == ["01_first.html", "02_second.html"]


@needs_chromium
@pytest.mark.parametrize("name", ["01_first", "02_second"])
def test_chapter_in_the_browser_renders_math_images_and_navigation_offline(out, browser, name):
    page = out / f"{name}.html"
    browser.open(page)
    facts = browser.evaluate(PAGE_FACTS)
    assert browser.console_errors() == []
    assert facts["math"] >= 2 and facts["mathErrors"] == 0, facts["math"]
    assert "$" not in facts["markdownText"], facts["markdownText"]  # no TeX left as text
    assert all(img["loaded"] for img in facts["images"]), facts["images"]
    assert len(set(facts["navTops"])) == 1, f"the navigation bar wraps: tops {facts['navTops']}"
    assert facts["navHeight"] < facts["navLineHeight"], facts["navHeight"]
    assert "barely trained" in facts["text"]
    if name == "01_first":
        assert "Open in" in facts["text"] and "Colab" in facts["text"]  # the badge, drawn without the network
        assert "sliders move it" in facts["text"]
        assert len(facts["images"]) == 1  # the matplotlib figure; the badge is no image
    browser.screenshot(out / f"test-{name}.png")


@needs_chromium
def test_make_book_saved_screenshots(out):
    for name in ("screenshot-index.png", "screenshot-01_first.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
