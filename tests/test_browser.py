"""A real browser: JupyterLab (started here on 127.0.0.1 with a token) and Debian's chromium driven
by Playwright's Python package. A notebook starts an executor, shows the Dashboard, submits a
background workflow of slow items; the page must show the dashboard and its numbers must move
while the run goes. Screenshots go to test-output/ (look at them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    NEEDS_CHROMIUM,
    open_notebook,
    run_all,
    save_failure,
    write_notebook,
)
from browser_support import notebook_cell as _cell

pytestmark = NEEDS_CHROMIUM
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


NOTEBOOK_CELLS = [
    _cell(
        "# flowdapt_nb live dashboard\nA background run of slow items; the dashboard follows it.", "markdown"
    ),
    _cell(
        "import time\nimport flowdapt_nb as fnb\n\nex = fnb.LocalExecutor(use_processes=False, cpus=2).start()\n"
        "fnb.widgets.ExecutorCard(ex)"
    ),
    _cell(
        "def numbers(n=10):\n    return list(range(n))\n\n"
        "def featurize(x):\n    time.sleep(0.35)\n    if x == 13:\n"
        "        raise ValueError(f'sensor {x} returned NaN')\n"
        "    return x * x\n\n"
        "def summarize(values):\n    return sum(values)\n\n"
        "wf = fnb.Workflow('features', stages=[\n"
        "    fnb.Stage('numbers', numbers),\n"
        "    fnb.Stage('featurize', featurize, type='parameterized', depends_on=['numbers']),\n"
        "    fnb.Stage('summarize', summarize, depends_on=['featurize']),\n])"
    ),
    _cell("dash = fnb.widgets.Dashboard(ex)\ndash"),
    _cell(
        "handle = ex.submit(wf, input={'n': 40})   # returns at once: the cell is free, the dashboard moves\n"
        "handle"
    ),
    _cell("mapper = fnb.widgets.StageMapper(workflow=wf)\nmapper"),
]


def _text(page, selector: str) -> str | None:
    loc = page.locator(selector)
    return loc.first.inner_text() if loc.count() else None


def test_dashboard_renders_and_moves_in_jupyterlab(lab, output_dir):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    write_notebook(lab.root / "dashboard.ipynb", NOTEBOOK_CELLS)
    shots = []

    def shot(page, name, locator=None):
        path = output_dir / f"browser-{name}.png"
        (locator or page).screenshot(path=str(path))
        shots.append(path)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = open_notebook(browser, lab, "dashboard.ipynb", {"width": 1400, "height": 1500})
            # more room for the notebook: fold the file browser away
            page.locator(".jp-SideBar .lm-TabBar-tab[data-id='filebrowser']").first.click()
            run_all(page)

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
                badge = tasks.locator(".fnb-head .fnb-badge").first
                if len(set(seen)) >= 3 and "running" in badge.inner_text().lower():
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
                " return b && b.textContent.toLowerCase() === 'finished'; }",
                timeout=120_000,
            )
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
                " return s && (s.innerHTML.match(/#43a047/g) || []).length === 3; }",
                timeout=60_000,
            )
            assert "result: 506" in mapper.inner_text()
            mapper.scroll_into_view_if_needed()
            shot(page, "stage-mapper-ran", mapper)
            page.wait_for_function(
                "() => { const d = document.querySelector("
                "'.fnb-dashboard .fnb-stages tr[data-stage=featurize] .fnb-count');"
                " return d && d.textContent === '12/12'; }",
                timeout=30_000,
            )
            shot(page, "notebook")
        except Exception:
            save_failure(page, output_dir, "browser-failure")  # what the page showed when it went wrong
            raise
        finally:
            browser.close()
    assert all(p.exists() and p.stat().st_size > 5000 for p in shots)


# --- the notebook face (issue 15): saved outputs, Run All, live dashboards ------------------------


class Notebook:
    """A notebook open in its own JupyterLab page, with the few actions a reader takes."""

    def __init__(self, browser, lab, name, output_dir):
        self.page = open_notebook(browser, lab, name, {"width": 1400, "height": 1400})
        self.output_dir = output_dir
        self.name = name
        self.page.locator(".jp-SideBar .lm-TabBar-tab[data-id='filebrowser']").first.click()

    def shot(self, name, locator=None, passing=False):
        """A screenshot of the page or one element; ``passing``: of something that may go away
        at any moment (a best effort: None if it went)."""
        path = self.output_dir / f"browser-{name}.png"
        try:
            if locator is not None:
                locator.scroll_into_view_if_needed(timeout=2000 if passing else 30_000)
            (locator or self.page).screenshot(path=str(path), timeout=2000 if passing else 30_000)
        except Exception:
            if passing:
                return None
            raise
        assert path.stat().st_size > 3000, path
        return path

    def run_all(self):
        run_all(self.page)

    _DONE_JS = (
        "() => { const ps = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];"
        " const idle = /\\| Idle/.test(document.body.innerText);"
        " return idle && ps.length > 0 && /\\[\\d+\\]/.test(ps[0].textContent)"
        " && !ps.some(p => p.textContent.includes('*')); }"
    )

    def finished(self) -> bool:
        """Run All ended: no cell waiting or running ([*]) and the kernel idle (an error stops it)."""
        return self.page.evaluate(self._DONE_JS)

    def wait_finished(self, timeout=240):
        try:
            self.page.wait_for_function(self._DONE_JS, timeout=timeout * 1000, polling=500)
        except Exception:
            self.failure()
            raise
        errors = self.errors()
        if errors:
            self.failure()
        assert not errors, f"{self.name}: cells failed: {errors}"

    def failure(self):
        try:
            self.page.screenshot(
                path=str(self.output_dir / f"browser-failure-{self.name}.png"), full_page=True
            )
        except Exception:
            pass

    def errors(self) -> list[str]:
        return self.page.locator(
            ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']"
        ).all_inner_texts()

    def visible(self, selector) -> list:
        """Bounding boxes of the elements matching ``selector`` that are drawn with some size."""
        return self.page.evaluate(
            "(sel) => [...document.querySelectorAll(sel)].map(e => e.getBoundingClientRect())"
            ".filter(r => r.width > 50 && r.height > 30).map(r => [r.width, r.height])",
            selector,
        )

    def text(self, selector) -> str | None:
        loc = self.page.locator(selector)
        try:
            return loc.first.text_content(timeout=500) if loc.count() else None
        except Exception:
            return None

    def close(self):
        self.page.close()


def _copy_tutorial(lab, name) -> str:
    (lab.root / name).write_text((NOTEBOOKS / name).read_text())
    return name


_BADGE_JS = """(needle) => {
  const outs = [...document.querySelectorAll('.jp-OutputArea-output')].filter(o => o.textContent.includes(needle));
  const found = [];
  for (const out of outs) for (const el of out.querySelectorAll('span')) {
    const t = el.textContent.trim().toLowerCase();
    if (t === 'running' || t === 'stopped') found.push([t, getComputedStyle(el).backgroundColor]);
  }
  return found;
}"""
_DAG_JS = """(names) => {
  const boxes = [];
  for (const el of document.querySelectorAll('.jp-OutputArea-output span, .jp-OutputArea-output div')) {
    const name = names.find(n => el.textContent.trim().startsWith(n));
    if (!name || el.children.length > 3) continue;
    const cs = getComputedStyle(el);
    if (parseFloat(cs.borderTopWidth) > 0 && cs.borderTopStyle !== 'none' && cs.display === 'inline-block')
      boxes.push([name, cs.backgroundColor, cs.borderTopStyle]);
  }
  return boxes;
}"""


def test_untrusted_tutorial_reads_well_before_running(lab, chromium, output_dir):
    """A fresh clone's notebook is untrusted: JupyterLab sanitizes its saved HTML. Opened before
    running anything, the executor card's state badge keeps its colour and the DAG is boxes."""
    nb = Notebook(chromium, lab, _copy_tutorial(lab, "04_dashboards.ipynb"), output_dir)
    try:
        page = nb.page
        card = page.locator(".jp-OutputArea-output", has_text="Dask executor").first
        card.wait_for(timeout=60_000)
        badges = page.evaluate(_BADGE_JS, "Dask executor")
        assert ["running", "rgb(67, 160, 71)"] in badges, badges  # the green 'running' badge
        assert card.locator("svg").count() == 0  # nothing there relies on inline SVG
        nb.shot("untrusted-card", card)
        dag = page.locator(".jp-OutputArea-output", has_text="Workflow monte-carlo").first
        dag.scroll_into_view_if_needed()
        boxes = page.evaluate(_DAG_JS, ["chunks", "simulate", "estimate"])
        assert {b[0] for b in boxes} == {"chunks", "simulate", "estimate"}, boxes
        assert "dashed" in {b[2] for b in boxes if b[0] == "simulate"}  # a fan-out stage is dashed
        nb.shot("untrusted-dag", dag)
        # the saved dashboard (its HTML view) is styled too: badges with colour, tables
        dash = page.locator(".jp-OutputArea-output", has_text="flowdapt · dask").first
        dash.scroll_into_view_if_needed()
        nb.shot("untrusted-dashboard", dash)
        badges = page.evaluate(_BADGE_JS, "flowdapt · dask")
        colours = {colour for _, colour in badges}  # the executor's green badge, the run's blue one
        assert {"rgb(67, 160, 71)", "rgb(30, 136, 229)"} <= colours, badges
    finally:
        nb.close()
    # tutorial 03's StageMapper placeholder: a titled panel and a table, not run-together text
    nb = Notebook(chromium, lab, _copy_tutorial(lab, "03_stage_mapping.ipynb"), output_dir)
    try:
        mapper = nb.page.locator(".jp-OutputArea-output", has_text="Stage mapper: model-selection").first
        mapper.wait_for(timeout=60_000)
        assert mapper.locator("svg").count() == 0 and mapper.locator("table").count() == 1
        framed = nb.page.evaluate(
            "(el) => [...el.querySelectorAll('div')].some(d => getComputedStyle(d).borderTopStyle === 'solid'"
            " && d.textContent.includes('Stage mapper'))",
            mapper.element_handle(),
        )
        assert framed, "the mapper's panel lost its frame"
        nb.shot("untrusted-mapper", mapper)
    finally:
        nb.close()


def test_run_all_03_keeps_the_mapper(lab, chromium, output_dir):
    nb = Notebook(chromium, lab, _copy_tutorial(lab, "03_stage_mapping.ipynb"), output_dir)
    try:
        nb.run_all()
        nb.wait_finished(240)
        mapper = nb.page.locator(".fnb-stage-mapper").first
        mapper.wait_for(timeout=30_000)
        assert nb.visible(".fnb-stage-mapper"), "the StageMapper is blank after Run All"
        assert mapper.locator(".fnb-stage-row").count() == 4
        assert mapper.locator("button[title='Run']").count() == 1  # still there to press
        card = nb.page.locator(".fnb-executor-card").first
        assert nb.visible(".fnb-executor-card") and "stopped" in card.text_content().lower()
        nb.shot("03-run-all-mapper", mapper)
    finally:
        nb.close()


def test_run_all_04_dashboards_live_then_stopped(lab, chromium, output_dir):
    """Run All of tutorial 04 (Dask, a custom 'licences' resource, a --background run): the start
    feedback shows before the card, the background output changes, licences are seen in use,
    every widget is still there after, and the dashboard says STOPPED after %flowdapt stop."""
    nb = Notebook(chromium, lab, _copy_tutorial(lab, "04_dashboards.ipynb"), output_dir)
    page = nb.page
    try:
        nb.run_all()
        feedback_seen = card_seen = None
        progress, licences, running = [], [], []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240 and not nb.finished():
            if feedback_seen is None and page.locator(".fnb-start").count():
                feedback_seen = time.monotonic() - t0
                nb.shot("04-start-feedback", page.locator(".fnb-start").first, passing=True)
            if card_seen is None and page.locator(".fnb-executor-card").count():
                card_seen = time.monotonic() - t0
            text = nb.text(".flowdapt-progress")
            if text and (not progress or progress[-1] != text):
                progress.append(text)
            used = nb.text(".fnb-dashboard .fnb-in-use[data-resource='licences'] b")
            if used:
                licences.append(used)
                if used.split("/")[0] not in ("0", "") and len([x for x in licences if x[0] != "0"]) == 1:
                    nb.shot(
                        "04-dashboard-licences-in-use", page.locator(".fnb-dashboard").first, passing=True
                    )
            run_now = nb.text(".fnb-dashboard .fnb-run-running")
            if run_now and run_now.isdigit():
                running.append(int(run_now))
            time.sleep(0.15)
        nb.wait_finished(60)
        problems = []
        if feedback_seen is None:
            problems.append("no start feedback was seen")
        elif card_seen is not None and card_seen < feedback_seen:
            problems.append(f"the card came before the start feedback ({card_seen} < {feedback_seen})")
        if len(progress) < 2:
            problems.append(f"the --background output never changed: {progress}")
        if not any(x.split("/")[0] not in ("0", "") for x in licences):
            problems.append(f"licences never shown in use: {sorted(set(licences))}")
        # every widget the tutorial shows is still drawn after Run All
        for selector, least in (
            (".fnb-executor-card", 1),
            (".fnb-dashboard", 1),
            (".fnb-tasks", 2),
            (".fnb-resources", 2),
        ):
            if len(nb.visible(selector)) < least:
                problems.append(
                    f"{selector}: {len(nb.visible(selector))} visible after Run All, want {least}"
                )
        dash = page.locator(".fnb-dashboard").first
        state = page.locator(".fnb-dashboard .fnb-executor-state").first.get_attribute("data-state")
        if state != "stopped":
            problems.append(f"dashboard says {state!r} after %flowdapt stop")
        in_use = page.locator(".fnb-dashboard .fnb-in-use b").all_inner_texts()
        if any(x.split("/")[0] not in ("0", "0 B") for x in in_use):
            problems.append(f"still in use after stop: {in_use}")
        nb.shot("04-dashboard-stopped", dash)
        nb.shot("04-background-progress", page.locator(".flowdapt-progress").first)
        assert not problems, problems
    finally:
        nb.close()


RAY_NOTEBOOK = [
    _cell("%load_ext flowdapt_nb"),
    _cell("%flowdapt executor ray --cpus 2"),
    _cell(
        "import time\n\ndef items(n):\n    return list(range(n))\n\n"
        "def nap(x):\n    time.sleep(0.2)\n    return x\n\ndef total(xs):\n    return sum(xs)"
    ),
    _cell(
        "%%flowdapt workflow naps\n- {name: items, target: items}\n"
        "- {name: nap, target: nap, type: parameterized, depends_on: [items]}\n"
        "- {name: total, target: total, depends_on: [nap]}"
    ),
    _cell("%flowdapt run naps --input n=60 --background"),
    _cell("%flowdapt dashboard"),
    _cell("run = _flowdapt_run.wait(240)\nrun.state, run.result"),
    _cell("%flowdapt stop"),
]


def test_ray_dashboard_sees_200ms_tasks_running_then_stopped(lab, chromium, output_dir):
    name = "ray_dashboard.ipynb"
    nb_json = {
        "cells": RAY_NOTEBOOK,
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"},
        },
    }
    (lab.root / name).write_text(json.dumps(nb_json, indent=1))
    nb = Notebook(chromium, lab, name, output_dir)
    page = nb.page
    try:
        nb.run_all()
        running, shot = [], False
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300 and not nb.finished():
            value = nb.text(".fnb-dashboard .fnb-run-running")
            if value and value.isdigit():
                running.append(int(value))
                if int(value) > 0 and not shot:
                    shot = bool(
                        nb.shot("ray-dashboard-running", page.locator(".fnb-dashboard").first, passing=True)
                    )
                    after = nb.text(".fnb-dashboard .fnb-run-running")
                    if not (after and after.isdigit() and int(after) > 0):
                        shot = False  # the count moved on while the picture was taken: take another
            time.sleep(0.1)
        nb.wait_finished(60)
        assert running and max(running) > 0, f"RUNNING never above 0 on Ray: {sorted(set(running))}"
        assert "('finished', 1770)" in page.locator(".jp-Notebook .jp-CodeCell").nth(6).inner_text()
        state = page.locator(".fnb-dashboard .fnb-executor-state").first.get_attribute("data-state")
        nb.shot("ray-dashboard-stopped", page.locator(".fnb-dashboard").first)
        assert state == "stopped", state
    finally:
        nb.close()
