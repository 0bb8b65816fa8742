"""`make lab`: JupyterLab serves the chapters, with the book's kernel and the ipywidgets extension.

One headless server, started as `make lab` starts it (root in chapters/, this environment's kernels
first) but on a free localhost port with a token and with the user's Jupyter config and runtime
folders moved to a temporary folder; it is stopped, and waited for, when the module's tests end.
Only localhost is contacted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from diffusion_core import book as bk

pytest.importorskip("jupyterlab", reason="jupyterlab is not installed: it comes with the book extra "
                                         "(`make setup`, or pip install -e '.[book]')")

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
KERNEL = "python3"  # the kernel the Makefile installs into .venv, and the one every chapter names
WIDGETS = "@jupyter-widgets/jupyterlab-manager"
START_TIMEOUT = 60.0  # seconds for the server to answer
STOP_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running server: ``get(path)`` returns (status, body) with the token sent as a header."""

    def __init__(self, proc: subprocess.Popen, port: int, token: str, log: Path):
        self.proc, self.port, self.token, self.log = proc, port, token, log
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str) -> dict:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: HTTP {status}\n{body[:500]!r}\n{self.log_tail()}"
        return json.loads(body)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return "server log (end):\n" + self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no server log)"


def _start(tmp: Path) -> Lab:
    """Start the server and wait (at most START_TIMEOUT) until /api/status answers; a port taken
    between choosing it and binding it is retried with another."""
    env = dict(os.environ,
               JUPYTER_PREFER_ENV_PATH="1",                      # as `make lab`: this env's kernel first
               JUPYTER_CONFIG_DIR=str(tmp / "config"),          # no user config (passwords, ports)
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"),
               IPYTHONDIR=str(tmp / "ipython"))
    for attempt in range(3):
        port, token = _free_port(), secrets.token_hex(16)
        log = tmp / f"server-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jupyter", "lab", "--no-browser",
                 "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                 f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={CHAPTERS}",
                 f"--MultiKernelManager.default_kernel_name={KERNEL}",
                 "--LabApp.extension_manager=readonly",      # never asks PyPI about extensions
                 *(["--allow-root"] if getattr(os, "geteuid", lambda: 1)() == 0 else [])],  # CI containers
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        lab = Lab(proc, port, token, log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if lab.get("/api/status", timeout=2.0)[0] == 200:
                    return lab
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        if proc.poll() is None:  # still starting after START_TIMEOUT: give up
            _stop(proc)
            pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT:.0f} s\n{lab.log_tail()}")
        if "already in use" not in lab.log_tail():
            pytest.fail(f"JupyterLab exited with code {proc.returncode}\n{lab.log_tail()}")
    pytest.fail(f"JupyterLab found no free port in 3 tries\n{lab.log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server shuts down cleanly), then SIGKILL to its whole process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    try:  # start_new_session: the group is the server's; anything it started goes with it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        pass
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    server = _start(tmp_path_factory.mktemp("lab"))
    try:
        yield server
    finally:
        _stop(server.proc)


def first_chapter() -> str:
    """The first chapter's notebook, relative to chapters/ (the server's root)."""
    notebook = Path(bk.load_book(ROOT).chapters[0].notebook)
    return notebook.relative_to("chapters").as_posix()


def test_lab_serves_the_chapter_notebooks(lab):
    name = first_chapter()
    model = lab.get_json(f"/api/contents/{name}?type=notebook")
    assert model["type"] == "notebook" and model["name"] == name.rsplit("/", 1)[-1]
    assert model["content"]["cells"], f"{name} came back without cells"
    assert model["content"]["metadata"]["kernelspec"]["name"] == KERNEL
    listing = lab.get_json("/api/contents/?content=1")
    assert name in {item["path"] for item in listing["content"]}


def test_lab_offers_the_book_kernel_from_this_environment(lab):
    specs = lab.get_json("/api/kernelspecs")
    assert KERNEL in specs["kernelspecs"], f"no {KERNEL!r} kernel: {sorted(specs['kernelspecs'])}"
    assert specs["default"] == KERNEL
    argv = specs["kernelspecs"][KERNEL]["spec"]["argv"]
    # the kernel runs this environment's Python (where the package and ipywidgets are installed),
    # not a "python3" kernel left in ~/.local/share/jupyter by another environment
    assert Path(argv[0]).parent.parent.resolve() == Path(sys.prefix).resolve(), argv
    assert "ipykernel_launcher" in argv


def test_lab_loads_the_ipywidgets_extension(lab):
    status, body = lab.get("/lab")
    assert status == 200, f"GET /lab: HTTP {status}\n{lab.log_tail()}"
    match = re.search(rb'<script id="jupyter-config-data" type="application/json">(.*?)</script>', body, re.S)
    assert match, "the lab page holds no jupyter-config-data"
    config = json.loads(match.group(1))
    extensions = {ext["name"] for ext in config.get("federated_extensions", [])}
    assert WIDGETS in extensions, f"{WIDGETS} is not among the lab's extensions: {sorted(extensions)}"
    assert WIDGETS not in config.get("disabledExtensions", [])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_starts_the_server_this_test_starts():
    """`make -n lab` (prints, runs nothing): JupyterLab from .venv, in chapters/, this kernel first."""
    # run as a top-level make even when the tests themselves run under `make test` (MAKELEVEL would add
    # "make[1]: Entering/Leaving directory" lines around the commands)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-W", "pyproject.toml", "lab"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True, env=env).stdout
    command = out.replace("\\\n", " ").splitlines()[-1]
    assert "-m jupyter lab" in command and "/bin/python" in command, out
    for part in ("--ServerApp.root_dir=chapters", f"--MultiKernelManager.default_kernel_name={KERNEL}",
                 "JUPYTER_PREFER_ENV_PATH=1", "DIFFUSION_HEADLESS=0"):
        assert part in command, f"{part} not in `make lab`: {command}"
