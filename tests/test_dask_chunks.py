"""Tiny fan-out items go to Dask in chunks (one Dask task runs many items), and every item keeps
what a task of its own has: its task row and events, its own failure with its traceback, its
own result, a retry of its own when its chunk fails as a whole, and an output the next stage
reads on the cluster (the chunk's future and the item's position), never through the driver.

Tests that kill or restart a worker use a cluster of their own; the others share the session's.
"""

import os
import time

import dask
import fault_stages as fs
import pytest
import stages as st
from conftest import poll
from test_dask_faults import close_bounded

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow
from flowdapt_nb.executors import dask as dask_backend

pytestmark = pytest.mark.timeout(300)


def fan_out(fn, **options):
    return Workflow(
        "chunky", stages=[Stage("each", fn, type="parameterized", options={"map_on": "items", **options})]
    )


chunked_stages: dict = {}  # executor -> stages that sent chunks, since sent(ex)


def sent(ex) -> tuple[list, list]:
    """Record what goes to the real cluster: the items of each chunk, and the items sent alone
    (``(stage, item)`` pairs by ``sent(ex, stages=True)``)."""
    chunks, alone = [], []
    stages = chunked_stages[ex] = set()
    backend = ex._backend
    send_chunk, send_many = backend.submit_chunk, backend.submit_many

    def chunk(fn, ctx, tasks, resources, on_done):
        chunks.append([info.item for info, _ in tasks])
        stages.add(tasks[0][0].stage)
        return send_chunk(fn, ctx, tasks, resources, on_done)

    def many(ctx, calls, refs):
        alone.extend(call[1].item for call in calls)
        return send_many(ctx, calls, refs)

    backend.submit_chunk, backend.submit_many = chunk, many
    return chunks, alone


def states_by_task(events) -> dict:
    """item -> the states its task events went through, in the order they came."""
    by_task: dict = {}
    for event in events:
        by_task.setdefault(event.item, []).append(event.state)
    return by_task


@pytest.fixture
def dask_ex(dask_executor):
    """The session's Dask executor, its backend as it was after the test."""
    backend = dask_executor._backend
    yield dask_executor
    for name in ("submit_chunk", "submit_many"):
        backend.__dict__.pop(name, None)
    backend.chunk_seconds = dask_backend.CHUNK_SECONDS


def test_tiny_items_go_in_chunks_and_keep_their_records_events_and_order(dask_ex):
    ex = dask_ex
    items = list(range(1000))
    ex._backend.chunk_seconds = None  # every item alone: what chunks must equal
    alone_result = ex.run(fan_out(st.square), input={"items": items}).result
    ex._backend.chunk_seconds = dask_backend.CHUNK_SECONDS
    chunks, alone = sent(ex)
    events = []
    token = ex.events.subscribe(events.append, kinds=["task"])
    try:
        run = ex.run(fan_out(st.square), input={"items": items})
    finally:
        ex.events.unsubscribe(token)
    assert run.result == alone_result == [x * x for x in items]
    assert chunks and max(map(len, chunks)) > 1 and sum(map(len, chunks)) > 500, (chunks, alone)
    assert sorted(alone + [i for c in chunks for i in c]) == items  # each item sent once
    tasks = run.tasks
    assert len(tasks) == 1000 and set(tasks.state) == {"finished"}
    assert tasks[["queued", "start", "end", "worker"]].notna().all().all()
    assert (tasks.start <= tasks.end).all()
    assert set(tasks.worker) <= set(ex.client.scheduler_info(n_workers=-1)["workers"])
    by_task = states_by_task(events)
    assert len(by_task) == 1000
    assert all(states == ["queued", "running", "finished"] for states in by_task.values())


def test_slow_items_are_not_chunked(dask_ex):
    chunks, alone = sent(dask_ex)
    run = dask_ex.run(fan_out(st.nap), input={"items": list(range(8)), "delay": 0.1})
    assert run.result == list(range(8)) and chunks == [] and sorted(alone) == list(range(8))


def test_a_failing_item_fails_alone_with_its_own_error_and_traceback(dask_ex):
    chunks, _ = sent(dask_ex)
    events = []
    token = dask_ex.events.subscribe(events.append, kinds=["task"])
    try:
        run = dask_ex.run(fan_out(st.fail_every_seventh), input={"items": list(range(700))})
    finally:
        dask_ex.events.unsubscribe(token)
    chunked = {i for c in chunks if len(c) > 1 for i in c}
    assert chunked & set(range(0, 700, 7))  # failing items ran inside chunks
    assert run.result == [x for x in range(700) if x % 7]
    assert sorted(f["item"] for f in run.failures) == list(range(0, 700, 7))
    for failure in run.failures:
        assert f"item {failure.item} is a multiple of 7" in failure.error
        assert "fail_every_seventh" in failure.traceback and "ValueError" in failure.traceback
    tasks = run.tasks
    assert (tasks.state == "failed").sum() == 100 and (tasks.state == "finished").sum() == 600
    assert tasks[tasks.state == "failed"].error.str.contains("multiple of 7").all()
    by_task = states_by_task(events)
    assert all(
        by_task[i] == ["queued", "running", "failed" if i % 7 == 0 else "finished"] for i in range(700)
    )


def test_an_unpicklable_result_in_a_chunk_fails_only_its_item(dask_ex):
    chunks, _ = sent(dask_ex)
    run = dask_ex.run(fan_out(st.lock_on_five), input={"items": list(range(300))})
    assert chunks
    assert run.result == [x for x in range(300) if x != 5]
    assert [f["item"] for f in run.failures] == [5] and "lock" in run.failures[0].error


def test_a_failing_item_in_a_chunk_fails_the_stage_and_names_it(dask_ex):
    chunks, _ = sent(dask_ex)
    items = [x for x in range(1, 1000) if x % 7] + [7 * 1000]  # the one failing item comes last
    with pytest.raises(fnb.StageError) as err:
        dask_ex.run(fan_out(st.fail_every_seventh, allow_partial_failure=False), input={"items": items})
    assert chunks and max(map(len, chunks)) > 1
    assert err.value.stage == "each" and isinstance(err.value.__cause__, ValueError)
    assert "7000" in str(err.value.__cause__) and err.value.run.state == "failed"
    assert dask_ex.run(fan_out(st.square), input={"items": [3]}).result == [9]  # still usable


def test_chunked_items_flow_on_to_the_next_stages_on_the_cluster(dask_ex):
    chunks, _ = sent(dask_ex)
    flow = Workflow(
        "chunky-flow",
        stages=[
            Stage("numbers", st.numbers),
            Stage("square", st.square, type="parameterized", depends_on=["numbers"]),
            Stage("again", st.square, type="parameterized", depends_on=["square"]),
            Stage("total", st.total, depends_on=["again"]),
            # each item of a chunked output, with a plain stage's output beside it
            Stage("plus", st.add, type="parameterized", depends_on=["again", "total"]),
        ],
    )
    run = dask_ex.run(flow, input={"n": 1500})
    total = sum(x**4 for x in range(1500))
    assert run.result == [x**4 + total for x in range(1500)]
    assert chunked_stages[dask_ex] >= {"square", "again"}  # both fan-outs went in chunks


def say(x):
    print(f"said {x}")
    return x


def test_what_items_in_a_chunk_print_reaches_the_driver_under_their_own_names(dask_ex, capfd):
    chunks, _ = sent(dask_ex)
    assert dask_ex.run(fan_out(say), input={"items": list(range(300))}).result == list(range(300))
    assert any(len(c) > 1 for c in chunks)
    seen = []

    def all_said():
        out, err = capfd.readouterr()
        seen.append(out + err)
        return "".join(seen).count(") said ") >= 300

    poll(all_said, 60, 0.1)
    said = {
        line.split("[", 1)[1].split("]", 1)[0]: line.rsplit(" ", 1)[1]
        for line in "".join(seen).splitlines()
        if line.startswith("(each[") and ") said " in line
    }
    assert said == {str(x): str(x) for x in range(300)}  # each line under its own item


def nbytes(data):
    return len(data)


def _driver_peak_rise(fn):
    """fn()'s result and how far this process's peak resident memory rose while it ran (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    before = peak()
    result = fn()
    return result, peak() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_big_item_results_stay_on_the_cluster(dask_ex):
    chunks, _ = sent(dask_ex)
    flow = Workflow(
        "big",
        stages=[
            Stage("make", fs.sized, type="parameterized", options={"map_on": "items"}),
            Stage("size", nbytes, type="parameterized", depends_on=["make"]),
            Stage("total", st.total, depends_on=["size"]),
        ],
    )
    run, rise = _driver_peak_rise(lambda: dask_ex.run(flow, input={"items": list(range(60)), "megabytes": 4}))
    assert run.result == 60 * 4_000_000
    assert any(len(c) > 1 for c in chunks), chunks  # the 4 MB items went in chunks
    assert rise < 80_000_000, f"the driver's peak memory rose {rise / 1e6:.0f} MB for 240 MB of items"


def test_a_missing_chunk_report_is_fetched_from_the_chunk(dask_ex, monkeypatch):
    """A chunk's report normally reaches the driver just before its result; if it never does,
    the driver reads the copy kept in the chunk's result."""
    monkeypatch.setattr(dask_backend, "REPORT_GRACE", 0.2)
    chunks, _ = sent(dask_ex)
    client = dask_ex.client
    client.unsubscribe_topic(dask_backend.CHUNK_TOPIC)
    try:
        run = dask_ex.run(fan_out(st.fail_every_seventh), input={"items": list(range(300))})
    finally:
        client.subscribe_topic(dask_backend.CHUNK_TOPIC, dask_ex._on_chunk_report)
    assert chunks and run.result == [x for x in range(300) if x % 7]
    assert sorted(f["item"] for f in run.failures) == list(range(0, 300, 7))
    assert not dask_ex._backend._late and not dask_ex._backend._sent


# --- a chunk that fails as a whole: a cluster of its own --------------------------------------


def die_once(x, victim=150, flag="", delay=0.001):
    """Item ``victim`` ends its worker process the first time it runs (as if the worker were
    killed under it), and runs normally after."""
    time.sleep(delay)
    if x == victim and not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(3)
    return x


def stuck_on(x, victim=150, seconds=120.0):
    time.sleep(seconds if x == victim else 0.001)
    return x


def test_a_worker_lost_under_a_chunk_has_its_items_retried_one_by_one(tmp_path):
    # Dask gives up on a task at the first worker lost under it (by default it reruns it up to
    # 3 times itself): the chunk then fails as a whole, and the engine retries its items alone
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        ex = fnb.DaskExecutor(cpus=2, threads=1).start()
    try:
        chunks, alone = sent(ex)
        flag = str(tmp_path / "died")
        handle = ex.submit(fan_out(die_once), input={"items": list(range(400)), "victim": 150, "flag": flag})
        run = handle.wait(240)
        assert os.path.exists(flag)  # the victim's worker did die
        assert run.result == list(range(400)) and not run.failures
        victim_chunk = next(c for c in chunks if 150 in c)
        assert len(victim_chunk) > 1
        assert set(victim_chunk) <= set(alone)  # each item of the lost chunk went again, alone
        tasks = run.tasks
        assert len(tasks) == 400 and set(tasks.state) == {"finished"}
    finally:
        close_bounded(ex)


def test_cancelling_a_stuck_chunk_gives_its_worker_back():
    ex = fnb.DaskExecutor(cpus=1, threads=1).start()
    try:
        chunks, _ = sent(ex)
        handle = ex.submit(fan_out(stuck_on), input={"items": list(range(400)), "victim": 150})

        def victim_running():  # reported running from inside its chunk
            tasks = handle.run.tasks
            return len(tasks) and (tasks[tasks.item == 150].state == "running").any()

        poll(victim_running, 120, 0.1, what="item 150 reported running")
        assert any(150 in c and len(c) > 1 for c in chunks)
        handle.cancel()
        assert handle._finished.wait(30) and handle.run.state == "cancelled"
        # the only worker thread was held by the stuck chunk: the next run goes only if it was freed
        assert ex.submit(fan_out(st.square), input={"items": [1, 2]}).wait(90).result == [1, 4]
        assert ex.restarts and any("+" in key for key in ex.restarts[-1]["tasks"]), ex.restarts
    finally:
        close_bounded(ex)
