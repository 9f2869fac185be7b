"""The StageMapper in a real browser at 1440x900 (JupyterLab, Debian chromium, Playwright): built by
clicking like a user, run from its input box with ``n=200 max_degree=6``; the state badge must not
push a row's delete button off the edge, the DataFrame result must be a table, a bad input after a
finished run must replace its status, and Enter in a dependency box must add the dependency.

``MAPPER_CELLS`` and ``check_stage_mapper(page, output_dir)`` are reusable: a browser test whose
notebook ends with these cells (after Run All) can call the check on its own page."""

from __future__ import annotations

from pathlib import Path

from browser_support import NEEDS_CHROMIUM, open_notebook, run_all, save_failure, write_notebook
from browser_support import notebook_cell as _cell
from conftest import poll

pytestmark = NEEDS_CHROMIUM

VIEWPORT = {"width": 1440, "height": 900}

MAPPER_CELLS = [
    _cell(
        "import pandas as pd\nimport flowdapt_nb as fnb\n\n"
        "mapper_ex = fnb.LocalExecutor(use_processes=False, cpus=2).start()\n\n"
        "def load(n, max_degree=1):\n"
        "    return pd.DataFrame({'x': range(n), 'power': [i ** max_degree for i in range(n)]})\n\n"
        "def square(load):\n"
        "    return load.assign(square=load.x ** 2)"
    ),
    _cell("stage_mapper = fnb.widgets.StageMapper(executor=mapper_ex)\nstage_mapper"),
]


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
    poll(
        lambda: "a root" in proposal.inner_text(),
        20,
        interval=0.1,
        what="no root proposed for load(n, max_degree=1)",
    )
    add.click()
    mapper.locator(".fnb-stage-row").first.wait_for(timeout=15_000)
    # "square(load)": proposed to depend on the stage named like its parameter
    functions.select_option(value=functions.locator("option", has_text="square(").get_attribute("value"))
    page.wait_for_function(
        "(el) => el.innerText.includes('load ← load (same name)')",
        arg=mapper.element_handle(),
        timeout=15_000,
    )
    add.click()
    page.wait_for_function(
        "(el) => el.querySelectorAll('.fnb-stage-row').length === 2",
        arg=mapper.element_handle(),
        timeout=15_000,
    )
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
    page.wait_for_function(
        "(el) => el.innerText.includes(\"got 'oops'\")", arg=mapper.element_handle(), timeout=15_000
    )
    text = mapper.inner_text()
    assert "result: DataFrame" not in text and table.count() == 0
    assert rows.locator(".fnb-badge").count() == 0
    shot("bad-input", mapper)

    # Enter in the dependency box adds the dependency: take it off, type it back
    second = rows.nth(1)
    tags = second.locator("div.jupyter-widget-tag")  # (its text box has that class too)
    second.locator(".jupyter-widget-tag-close").first.click()
    poll(lambda: tags.count() == 0, 20, interval=0.1, what="the dependency's × did not remove it")
    adder = second.locator("input[placeholder='+ stage, Enter']")
    adder.fill("load")
    adder.press("Enter")
    poll(
        lambda: tags.count() == 1 and "load" in tags.first.inner_text(),
        20,
        interval=0.1,
        what="Enter did not add 'load'",
    )
    poll(
        lambda: adder.input_value() == "", 20, interval=0.1, what="the box was not cleared for the next name"
    )
    shot("enter-added", mapper)
    return shots


def test_stage_mapper_at_1440px(lab, chromium, output_dir):
    write_notebook(lab.root / "mapper.ipynb", [_cell("# Stage mapper at 1440 px", "markdown"), *MAPPER_CELLS])
    page = open_notebook(chromium, lab, "mapper.ipynb", VIEWPORT)
    try:
        run_all(page)
        shots = check_stage_mapper(page, output_dir)
    except Exception:
        save_failure(page, output_dir, "browser-mapper-failure")
        raise
    finally:
        page.close()
    assert all(p.exists() and p.stat().st_size > 5000 for p in shots)
