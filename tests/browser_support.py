"""What the browser tests share: JupyterLab started on 127.0.0.1 with a token (the ``lab``
fixture), Debian's chromium driven by Playwright (the ``chromium`` fixture), notebooks written
from cells, and Run All as a reader does it.

A test module uses them with ``from browser_support import lab, chromium, ...`` (an imported
fixture is that module's fixture) and ``pytestmark = NEEDS_CHROMIUM``."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NEEDS_CHROMIUM = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed"),
    pytest.mark.timeout(420),
]
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook_cell(source: str, kind: str = "code") -> dict:
    """One notebook cell (nbformat 4) holding ``source``; a code cell not yet run."""
    cell = {"cell_type": kind, "metadata": {}, "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def write_notebook(path: Path, cells: list[dict]) -> None:
    """A notebook of ``cells`` on the python3 kernel, written to ``path``."""
    nb = {
        "cells": cells,
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}},
    }
    path.write_text(json.dumps(nb, indent=1))


class JupyterLab:
    """``jupyter lab`` on 127.0.0.1:PORT with a token and its own runtime/data/config dirs."""

    def __init__(self, root: Path, home: Path):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        env = dict(os.environ)
        for name in ("RUNTIME", "DATA", "CONFIG"):
            d = home / name.lower()
            d.mkdir(parents=True, exist_ok=True)
            env[f"JUPYTER_{name}_DIR"] = str(d)
        labconfig = home / "config" / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(
            json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
        )
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env.pop("JUPYTER_PATH", None)
        self.log = open(home / "jupyter.log", "w")
        cmd = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--allow-root",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--LabApp.workspaces_dir={home / 'workspaces'}",
        ]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}")
            try:
                self.api("/api/status")
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("jupyter lab did not come up")

    def page_url(self, name: str) -> str:
        """The URL that opens notebook ``name`` (under the root) in a fresh workspace."""
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"

    def stop(self) -> list[str]:
        """Shut its kernels down, end the server by its PID, and return what was left behind."""
        try:
            proc = psutil.Process(self.proc.pid)
            children = proc.children(recursive=True)
        except psutil.Error:
            children = []
        try:
            for kernel in self.api("/api/kernels") or []:
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=20)
        left = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in alive if p.is_running()]
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.log.close()
        return left


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab for the module (its start is the slow part); each test opens its own page."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "nb"
    root.mkdir()
    server = JupyterLab(root, base / "jupyter")
    try:
        server.wait_ready()
        yield server
    finally:
        left = server.stop()
        assert not left, f"left behind after JupyterLab stopped: {left}"


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, headless, through Playwright: one browser for the module."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_notebook(browser, lab: JupyterLab, name: str, viewport: dict):
    """A new page of ``browser`` with notebook ``name`` open and its cells drawn."""
    page = browser.new_page(viewport=viewport)
    page.goto(lab.page_url(name))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    return page


def run_all(page) -> None:
    """Run > Run All Cells once the kernel is idle (again if the kernel wasn't listening yet)."""
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=90_000)
    prompt = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first
    for attempt in range(4):
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        try:
            page.wait_for_function(
                "(el) => /\\[(\\*|\\d+)\\]/.test(el.textContent)", arg=prompt.element_handle(), timeout=15_000
            )
            return
        except Exception:
            if attempt == 3:
                raise


def save_failure(page, output_dir: Path, name: str) -> None:
    """What the page showed when a test went wrong: ``name``.png (whole page) and ``name``.html
    in ``output_dir`` (a best effort: the page may be gone)."""
    try:
        page.screenshot(path=str(output_dir / f"{name}.png"), full_page=True)
        (output_dir / f"{name}.html").write_text(page.content())
    except Exception:
        pass
