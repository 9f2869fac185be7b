"""A real browser: JupyterLab (started here on 127.0.0.1 with a token) and Debian's chromium driven
by Playwright's Python package. A notebook starts an executor, shows the Dashboard, submits a
background workflow of slow items; the page must show the dashboard and its numbers must move
while the run goes. Screenshots go to test-output/ (look at them)."""

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
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed"),
    pytest.mark.timeout(420),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cell(source: str, kind: str = "code") -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


NOTEBOOK_CELLS = [
    _cell("# flowdapt_nb live dashboard\nA background run of slow items; the dashboard follows it.", "markdown"),
    _cell("import time\nimport flowdapt_nb as fnb\n\nex = fnb.LocalExecutor(use_processes=False, cpus=2).start()\n"
          "fnb.widgets.ExecutorCard(ex)"),
    _cell("def numbers(n=10):\n    return list(range(n))\n\n"
          "def featurize(x):\n    time.sleep(0.35)\n    if x == 13:\n        raise ValueError(f'sensor {x} returned NaN')\n"
          "    return x * x\n\n"
          "def summarize(values):\n    return sum(values)\n\n"
          "wf = fnb.Workflow('features', stages=[\n"
          "    fnb.Stage('numbers', numbers),\n"
          "    fnb.Stage('featurize', featurize, type='parameterized', depends_on=['numbers']),\n"
          "    fnb.Stage('summarize', summarize, depends_on=['featurize']),\n])"),
    _cell("dash = fnb.widgets.Dashboard(ex)\ndash"),
    _cell("handle = ex.submit(wf, input={'n': 40})   # returns at once: the cell is free, the dashboard moves\n"
          "handle"),
    _cell("mapper = fnb.widgets.StageMapper(workflow=wf)\nmapper"),
]


def _write_notebook(path: Path) -> None:
    nb = {"cells": NOTEBOOK_CELLS, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                      "language": "python"},
                       "language_info": {"name": "python"}}}
    path.write_text(json.dumps(nb, indent=1))


class JupyterLab:
    """``jupyter lab`` on 127.0.0.1:PORT with a token and its own runtime/data/config dirs."""

    def __init__(self, root: Path, home: Path):
        self.root = root
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        env = dict(os.environ)
        for name in ("RUNTIME", "DATA", "CONFIG"):
            d = home / name.lower()
            d.mkdir(parents=True, exist_ok=True)
            env[f"JUPYTER_{name}_DIR"] = str(d)
        labconfig = home / "config" / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env.pop("JUPYTER_PATH", None)
        self.log = open(home / "jupyter.log", "w")
        cmd = [sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
               f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               f"--LabApp.workspaces_dir={home / 'workspaces'}"]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
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


@pytest.fixture
def lab(tmp_path):
    root = tmp_path / "nb"
    root.mkdir()
    server = JupyterLab(root, tmp_path / "jupyter")
    try:
        server.wait_ready()
        yield server
    finally:
        left = server.stop()
        assert not left, f"left behind after JupyterLab stopped: {left}"


def _text(page, selector: str) -> str | None:
    loc = page.locator(selector)
    return loc.first.inner_text() if loc.count() else None


def test_dashboard_renders_and_moves_in_jupyterlab(lab, output_dir):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    _write_notebook(lab.root / "dashboard.ipynb")
    shots = []

    def shot(page, name, locator=None):
        path = output_dir / f"browser-{name}.png"
        (locator or page).screenshot(path=str(path))
        shots.append(path)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"{lab.url}/lab/tree/dashboard.ipynb?reset&token={lab.token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # more room for the notebook: fold the file browser away
            page.locator(".jp-SideBar .lm-TabBar-tab[data-id='filebrowser']").first.click()
            # wait for the kernel, then Run > Run All Cells (again if the kernel wasn't listening yet)
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=90_000)
            prompt = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first
            for attempt in range(4):
                page.locator(".jp-Notebook .jp-Cell").first.click()
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
                try:
                    page.wait_for_function(
                        "(el) => /\\[(\\*|\\d+)\\]/.test(el.textContent)", arg=prompt.element_handle(),
                        timeout=15_000)
                    break
                except Exception:
                    if attempt == 3:
                        raise

            # the dashboard renders as a live widget (not the static HTML fallback)
            dash = page.locator(".fnb-dashboard")
            dash.wait_for(timeout=90_000)
            tasks = dash.locator(".fnb-tasks")
            tasks.locator(".fnb-run-done").wait_for(timeout=60_000)
            done_text = tasks.locator(".fnb-run-done")
            # numbers change while the run goes
            seen = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                seen.append(done_text.inner_text())
                if len(set(seen)) >= 3 and "running" in tasks.locator(".fnb-head .fnb-badge").first.inner_text().lower():
                    break
                time.sleep(0.25)
            assert len(set(seen)) >= 3, f"the dashboard's numbers did not move: {seen}"
            dash.scroll_into_view_if_needed()
            shot(page, "dashboard-running", dash)
            mid = [int(s.split("/")[0]) for s in seen]
            assert mid == sorted(mid), seen
            # the resource panel draws gauges and sparklines for the local worker
            resources = dash.locator(".fnb-resources")
            resources.locator("svg.fnb-spark").first.wait_for(timeout=30_000)
            assert resources.locator("tr[data-worker]").count() == 1

            # the run finishes: 39 of 40 items done, the failing one listed with its error
            page.wait_for_function(
                "() => { const b = document.querySelector('.fnb-dashboard .fnb-tasks .fnb-head .fnb-badge');"
                " return b && b.textContent.toLowerCase() === 'finished'; }", timeout=120_000)
            final = tasks.locator(".fnb-stages tr[data-stage='featurize'] .fnb-count").inner_text()
            assert final == "39/40", final
            assert "sensor 13 returned NaN" in tasks.inner_text()
            # open the failed item to its traceback, as a user would
            picker = dash.locator(".widget-dropdown select").last
            picker.select_option(index=1)
            dash.locator(".fnb-pre").wait_for(timeout=20_000)
            assert "featurize" in dash.locator(".fnb-pre").inner_text()
            dash.scroll_into_view_if_needed()
            shot(page, "dashboard-finished", dash)

            card = page.locator(".fnb-executor-card")
            card.scroll_into_view_if_needed()
            assert "Local executor" in card.inner_text() and "running" in card.inner_text().lower()
            shot(page, "executor-card", card)

            mapper = page.locator(".fnb-stage-mapper")
            mapper.wait_for(timeout=30_000)
            mapper.scroll_into_view_if_needed()
            assert mapper.locator(".fnb-stage-row").count() == 3
            assert mapper.locator(".fnb-dag svg").count() == 1
            shot(page, "stage-mapper", mapper)
            # run the mapped workflow from its Run button, as a user would: the DAG takes the stages'
            # colours and the dashboard moves on to the new run
            box = mapper.locator("input[placeholder^='run input']")
            box.fill("{'n': 12}")
            box.press("Enter")
            mapper.locator("button[title='Run']").click()
            page.wait_for_function(
                "() => { const s = document.querySelector('.fnb-stage-mapper .fnb-dag svg');"
                " return s && (s.innerHTML.match(/#43a047/g) || []).length === 3; }", timeout=60_000)
            assert "result: 506" in mapper.inner_text()
            mapper.scroll_into_view_if_needed()
            shot(page, "stage-mapper-ran", mapper)
            page.wait_for_function(
                "() => { const d = document.querySelector('.fnb-dashboard .fnb-stages tr[data-stage=featurize] .fnb-count');"
                " return d && d.textContent === '12/12'; }", timeout=30_000)
            shot(page, "notebook")
        except Exception:
            try:  # what the page showed when it went wrong
                page.screenshot(path=str(output_dir / "browser-failure.png"), full_page=True)
                (output_dir / "browser-failure.html").write_text(page.content())
            except Exception:
                pass
            raise
        finally:
            browser.close()
    assert all(p.exists() and p.stat().st_size > 5000 for p in shots)
