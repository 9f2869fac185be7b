"""Live dashboards tell the truth on every executor: resources in use (cpus and custom ones) in
``ex.resources()`` and in the widgets' traits while stages hold them, tasks seen running, the
dashboard STOPPED once its executor is closed, and the notebook's live outputs (executor start,
foreground and background run progress) that keep moving while the work goes on.

Every check polls until a deadline (Ray's own view lags by seconds; a loaded machine is slow):
never one look, never a timed assertion."""

from __future__ import annotations

import time

import pytest
import stages as st
from conftest import make_executor, poll
from kernel_support import kernel

import flowdapt_nb as fnb
from flowdapt_nb import widgets


def slow_map(resources: dict) -> fnb.Workflow:
    return fnb.Workflow(
        "held",
        stages=[
            fnb.Stage("work", st.slow, type="parameterized", options={"map_on": "xs"}, resources=resources)
        ],
    )


def cpu_name(ex) -> str:
    return "CPU" if ex.kind == "ray" else "cpus"


def frame_in_use(ex, name: str) -> float:
    """In use of ``name`` over all workers, from ``ex.resources()`` (total - available)."""
    frame = ex.resources()
    if f"{name}_total" not in frame:
        return 0.0
    return float((frame[f"{name}_total"] - frame[f"{name}_available"]).sum())


def watch_run(ex, dash, handle, names: list[str]) -> dict:
    """While the run goes on: the most of each resource seen in use (dashboard trait and
    ``ex.resources()``) and the most tasks seen running on the task dashboard."""
    seen = {"running": 0, **{f"trait:{n}": 0.0 for n in names}, **{f"frame:{n}": 0.0 for n in names}}
    while not handle.done():
        counts = dash.tasks.stage_counts.get("work") or {}
        seen["running"] = max(seen["running"], counts.get("running", 0))
        for n in names:
            seen[f"trait:{n}"] = max(seen[f"trait:{n}"], dash.resources.in_use.get(n, 0.0))
            seen[f"frame:{n}"] = max(seen[f"frame:{n}"], frame_in_use(ex, n))
        time.sleep(0.05)
    return seen


# --- in use: cpus and custom resources ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["threads", "processes", "dask", "ray"])
def test_resources_in_use_while_stages_hold_them(kind):
    ex = make_executor(kind)
    try:
        custom = [] if ex.kind == "local" else ["hamster_wheels"]  # the shared clusters have 2 per worker
        names = [cpu_name(ex), *custom]
        dash = widgets.Dashboard(ex)
        poll(lambda: all(n in dash.resources.totals for n in names))
        totals = {n: dash.resources.totals[n] for n in names}
        assert totals[cpu_name(ex)] == 2
        wf = slow_map({"cpus": 1, **{n: 1 for n in custom}})
        handle = ex.submit(wf, input={"xs": list(range(8)), "delay": 0.8})
        seen = watch_run(ex, dash, handle, names)
        handle.wait(120)
        for n in names:  # both tasks' share was seen held, in the widget and in ex.resources()
            assert seen[f"trait:{n}"] >= 1, (n, seen)
            assert seen[f"frame:{n}"] >= 1, (n, seen)
            assert seen[f"trait:{n}"] <= totals[n] and seen[f"frame:{n}"] <= totals[n]
        assert seen["running"] >= 1
        # after the run: nothing of ours held any more, in both views
        assert poll(
            lambda: all(dash.resources.in_use.get(n, 0) == 0 and frame_in_use(ex, n) == 0 for n in names),
            timeout=30,
        ), (dash.resources.in_use, ex.resources())
        stats = dash.resources._body.value
        for n in names:
            assert f'data-resource="{n}"' in stats and f"{n} in use" in stats
        dash.close()
    finally:
        if kind in ("threads", "processes"):
            ex.close()


def test_local_memory_request_shown_in_use():
    """A stage's memory request on the local executor: held while its task runs, then free."""
    ex = fnb.LocalExecutor(use_processes=False, cpus=2).start()
    try:
        dash = widgets.ResourceDashboard(ex)
        handle = ex.submit(slow_map({"memory": "100MB"}), input={"xs": [1], "delay": 3.0})
        assert poll(lambda: dash.in_use.get("memory") == 100_000_000, timeout=60), dash.in_use
        assert frame_in_use(ex, "memory") in (0.0, 100_000_000.0)  # the task may just have ended
        assert "memory reserved" in dash._body.value
        handle.wait(60)
        assert poll(lambda: frame_in_use(ex, "memory") == 0 and dash.in_use.get("memory", 0) == 0, timeout=30)
        dash.close()
    finally:
        ex.close()


def test_dask_custom_resource_shown_in_use_per_worker(dask_executor):
    """Tutorial 04's case: one unit per worker, a stage that holds one; each worker's row shows
    it in use while its task runs (the scheduler's own book-keeping)."""
    ex = dask_executor
    dash = widgets.ResourceDashboard(ex)
    handle = ex.submit(slow_map({"hamster_wheels": 2}), input={"xs": list(range(4)), "delay": 1.0})
    busy = []

    def a_worker_full():
        rows = dash.latest
        busy.extend(w for w, row in rows.items() if row.get("hamster_wheels_used") == 2)
        return busy

    assert poll(a_worker_full, timeout=60), dash.latest
    assert 'data-resource="hamster_wheels"' in dash._body.value
    handle.wait(120)
    dash.close()


# --- tasks seen running ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["threads", "processes", "dask", "ray"])
def test_tasks_of_200_ms_are_seen_running(kind):
    """A run of 200 ms tasks on 2 cpus: the task dashboard shows some running while it goes
    (on Ray it showed 0 for the whole run while the 'running' reports waited in batches)."""
    ex = make_executor(kind)
    try:
        dash = widgets.TaskDashboard(ex)
        handle = ex.submit(slow_map({}), input={"xs": list(range(20)), "delay": 0.2})
        most = 0
        while not handle.done():
            if dash.run_id == handle.run.uid:
                most = max(most, (dash.stage_counts.get("work") or {}).get("running", 0))
            time.sleep(0.02)
        handle.wait(60)
        assert most >= 1
        assert 'class="fnb-run-running"' in dash._body.value
        dash.close()
    finally:
        if kind in ("threads", "processes"):
            ex.close()


@pytest.mark.parametrize("kind", ["threads", "processes", "ray"])
def test_a_long_item_inside_a_chunk_is_seen_running(kind):
    """Tiny items go to workers in chunks, without a report each; one item among them that works
    for 1.5 s is still reported running while it runs, not only when its chunk comes back."""
    import live_stages

    ex = make_executor(kind)
    received = []
    token = ex.events.subscribe(
        lambda e: received.append((time.monotonic(), e.item, e.state)), kinds={"task"}
    )
    try:
        wf = fnb.Workflow(
            "chunky",
            stages=[
                fnb.Stage("work", live_stages.mostly_tiny, type="parameterized", options={"map_on": "x"})
            ],
        )
        run = ex.run(wf, input={"x": list(range(600))})
        assert run.state == "finished"
        mine = {state: t for t, item, state in received if item == 300}
        assert mine["finished"] - mine["running"] > 0.5, mine  # seen running well before it ended
        assert len(run.tasks) == 600
    finally:
        ex.events.unsubscribe(token)
        if kind in ("threads", "processes"):
            ex.close()


# --- the dashboard after its executor stopped ---------------------------------------------------


@pytest.mark.parametrize("kind", ["threads", "processes", "dask"])
def test_dashboard_turns_stopped_with_nothing_in_use(kind, dask_cluster):
    ex = make_executor(kind)
    try:
        dash = widgets.Dashboard(ex)
        assert dash.executor_state == "running" and 'data-state="running"' in dash._header.value
        handle = ex.submit(slow_map({}), input={"xs": list(range(2)), "delay": 3.0})
        assert poll(lambda: dash.resources.in_use.get("cpus", 0) > 0, timeout=60)
        handle.wait(60)
        if kind == "dask":
            dask_cluster.close()  # the next test that needs it gets a new one
        else:
            ex.close()
        assert dash.executor_state == "stopped" and dash.resources.executor_state == "stopped"
        assert 'data-state="stopped"' in dash._header.value and ">stopped<" in dash._header.value
        assert dash.resources.in_use and all(v == 0 for v in dash.resources.in_use.values())
        assert dash.resources.last_sample > 0
        body = dash.resources._body.value
        last = time.strftime("%H:%M:%S", time.localtime(dash.resources.last_sample))
        assert f"last sample {last}, executor stopped" in body and "sampled now" not in body
        if kind != "dask":  # one local worker of 2 cpus, greyed at 0
            assert "0 / 2" in body and "opacity:.45" in body
        assert "executor stopped" in repr(dash.resources)
        redraws = dash.resources.redraws
        time.sleep(0.3)  # nothing moves any more: no sampler, no feed
        assert dash.resources.redraws == redraws
        dash.close()
    finally:
        if kind in ("threads", "processes"):
            ex.close()


def test_dashboard_of_a_stopped_executor_says_so():
    ex = fnb.LocalExecutor(use_processes=False, cpus=1)
    dash = widgets.Dashboard(ex)
    assert dash.executor_state == "stopped" and dash.resources.executor_state == "stopped"
    assert "stopped before a resource sample" in dash.resources._body.value
    dash.close()


# --- the notebook's live outputs, in a real kernel ---------------------------------------------

KERNEL_SETUP = """
import time

def numbers(n=4):
    return list(range(n))

def nap(x):
    time.sleep(0.7)
    return x

def long_nap():
    time.sleep(2.5)
"""

NAPS = """\
- {name: numbers, target: numbers}
- {name: nap, target: nap, type: parameterized, depends_on: [numbers]}
"""


def _iopub_until(kc, predicate, timeout):
    """iopub messages until ``predicate(messages)`` holds or ``timeout`` passes."""
    import queue

    msgs, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate(msgs):
        try:
            msgs.append(kc.get_iopub_msg(timeout=1))
        except queue.Empty:
            pass
    return msgs


def _outputs(msgs, msg_id=None):
    """(type, display_id, data) of the display messages (of one cell's ``msg_id``)."""
    return [
        (m["msg_type"], m["content"].get("transient", {}).get("display_id"), m["content"]["data"])
        for m in msgs
        if m["msg_type"] in ("display_data", "update_display_data", "execute_result")
        and (msg_id is None or m["parent_header"].get("msg_id") == msg_id)
    ]


@pytest.mark.timeout(300)
def test_kernel_start_feedback_then_card_and_a_live_background_run(tmp_path):
    """In a real kernel: ``%flowdapt executor dask`` shows at once what is starting, ticking, and
    that output becomes the card; a ``--background`` run's output keeps moving after the cell
    returned, until it shows the run finished."""
    import re

    with kernel(tmp_path) as kc:
        reply = kc.execute_interactive(
            KERNEL_SETUP + "\nget_ipython().run_line_magic('load_ext', 'flowdapt_nb')\n"
            f"get_ipython().run_cell_magic('flowdapt', 'workflow naps', {NAPS!r})\n"
            "get_ipython().run_cell_magic('flowdapt', 'workflow long', "
            "'- {name: long, target: long_nap}')\n",
            timeout=60,
            output_hook=lambda m: None,
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        # the executor start: feedback first, then the card in its place
        msgs = []
        reply = kc.execute_interactive(
            "%flowdapt executor dask --cpus 2", timeout=120, output_hook=msgs.append
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        shown = _outputs(msgs)
        first_type, feedback_id, first = shown[0]
        assert first_type == "display_data" and feedback_id
        assert (
            'class="fnb-start"' in first["text/html"] and "Starting the Dask executor" in first["text/plain"]
        )
        assert "starting" in first["text/plain"].splitlines()[1]  # what is happening, not only a clock
        updates = [data for kind, did, data in shown if kind == "update_display_data" and did == feedback_id]
        assert updates and "application/vnd.jupyter.widget-view+json" in updates[-1]  # the card replaced it
        ticks = [data["text/plain"] for data in updates[:-1]]
        if ticks:  # a start longer than a tick: the clock moved
            seconds = [float(re.search(r"… ([\d.]+) s", t).group(1)) for t in ticks]
            assert seconds == sorted(seconds)
        # a background run: its output moves on after the cell ended
        msg_id = kc.execute("%flowdapt run naps --input n=6 --background")
        msgs = _iopub_until(
            kc,
            lambda ms: any(
                m["msg_type"] == "update_display_data" and "[finished" in m["content"]["data"]["text/plain"]
                for m in ms
            ),
            timeout=120,
        )
        shown = _outputs(msgs, msg_id)
        idle_at = next(
            i
            for i, m in enumerate(msgs)
            if m["msg_type"] == "status"
            and m["content"]["execution_state"] == "idle"
            and m["parent_header"].get("msg_id") == msg_id
        )
        first_type, progress_id, first = shown[0]
        assert first_type == "display_data" and progress_id and "flowdapt-progress" in first["text/html"]
        later = [
            m["content"]["data"]["text/plain"]
            for m in msgs[idle_at:]
            if m["msg_type"] == "update_display_data"
            and m["content"]["transient"]["display_id"] == progress_id
        ]
        assert len(set(later)) >= 2, later  # it changed after the cell returned
        assert "[finished" in later[-1] and "nap 6/6" in later[-1]
        assert not any(kind == "execute_result" for kind, _, _ in shown)  # no frozen snapshot beside it
        # a foreground run of one long task: no task event for 2.5 s, yet its elapsed time moves
        msgs = []
        reply = kc.execute_interactive("%flowdapt run long", timeout=120, output_hook=msgs.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        texts = [data["text/plain"] for kind, _, data in _outputs(msgs) if kind == "update_display_data"]
        running = [t for t in texts if "long 0/1 1 running" in t]
        elapsed = {re.search(r"\[running ([\d.]+)s\]", t).group(1) for t in running}
        assert len(elapsed) >= 2, texts
        reply = kc.execute_interactive("%flowdapt stop", timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
