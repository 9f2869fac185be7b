"""Tiny fan-out items go to workers in chunks (one round trip for many items) on the local and Ray
executors, and every item still has its own record, events, failure and result (on Ray its own
object too). Dask's chunks are tested in tests/test_dask_chunks.py."""

import threading

import pytest
import stages as st
from conftest import make_executor

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow

CHUNKED = ["threads", "processes", "ray"]


def fan_out(fn, **options):
    return Workflow(
        "chunky", stages=[Stage("each", fn, type="parameterized", options={"map_on": "items", **options})]
    )


@pytest.fixture(params=CHUNKED)
def local(request):
    ex = make_executor(request.param)
    yield ex
    if request.param != "ray":  # the session's shared cluster stays up
        ex.close()


def chunk_sizes(ex) -> list:
    """Record how many items each chunk sent to the real backend carried."""
    sizes = []
    send = ex._backend.submit_chunk

    def counting(fn, ctx, tasks, resources, on_done):
        sizes.append(len(tasks))
        return send(fn, ctx, tasks, resources, on_done)

    ex._backend.submit_chunk = counting
    return sizes


def test_tiny_items_go_in_chunks_and_keep_their_records_and_events(local):
    sizes = chunk_sizes(local)
    events = []
    token = local.events.subscribe(events.append, kinds=["task"])
    try:
        run = local.run(fan_out(st.square), input={"items": list(range(2000))})
    finally:
        local.events.unsubscribe(token)
    assert run.result == [x * x for x in range(2000)]
    assert sizes and max(sizes) > 1 and sum(sizes) > 1000, (  # most items went in chunks
        sizes,
        local._backend.parallelism,
        run.tasks.worker.nunique(),
        run.tasks.duration.describe(),
    )
    tasks = run.tasks
    assert len(tasks) == 2000 and set(tasks.state) == {"finished"}
    assert tasks[["queued", "start", "end", "worker"]].notna().all().all()
    assert (tasks.start <= tasks.end).all()
    by_task: dict = {}
    for event in events:
        by_task.setdefault(event.item, []).append(event.state)
    assert len(by_task) == 2000
    assert all(states == ["queued", "running", "finished"] for states in by_task.values())


def test_chunked_items_flow_on_to_the_next_stages(local):
    sizes = chunk_sizes(local)
    flow = Workflow(
        "chunky-flow",
        stages=[
            Stage("numbers", st.numbers),
            Stage("square", st.square, type="parameterized", depends_on=["numbers"]),
            Stage("again", st.square, type="parameterized", depends_on=["square"]),
            Stage("total", st.total, depends_on=["again"]),
        ],
    )
    run = local.run(flow, input={"n": 1500})
    assert sizes and run.result == sum(x**4 for x in range(1500))


def test_slow_items_are_not_chunked(local):
    sizes = chunk_sizes(local)
    run = local.run(fan_out(st.nap), input={"items": list(range(8)), "delay": 0.05})
    assert run.result == list(range(8)) and sizes == []


def test_partial_failures_inside_chunks_are_per_item(local):
    sizes = chunk_sizes(local)
    run = local.run(fan_out(st.fail_every_seventh), input={"items": list(range(700))})
    assert sizes
    assert run.result == [x for x in range(700) if x % 7]
    assert sorted(f["item"] for f in run.failures) == list(range(0, 700, 7))
    assert all("multiple of 7" in f.error for f in run.failures)
    tasks = run.tasks
    assert (tasks.state == "failed").sum() == 100 and (tasks.state == "finished").sum() == 600


def test_a_failing_item_inside_a_chunk_fails_the_stage_and_names_it(local):
    sizes = chunk_sizes(local)
    items = [x for x in range(1, 1000) if x % 7] + [7 * 1000]  # the one failing item comes last
    with pytest.raises(fnb.StageError) as err:
        local.run(fan_out(st.fail_every_seventh, allow_partial_failure=False), input={"items": items})
    assert sizes
    assert err.value.stage == "each" and isinstance(err.value.__cause__, ValueError)
    assert err.value.run.state == "failed"
    assert local.run(fan_out(st.square), input={"items": [3]}).result == [9]  # still usable


@pytest.mark.parametrize(
    "stage_fn, message",
    [
        (st.lock_on_five, "can't be pickled back"),  # the worker can't send it: only that item fails
        (st.unloadable_on_five, "can't be loaded in the driver"),  # its chunk fails as a whole and
    ],
)  # is retried item by item
def test_a_result_that_cannot_come_back_fails_only_its_item(stage_fn, message):
    ex = make_executor("processes")
    try:
        sizes = chunk_sizes(ex)
        run = ex.run(fan_out(stage_fn), input={"items": list(range(500))})
        assert sizes and max(sizes) > 1
        assert run.result == [x for x in range(500) if x != 5]
        assert [f["item"] for f in run.failures] == [5]
        assert message in run.failures[0].error
    finally:
        ex.close()


def test_a_fan_out_waiting_for_its_first_timings_holds_up_no_other_stage():
    ray_ex = make_executor("ray")
    flow = Workflow(
        "side-by-side",
        stages=[
            Stage("slow", st.nap, type="parameterized", options={"map_on": "items"}),
            Stage("other", st.started_at, resources={"cpus": 0}),
        ],
    )
    run = ray_ex.run(flow, input={"items": list(range(40)), "delay": 1.0})
    tasks = run.tasks
    first_slow_end = tasks[tasks.stage == "slow"].end.min().timestamp()
    assert run.result[1] < first_slow_end  # 'other' ran before any 'slow' item had finished


def test_cancelling_a_chunked_run_stops_it(local):
    sizes = chunk_sizes(local)
    handle = local.submit(fan_out(st.nap), input={"items": list(range(20000)), "delay": 0.0005})
    for _ in range(200):  # until chunks are going out (process workers take a while to spawn)
        if sizes:
            break
        threading.Event().wait(0.05)
    assert sizes
    handle.cancel()
    run = handle.wait(timeout=30)
    assert run.state == "cancelled"
    tasks = run.tasks
    assert "cancelled" in set(tasks.state) and len(tasks) == 20000
    assert local.run(fan_out(st.square), input={"items": [4]}).result == [16]
