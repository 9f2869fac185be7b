"""Cancelling Ray runs: the driver never dies of it, running stages are interrupted, stuck ones
lose their worker process.

With ``ray.cancel``, Ray 2.60's driver aborted (``task_manager.cc: Tried to complete task that was
not pending``) when a cancel met a task whose reply had just arrived: cancelling busy chunked
runs ended the process within 9 to 38 cancels in four tries (this test with 30: 1 of 2), and took the suite with
it. Cancels now go through a flag the worker processes watch (``executors/task_cancel.py``).
Drivers that could die run in a subprocess with a timeout: a death or a hang fails one test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import make_executor, poll

import flowdapt_nb as fnb
from flowdapt_nb.executors.task_cancel import CancelWatch

TESTS = os.path.dirname(os.path.abspath(__file__))

_DRIVER = textwrap.dedent("""
    import sys, time
    import stages as st
    import flowdapt_nb as fnb

    flow = fnb.Workflow("busy", stages=[fnb.Stage("each", st.nap, type="parameterized", options={"map_on": "items"})])
    ex = fnb.RayExecutor(cpus=2, include_dashboard=False, logging_level="error").start()
    for i in range(int(sys.argv[1])):
        items, delay = [(20000, 0.0005), (300, 0.02), (2000, 0.002)][i % 3]
        handle = ex.submit(flow, input={"items": list(range(items)), "delay": delay})
        time.sleep(0.3 + (i % 5) * 0.15)  # cancel at different points of the run
        handle.cancel()
        run = handle.wait(timeout=60)
        print("CANCEL", i, run.state, flush=True)
    print("RESULT", ex.run(flow, input={"items": [1, 2, 3], "delay": 0}).result, flush=True)
    ex.close()
    print("ALIVE", flush=True)
""")


@pytest.mark.timeout(600)
def test_cancelling_busy_runs_many_times_leaves_the_driver_alive():
    env = dict(os.environ, PYTHONPATH=TESTS)  # Ray temp dir: the suite's (short socket paths)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, "50"], env=env, capture_output=True, text=True, timeout=420
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the driver hung: {exc.stdout}")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and "ALIVE" in lines, (proc.returncode, lines[-5:], proc.stderr[-3000:])
    assert [line.split()[2] for line in lines if line.startswith("CANCEL")] == ["cancelled"] * 50
    assert "RESULT [1, 2, 3]" in lines


def _loop_until_interrupted(marker):
    try:
        while True:
            time.sleep(0.01)
    finally:  # runs only when the stage is interrupted, not when its process is killed
        with open(marker, "w") as f:
            f.write(str(os.getpid()))


def test_a_running_stage_is_interrupted_and_its_cleanup_runs(tmp_path):
    ex = make_executor("ray")
    marker = tmp_path / "interrupted"
    flow = fnb.Workflow("loop", stages=[fnb.Stage("loop", _loop_until_interrupted)])
    handle = ex.submit(flow, input={"marker": str(marker)})
    poll(lambda: "running" in set(handle.run.tasks.state), what="the stage running")
    handle.cancel()
    assert handle.wait(timeout=60).state == "cancelled"
    poll(marker.exists, what="the stage's finally block (KeyboardInterrupt in the worker)")
    assert ex.run(fnb.Workflow("after", stages=[fnb.Stage("one", lambda: 1)])).result == 1


# --- the watch itself, without Ray -----------------------------------------------------------------


def _never_stuck(run, task):
    raise AssertionError(f"{task} of {run} reported stuck")


def test_the_watch_interrupts_only_the_task_of_a_flagged_run():
    flagged: set[str] = set()
    watch = CancelWatch(lambda run: run in flagged, _never_stuck, poll=0.01, grace=60)
    watch.enter("other", "t")  # a run nobody cancelled runs on
    time.sleep(0.1)
    watch.leave()
    flagged.add("doomed")
    watch.enter("doomed", "t")
    with pytest.raises(KeyboardInterrupt):
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # Python code: interrupted at its next line
                sum(range(100))
        finally:
            watch.leave()
    assert watch.cancelled("doomed") and not watch.cancelled("other")


def test_an_interrupt_sent_as_the_task_ends_never_reaches_later_code():
    """Tasks of a flagged run that end just as the watch interrupts them: the interrupt is either
    raised inside the task (caught there, as ray_tasks does) or withdrawn by ``leave``."""
    watch = CancelWatch(lambda run: True, _never_stuck, poll=0.001, grace=60)
    caught = 0
    for i in range(200):
        watch.enter(f"run-{i}", "t")
        try:
            try:
                end = time.monotonic() + 0.002 + (i % 10) * 0.003  # some outlast a GIL switch (5 ms)
                while time.monotonic() < end:
                    pass
            finally:
                watch.leave()
        except KeyboardInterrupt:
            watch.leave()
            caught += 1
        for _ in range(1000):  # would raise here if an interrupt leaked past leave()
            pass
    assert caught > 0  # some were interrupted inside, none leaked (we are still here)


_STUCK = textwrap.dedent("""
    import time
    from flowdapt_nb.executors.task_cancel import CancelWatch

    def report(run, task):
        print("REPORTED", run, task, flush=True)

    watch = CancelWatch(lambda run: True, report, poll=0.05, grace=0.5, last_resort=2.0)
    watch.enter("run", "stage[3]")
    for _ in range(3):
        try:
            print("STUCK", flush=True)
            time.sleep(60)  # in C: an interrupt waits for it to return
            print("SLEPT", flush=True)
        except KeyboardInterrupt:  # it came before the sleep: a stage that swallows it is no better
            print("SWALLOWED", flush=True)
""")


def test_a_task_stuck_outside_python_is_reported_then_ends_its_process():
    """Reported after the grace (the driver then force-cancels it); should nobody do that, the
    process ends itself after ``last_resort`` s."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _STUCK], capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == -9 and "SLEPT" not in lines, (proc.returncode, lines)
    assert lines.count("REPORTED run stage[3]") == 1 and lines[-1] == "REPORTED run stage[3]", lines
    assert time.monotonic() - started < 50  # well before the sleep's end


def test_the_watch_reads_a_running_runs_flag_at_most_once_per_poll():
    reads: list[str] = []
    watch = CancelWatch(lambda run: reads.append(run) or False, _never_stuck, poll=0.2, grace=60)
    watch.enter("r", "t")
    stop = time.monotonic() + 1.0
    while time.monotonic() < stop:
        watch.leave()
        watch.enter("r", "t")  # thousands of tiny tasks of one run
    watch.leave()
    assert 2 <= len(reads) <= 8, len(reads)
