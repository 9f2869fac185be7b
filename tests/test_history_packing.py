"""ex.history packs the task rows of its older ended runs (``WorkflowRun._pack``): two byte strings
instead of a dict per task, which the garbage collector looked through on every full pass.
Reading a packed run's tasks gives back exactly what it had."""

from __future__ import annotations

import gc
import time

import pytest
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow
from flowdapt_nb.executors import base
from flowdapt_nb.run import PACK_OVER


def inc(x: int) -> int:
    return x + 1


def fails_on_seven(x: int) -> int:
    if x % 100 == 7:
        raise ValueError(f"item {x} is bad")
    return x


def each(fn, name="each", **options):
    return Workflow(
        name, stages=[Stage(name, fn, type="parameterized", options={"map_on": "items", **options})]
    )


@pytest.fixture
def packing_now(monkeypatch):
    monkeypatch.setattr(base, "PACK_AFTER", 0.0)  # pack as soon as a run isn't the newest


def snapshot(run):
    return run.tasks.copy(), run.stages.copy()


def test_older_runs_are_packed_and_read_back_the_same(packing_now):
    ex = fnb.LocalExecutor(cpus=2, runs="off").start()
    try:
        before = {}

        def run_and_look(wf, items):
            """A run, and its tables taken while it is the newest: from its own rows, unpacked."""
            run = ex.run(wf, input={"items": items})
            assert run._packed is None
            before[run.uid] = snapshot(run)
            return run

        big = run_and_look(each(inc), list(range(PACK_OVER + 44)))
        partial = run_and_look(each(fails_on_seven, "partial", allow_partial_failure=True), list(range(400)))
        small = run_and_look(each(inc, "small"), list(range(PACK_OVER - 1)))
        newest = ex.run(each(inc, "newest"), input={"items": list(range(PACK_OVER + 1))})
        assert poll(lambda: big._packed is not None and partial._packed is not None, timeout=10)
        assert big._task_rows == {} and not gc.is_tracked(big._packed[0])  # nothing left to look through
        assert small._packed is None, "a run under PACK_OVER rows stays as it is"
        assert newest._packed is None, "the newest run is never packed"
        for run in (big, partial, small):
            tasks, stages = before[run.uid]
            assert run.tasks.equals(tasks), run.name
            assert run.stages.equals(stages), run.name
        assert big._packed is None and len(big._task_rows) == PACK_OVER + 44  # unpacked when read
        assert (partial.tasks["state"] == "failed").sum() == 4
        assert "item 7 is bad" in partial.tasks.loc[partial.tasks["item"] == 7, "error"].iloc[0]
    finally:
        ex.close()


def test_a_run_ended_less_than_pack_after_ago_stays_unpacked(monkeypatch):
    monkeypatch.setattr(base, "PACK_AFTER", 3.0)  # room for a slow machine's tiny run
    ex = fnb.LocalExecutor(cpus=2, runs="off").start()
    try:
        first = ex.run(each(inc), input={"items": list(range(PACK_OVER))})
        ex.run(each(inc, "second"), input={"items": [1]})
        time.sleep(0.2)
        assert first._packed is None  # ended under PACK_AFTER ago: maybe still looked at
        time.sleep(base.PACK_AFTER)
        ex.run(each(inc, "third"), input={"items": [1]})
        assert poll(lambda: first._packed is not None, timeout=10)
    finally:
        ex.close()


def test_packing_takes_the_log_the_run_store_wrote(packing_now, tmp_path):
    ex = fnb.LocalExecutor(cpus=2, runs=str(tmp_path / "runs.sqlite")).start()
    try:
        run = ex.run(each(inc), input={"items": list(range(PACK_OVER + 10))})
        ex._run_store.flush()
        offer = run._log_offer
        assert offer is not None and offer[0] == PACK_OVER + 10
        ex.run(each(inc, "next"), input={"items": [1]})
        assert poll(lambda: run._packed is not None, timeout=10)
        assert run._packed[0] is offer[1] and run._packed[1] is offer[2]  # not encoded twice
        assert run._log_offer is None
        stored = fnb.load_run(run.uid, store=str(tmp_path / "runs.sqlite"))
        assert stored.tasks.equals(run.tasks)
    finally:
        ex.close()


def test_a_run_read_after_packing_is_packed_again_from_the_same_log(packing_now):
    """Reading a packed run unpacks it; the next pack takes the log it was read from instead
    of encoding its rows again (nothing changed in between)."""
    ex = fnb.LocalExecutor(cpus=2, runs="off").start()
    try:
        run = ex.run(each(inc), input={"items": list(range(PACK_OVER + 3))})
        ex.run(each(inc, "next"), input={"items": [1]})
        assert poll(lambda: run._packed is not None, timeout=10)
        log = run._packed
        table = run.tasks.copy()  # unpacks
        assert run._packed is None and run._log_offer is not None
        ex.run(each(inc, "third"), input={"items": [1]})
        assert poll(lambda: run._packed is not None, timeout=10)
        assert run._packed[0] is log[0] and run._packed[1] is log[1]
        assert run.tasks.equals(table)
    finally:
        ex.close()


def test_a_packed_run_takes_an_update_after_unpacking(packing_now):
    ex = fnb.LocalExecutor(cpus=2, runs="off").start()
    try:
        run = ex.run(each(inc), input={"items": list(range(PACK_OVER))})
        ex.run(each(inc, "next"), input={"items": [1]})
        assert poll(lambda: run._packed is not None, timeout=10)
        worker = run._task_worker("each", 3)  # a read through the engine's own path unpacks
        assert worker and run._packed is None
        assert run._log_offer is not None  # the log it was read from, offered again
        run._record("each", 3, None, time.time(), error="noted later")
        assert run._log_offer is None  # the update dropped it
        assert run.tasks.loc[run.tasks["item"] == 3, "error"].iloc[0] == "noted later"
        assert run._pack() and run.tasks.loc[run.tasks["item"] == 3, "error"].iloc[0] == "noted later"
    finally:
        ex.close()


def test_a_row_changed_after_the_store_wrote_its_log_is_packed_as_changed(packing_now, tmp_path):
    """A late worker report (a cancelled task's timings) lands after the store encoded the run:
    packing must not take the store's now stale log."""
    ex = fnb.LocalExecutor(cpus=2, runs=str(tmp_path / "runs.sqlite")).start()
    try:
        run = ex.run(each(inc), input={"items": list(range(PACK_OVER))})
        ex._run_store.flush()
        assert run._log_offer is not None
        late = time.time() + 100
        run._record("each", 5, None, late, worker="late-worker", start=late, end=late + 1)
        ex.run(each(inc, "next"), input={"items": [1]})
        assert poll(lambda: run._packed is not None, timeout=10)
        row = run.tasks.loc[run.tasks["item"] == 5].iloc[0]
        assert row["worker"] == "late-worker" and row["duration"] == 1.0
    finally:
        ex.close()
