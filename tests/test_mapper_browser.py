"""The StageMapper in a real browser at 1440x900 (JupyterLab, Debian chromium, Playwright): built by
clicking like a user, run from its input box with ``n=200 max_degree=6``; the state badge must not
push a row's delete button off the edge, the DataFrame result must be a table, a bad input after a
finished run must replace its status, and Enter in a dependency box must add the dependency.

``MAPPER_CELLS`` and ``check_stage_mapper(page, output_dir)`` are reusable: a browser test whose
notebook ends with these cells (after Run All) can call the check on its own page."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, _cell, lab  # noqa: F401  (lab: the JupyterLab fixture)

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed"),
    pytest.mark.timeout(420),
]

VIEWPORT = {"width": 1440, "height": 900}

MAPPER_CELLS = [
    _cell("import pandas as pd\nimport flowdapt_nb as fnb\n\n"
          "mapper_ex = fnb.LocalExecutor(use_processes=False, cpus=2).start()\n\n"
          "def load(n, max_degree=1):\n"
          "    return pd.DataFrame({'x': range(n), 'power': [i ** max_degree for i in range(n)]})\n\n"
          "def square(load):\n"
          "    return load.assign(square=load.x ** 2)"),
    _cell("stage_mapper = fnb.widgets.StageMapper(executor=mapper_ex)\nstage_mapper"),
]


def _run_all(page) -> None:
    """Run > Run All Cells once the kernel is idle (again if the kernel wasn't listening yet)."""
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=90_000)
    prompt = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first
    for attempt in range(4):
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        try:
            page.wait_for_function("(el) => /\\[(\\*|\\d+)\\]/.test(el.textContent)",
                                   arg=prompt.element_handle(), timeout=15_000)
            return
        except Exception:
            if attempt == 3:
                raise


def _until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)


def _overflow(mapper) -> list[str]:
    """Stage rows whose delete button or state badge pokes out of the row (or the mapper)."""
    return mapper.evaluate("""(root) => {
        const out = [];
        const right = root.getBoundingClientRect().right;
        root.querySelectorAll('.fnb-stage-row').forEach((row, i) => {
            const r = row.getBoundingClientRect();
            const bin = row.querySelector('button[title="remove this stage"]').getBoundingClientRect();
            if (bin.right > r.right + 0.5 || bin.right > right + 0.5 || bin.width < 20)
                out.push(`row ${i}: delete button ${bin.left}-${bin.right} outside ${r.left}-${r.right}`);
            const badge = row.querySelector('.fnb-badge');
            if (badge) {
                const b = badge.getBoundingClientRect();
                if (b.right > r.right + 0.5) out.push(`row ${i}: badge ends at ${b.right} > ${r.right}`);
            }
        });
        return out;
    }""")


def check_stage_mapper(page, output_dir: Path) -> list[Path]:
    """Drive the mapper of ``MAPPER_CELLS`` (already run in ``page``) like a user and check what
    the page shows; returns the screenshots taken (test-output/browser-mapper-*.png)."""
    shots = []

    def shot(name, locator=None):
        path = output_dir / f"browser-mapper-{name}.png"
        (locator or page).screenshot(path=str(path))
        shots.append(path)

    mapper = page.locator(".fnb-stage-mapper").last
    mapper.wait_for(timeout=60_000)
    mapper.scroll_into_view_if_needed()
    functions = mapper.locator(".fnb-mapper-side select")
    add = mapper.get_by_role("button", name="Add as stage")
    proposal = mapper.locator(".fnb-proposal")
    # "load" first: nothing to depend on, a root
    functions.select_option(value=functions.locator("option", has_text="load(").get_attribute("value"))
    _until(lambda: "a root" in proposal.inner_text(), "no root proposed for load(n, max_degree=1)")
    add.click()
    mapper.locator(".fnb-stage-row").first.wait_for(timeout=15_000)
    # "square(load)": proposed to depend on the stage named like its parameter
    functions.select_option(value=functions.locator("option", has_text="square(").get_attribute("value"))
    page.wait_for_function("(el) => el.innerText.includes('load ← load (same name)')",
                           arg=mapper.element_handle(), timeout=15_000)
    add.click()
    page.wait_for_function("(el) => el.querySelectorAll('.fnb-stage-row').length === 2",
                           arg=mapper.element_handle(), timeout=15_000)
    rows = mapper.locator(".fnb-stage-row")
    assert "load" in rows.nth(1).locator("div.jupyter-widget-tag").first.inner_text()

    # run with the syntax %flowdapt run --input takes
    box = mapper.locator("input[placeholder^='run input']")
    box.fill("n=200 max_degree=6")
    box.press("Enter")
    mapper.get_by_role("button", name="Run").click()
    table = mapper.locator("table.fnb-result-table")
    table.wait_for(timeout=60_000)
    assert "200 rows × 3 columns" in mapper.inner_text()
    assert table.locator("tbody tr").count() == 11  # 5 first, "...", 5 last
    assert "39601" in table.inner_text()  # 199 ** 2, the last row
    badges = rows.locator(".fnb-badge")
    assert badges.count() == 2 and all(t.lower() == "finished" for t in badges.all_inner_texts())
    problems = _overflow(mapper)
    assert not problems, problems
    mapper.scroll_into_view_if_needed()
    shot("ran")  # the 1440x900 viewport, as the user sees it
    shot("ran-widget", mapper)

    # a bad input after the finished run: the error is the only status
    box.fill("n=200 oops")
    box.press("Enter")
    mapper.get_by_role("button", name="Run").click()
    page.wait_for_function("(el) => el.innerText.includes(\"got 'oops'\")", arg=mapper.element_handle(),
                           timeout=15_000)
    text = mapper.inner_text()
    assert "result: DataFrame" not in text and table.count() == 0
    assert rows.locator(".fnb-badge").count() == 0
    shot("bad-input", mapper)

    # Enter in the dependency box adds the dependency: take it off, type it back
    second = rows.nth(1)
    tags = second.locator("div.jupyter-widget-tag")  # (its text box has that class too)
    second.locator(".jupyter-widget-tag-close").first.click()
    _until(lambda: tags.count() == 0, "the dependency's × did not remove it")
    adder = second.locator("input[placeholder='+ stage, Enter']")
    adder.fill("load")
    adder.press("Enter")
    _until(lambda: tags.count() == 1 and "load" in tags.first.inner_text(), "Enter did not add 'load'")
    _until(lambda: adder.input_value() == "", "the box was not cleared for the next name")
    shot("enter-added", mapper)
    return shots


def test_stage_mapper_at_1440px(lab, output_dir):  # noqa: F811  (lab is the imported fixture)
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    import json
    nb = {"cells": [_cell("# Stage mapper at 1440 px", "markdown"), *MAPPER_CELLS], "nbformat": 4,
          "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                      "language": "python"}, "language_info": {"name": "python"}}}
    (lab.root / "mapper.ipynb").write_text(json.dumps(nb, indent=1))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            page.goto(f"{lab.url}/lab/tree/mapper.ipynb?reset&token={lab.token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            _run_all(page)
            shots = check_stage_mapper(page, output_dir)
        except Exception:
            try:
                page.screenshot(path=str(output_dir / "browser-mapper-failure.png"), full_page=True)
                (output_dir / "browser-mapper-failure.html").write_text(page.content())
            except Exception:
                pass
            raise
        finally:
            browser.close()
    assert all(p.exists() and p.stat().st_size > 5000 for p in shots)
