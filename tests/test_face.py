"""The notebook face, headless: one state model read by every view, saved outputs that survive a
notebook sanitizer (no <style>, no <svg>), help without markup, no abbreviated options, a failed
stage's traceback that starts with the user's frames, readable run tables, a local card that
reads right. Real executors and a real IPython shell; the browser test checks the same in
JupyterLab."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import flowdapt_nb as fnb
from flowdapt_nb import states, widgets
from flowdapt_nb.notebook.tracebacks import user_traceback_text
from flowdapt_nb.widgets._common import inline_styles
from flowdapt_nb.widgets._tracker import RunTracker

pytestmark = pytest.mark.timeout(300)


def numbers(n):
    return list(range(n))


def flaky(x):
    if x == 2:
        raise ValueError(f"sensor {x} returned NaN")
    return x * x


def slow(x):
    time.sleep(0.3)
    return x


def total(values):
    return sum(values)


def _workflow(fn=flaky, partial=True):
    return fnb.Workflow(
        "face",
        stages=[
            fnb.Stage("numbers", numbers),
            fnb.Stage(
                "square",
                fn,
                type="parameterized",
                depends_on=["numbers"],
                options={"allow_partial_failure": partial},
            ),
            fnb.Stage("total", total, depends_on=["square"]),
        ],
    )


@pytest.fixture
def local():
    ex = fnb.LocalExecutor(use_processes=False, cpus=2).start()
    yield ex
    ex.close()


# --- one state model ----------------------------------------------------------------------------


def test_stage_state_rule():
    rule = states.stage_state
    assert rule({}, run_state="running") == "pending"
    assert rule({}, run_state="failed") == "skipped" and rule({}, run_state="cancelled") == "cancelled"
    assert rule({"queued": 3}, run_state="running") == "queued"
    assert rule({"queued": 2, "finished": 1}, run_state="running") == "running"
    assert rule({"failed": 1, "finished": 3}, run_state="finished", stage="s") == "finished"  # dropped item
    assert rule({"failed": 1, "finished": 3}, run_state="failed", failed_stage="s", stage="s") == "failed"
    assert rule({"failed": 2}, run_state="failed") == "failed"
    assert rule({"cancelled": 1, "finished": 1}, run_state="cancelled") == "cancelled"
    assert {"finished", "failed", "cancelled", "cached"} == states.TERMINAL
    assert states.advances("queued", "running") and not states.advances("finished", "running")
    assert states.colour(states.TaskState.FAILED) == states.COLOURS["failed"] != states.colour("finished")


def test_run_record_and_tracker_agree(local):
    run = local.submit(_workflow(), input={"n": 5}).run
    tracker = RunTracker(run)
    seen = []
    token = local.events.subscribe(
        lambda b: [tracker.apply(e) for e in (b if isinstance(b, list) else [b])], kinds={"task", "run"}
    )
    try:
        while not run.done:  # compare while it runs, not just at the end
            table = dict(zip(run.stages["stage"], run.stages["state"]))
            seen.append(table)
            time.sleep(0.02)
        local.events.flush()
    finally:
        local.events.unsubscribe(token)
    final = dict(zip(run.stages["stage"], run.stages["state"]))
    assert (
        final == tracker.stage_states() == {"numbers": "finished", "square": "finished", "total": "finished"}
    )
    assert all(set(t.values()) <= set(states.STAGE_STATES) for t in seen)
    assert run.stages.set_index("stage").loc["square", "failed"] == 1  # the dropped item, counted once
    assert tracker.expected_tasks() == len(run.tasks) == 1 + 5 + 1


def test_expected_tasks_unknown_until_the_fan_out_starts(local):
    handle = local.submit(_workflow(slow), input={"n": 3})
    tracker = RunTracker(handle.run)
    assert tracker.expected_tasks() is None  # nothing known of the fan-out yet: no "0/2+"
    handle.wait(60)
    assert RunTracker(handle.run).expected_tasks() == 5


# --- tables -----------------------------------------------------------------------------------


def test_run_tables_are_datetimes_and_seconds(local):
    run = local.run(_workflow(slow), input={"n": 2})
    tasks = run.tasks
    assert list(tasks.columns[:7]) == ["stage", "item", "state", "worker", "queued", "start", "end"]
    for col in ("queued", "start", "end"):
        stamp = tasks[col].iloc[1]
        assert isinstance(stamp, datetime) and stamp.tzinfo is not None and stamp.microsecond % 1000 == 0
    square = tasks[tasks["stage"] == "square"]
    assert (square["duration"] >= 0.29).all() and (square["duration"] < 30).all()  # seconds, not µs
    stages = run.stages.set_index("stage")
    assert isinstance(stages.loc["square", "started"], datetime) and stages.loc["square", "duration"] > 0.29


# --- sanitizer-safe saved outputs ----------------------------------------------------------------


def _assert_safe(page: str, what) -> None:
    assert "<style" not in page and "<svg" not in page and "<script" not in page, what
    assert 'style="' in page, what


def test_saved_outputs_survive_a_sanitizer(local):
    wf = _workflow()
    run = local.run(wf, input={"n": 4})
    for obj in (local, wf, run):
        page = obj._repr_html_()
        _assert_safe(page, type(obj))
    # the DAG is boxes, coloured by the stages' states, in the run's view
    page = run._repr_html_()
    assert page.count('class="fnb-dag-box"') == 3
    assert f"background:{states.colour('finished')}" in page
    made = [
        widgets.ExecutorCard(local),
        widgets.TaskDashboard(local),
        widgets.ResourceDashboard(local),
        widgets.Dashboard(local),
        widgets.StageMapper(workflow=wf),
    ]
    try:
        for w in made:
            page = w._repr_html_()
            _assert_safe(page, type(w))
            assert (
                "class=" in page
                and re.search(r'fnb-badge" style="[^"]*background:#', page)
                or isinstance(w, widgets.StageMapper)
            ), type(w)
        mapper_page = made[-1]._repr_html_()
        assert mapper_page.count('class="fnb-dag-box"') == 3  # the mapper's DAG as boxes too
        card_page = made[0]._repr_html_()
        assert f"background:{states.colour('finished')}" in card_page  # running: the green badge
    finally:
        for w in made:
            w.close()


def test_inline_styles_keeps_text_and_escapes():
    page = inline_styles(
        '<div class="fnb-kv"><span>a &amp; b</span><span>x</span></div><svg><g/></svg>'
        '<style>.x{}</style><table class="fnb-table"><tr><td class="fnb-num" '
        'style="color:red">1</td></tr></table>'
    )
    assert "a &amp; b" in page and "<svg" not in page and ".x{}" not in page
    assert 'style="color:#6a737d"' in page  # the grid's label column
    assert re.search(r'<td class="fnb-num" style="text-align:left;[^"]*;text-align:right;color:red">', page)


def test_card_says_what_local_workers_are(local):
    card = widgets.ExecutorCard(local)
    try:
        text = repr(card)
        assert "workers:   1 (this kernel's process, 2 threads)" in text and "threads x2" in text
    finally:
        card.close()
    procs = fnb.LocalExecutor(use_processes=True, cpus=2).start()
    try:
        card = widgets.ExecutorCard(procs)
        assert "workers:   2 worker processes" in repr(card)
        card.close()
    finally:
        procs.close()


def test_card_shows_stopped_when_the_executor_closes():
    ex = fnb.LocalExecutor(use_processes=False, cpus=1).start()
    card = widgets.ExecutorCard(ex)
    ex.close()
    deadline = time.monotonic() + 10
    while card.state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert card.state == "stopped" and "stopped" in card._body.value  # still drawn, not blanked
    assert card.layout.display != "none" and len(card.children) == 3
    card.close()


# --- magics: help, options, tracebacks ----------------------------------------------------------


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    sh.extension_manager.load_extension("flowdapt_nb")
    sh.user_ns.update(numbers=numbers, flaky=flaky, total=total)
    yield sh
    sh.extension_manager.unload_extension("flowdapt_nb")


def _printed(shell, line):
    with capture_output() as cap:
        shell.run_line_magic("flowdapt", line)
    return cap.stdout


def test_help_has_no_markup_and_lists_workflow_fields(shell):
    for line in ("help", "help run", "help executor", "help workflow", "run --help", "workflow -h"):
        text = _printed(shell, line)
        assert "``" not in text and not re.search(r"::\s*$", text, re.M), (line, text[:300])
    text = _printed(shell, "help workflow")
    for field in (
        "name:",
        "target:",
        "type: parameterized",
        "depends_on:",
        "map_on:",
        "allow_partial_failure:",
        "timeout:",
        "resources:",
    ):
        assert field in text, field
    assert "A workflow file is code" in text and "allowed_targets" in text
    assert "help workflow" in _printed(shell, "help")


def test_abbreviated_options_are_refused(shell):
    with pytest.raises(UsageError, match=r"unrecognized arguments: --cpu 2; did you mean '--cpus'\?"):
        shell.run_line_magic("flowdapt", "executor local --cpu 2")
    with pytest.raises(UsageError, match=r"unrecognized arguments: --thread"):
        shell.run_line_magic("flowdapt", "executor local --thread")
    with pytest.raises(UsageError, match=r"--inp"):
        shell.run_line_magic("flowdapt", "run nothing --inp n=1")


@pytest.mark.parametrize("pool", ["--threads", "--processes"])
def test_failed_stage_shows_the_users_frames_first(shell, pool):
    magics = shell.magics_manager.registry["FlowdaptMagics"]
    with capture_output():
        shell.run_line_magic("flowdapt", f"executor local {pool} --cpus 2")
        shell.run_cell_magic(
            "flowdapt",
            "workflow failing",
            "- {name: numbers, target: numbers}\n"
            "- {name: square, target: flaky, type: parameterized, depends_on: [numbers],\n"
            "   options: {allow_partial_failure: false}}\n"
            "- {name: total, target: total, depends_on: [square]}\n",
        )
    try:
        with capture_output():
            result = shell.run_cell("%flowdapt run failing --input n=4")
        exc = result.error_in_exec
        assert type(exc).__name__ == "StageError"
        text = shell.InteractiveTB.stb2text(exc._render_traceback_())
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        assert "sensor 2 returned NaN" in plain and "flaky" in plain
        assert "worker.py" not in plain and "magics.py" not in plain and "engine.py" not in plain, plain
        first_frame = re.search(r"(Cell In\[|File |<ipython-input)[^\n]*", plain).group(0)
        assert "test_face.py" in first_frame and "in flaky" in first_frame, plain
        assert "StageError: stage 'square' (item 2) failed" in plain and "full_tracebacks = True" in plain
        magics.full_tracebacks = True
        full = re.sub(r"\x1b\[[0-9;]*m", "", shell.InteractiveTB.stb2text(exc._render_traceback_()))
        assert "worker.py" in full and "sensor 2 returned NaN" in full
    finally:
        magics.full_tracebacks = False
        with capture_output():
            shell.run_line_magic("flowdapt", "stop")


def test_worker_traceback_text_starts_at_the_users_frame():
    import flowdapt_nb.worker as worker

    text = (
        "Traceback (most recent call last):\n"
        f'  File "{worker.__file__}", line 93, in execute\n    value = fn(*args)\n'
        '  File "/home/me/analysis.py", line 4, in flaky\n    raise ValueError("x")\n'
        "ValueError: x"
    )
    out = user_traceback_text(text)
    assert out.splitlines()[1].startswith('  File "/home/me/analysis.py"') and "worker.py" not in out
    assert out.endswith("ValueError: x")
