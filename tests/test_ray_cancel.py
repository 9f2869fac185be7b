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

import psutil
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


def _sleep_in_c(marker):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(600)  # an interrupt waits for C code to return


def test_a_stage_stuck_in_c_is_force_cancelled_by_the_driver(tmp_path):
    """Its worker reports it stuck; the driver's force cancel ends that process in seconds (the
    worker's own last resort would take 30 s, and Ray would then run the stage again)."""
    ex = make_executor("ray")
    marker = tmp_path / "pids"
    handle = ex.submit(
        fnb.Workflow("stuck", stages=[fnb.Stage("stuck", _sleep_in_c)]), input={"marker": str(marker)}
    )
    poll(marker.exists, what="the stage running")
    pid = int(marker.read_text().split()[0])
    handle.cancel()
    assert handle.wait(timeout=60).state == "cancelled"
    poll(lambda: not psutil.pid_exists(pid), timeout=20, what=f"worker {pid} ended by the force cancel")
    time.sleep(2)
    assert marker.read_text().split() == [str(pid)]  # not run again


def _nap_and_count(x, marker):
    with open(marker, "a") as f:
        f.write(f"{x}\n")
    time.sleep(0.3)
    return x


def test_a_cancelled_runs_queued_tasks_never_call_the_stage(tmp_path):
    ex = make_executor("ray")
    marker = tmp_path / "calls"
    flow = fnb.Workflow(
        "queued", stages=[fnb.Stage("nap", _nap_and_count, type="parameterized", options={"map_on": "items"})]
    )
    handle = ex.submit(flow, input={"items": list(range(40)), "marker": str(marker)})
    poll(lambda: marker.exists() and len(marker.read_text().split()) >= 2, what="the first tasks running")
    handle.cancel()
    assert handle.wait(timeout=60).state == "cancelled"

    def calls_once_settled():
        before = len(marker.read_text().split())
        time.sleep(1.5)
        return before if len(marker.read_text().split()) == before else None

    settled = poll(calls_once_settled, timeout=30, what="no more calls")
    assert settled <= 8, settled  # those running, and a few starting before their worker saw the flag


# --- the watch itself, without Ray -----------------------------------------------------------------


def _never_stuck(run, task):
    raise AssertionError(f"{task} of {run} reported stuck")


def _never_asked(run, task):
    raise AssertionError(f"asked whether {task} of {run} is still stuck")


def test_the_watch_interrupts_only_the_task_of_a_flagged_run():
    flagged: set[str] = set()
    watch = CancelWatch(lambda run: run in flagged, _never_stuck, _never_asked, poll=0.01, grace=60)
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
    assert watch.interrupted_last()
    assert watch.cancelled("doomed") and not watch.cancelled("other")


def test_a_stages_own_keyboard_interrupt_is_not_taken_for_a_cancel():
    watch = CancelWatch(lambda run: False, _never_stuck, _never_asked, poll=0.01, grace=60)
    with pytest.raises(KeyboardInterrupt):
        try:
            watch.enter("run", "t")
            raise KeyboardInterrupt  # the stage's own
        finally:
            watch.leave()
    assert not watch.interrupted_last()


def test_an_interrupt_sent_as_the_task_ends_never_reaches_later_code():
    """Tasks of a flagged run that end just as the watch interrupts them: the interrupt is either
    raised inside the task (caught there, as ray_tasks does) or withdrawn by ``leave``."""
    watch = CancelWatch(lambda run: True, _never_stuck, _never_asked, poll=0.001, grace=60)
    caught = 0
    try:
        for i in range(200):
            try:
                try:
                    watch.enter(f"run-{i}", "t")
                    end = time.monotonic() + 0.002 + (i % 10) * 0.003  # some outlast a GIL switch (5 ms)
                    while time.monotonic() < end:
                        pass
                finally:
                    watch.leave()
            except KeyboardInterrupt:
                watch.leave()
                assert watch.interrupted_last()
                caught += 1
            for _ in range(1000):  # an interrupt that leaked past leave() would be raised here
                pass
    except KeyboardInterrupt:
        pytest.fail("an interrupt reached the code after a task")
    assert caught > 0


_STUCK = textwrap.dedent("""
    import sys, time
    from flowdapt_nb.executors.task_cancel import CancelWatch

    sleep, acked = float(sys.argv[1]), sys.argv[2] == "acked"
    t0 = time.monotonic()

    def say(what):
        print(f"{time.monotonic() - t0:.2f} {what}", flush=True)

    def still_stuck(run, task):
        return not acked  # acked: the driver has force-cancelled it (here nobody kills it)

    watch = CancelWatch(lambda run: True, lambda run, task: say(f"REPORTED {task}"), still_stuck,
                        poll=0.05, grace=0.5, last_resort=2.0)
    try:
        try:
            watch.enter("run", "stage[3]")
            end = time.monotonic() + sleep
            while time.monotonic() < end:
                try:
                    time.sleep(end - time.monotonic())  # in C: an interrupt waits for it to return
                except KeyboardInterrupt:  # it came before the sleep: a stage that swallows it
                    say("SWALLOWED")
            raise KeyboardInterrupt  # as if the interrupt came now, after the sleep
        finally:
            watch.leave()
    except KeyboardInterrupt:
        watch.leave()
    say("LEFT")
    time.sleep(3)  # the watch must not end the process now
    say("DONE")
""")


def _stuck(sleep: float, acked: bool) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", _STUCK, str(sleep), "acked" if acked else "never"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = {}
    for line in proc.stdout.splitlines():
        at, what = line.split(" ", 1)
        said.setdefault(what, []).append(float(at))
    return proc.returncode, said


def test_a_task_stuck_outside_python_is_reported_then_ends_its_process():
    """Reported after the grace (the driver then force-cancels it, which ends the process);
    should nobody do that, the process ends itself after ``last_resort`` s."""
    rc, said = _stuck(60, acked=False)
    assert rc == -9 and "LEFT" not in said, (rc, said)
    assert len(said["REPORTED stage[3]"]) == 1, said


@pytest.mark.parametrize("acked", [True, False], ids=["driver-answers", "driver-silent"])
def test_a_stuck_task_that_ends_after_its_report_waits_for_the_driver(acked):
    """A stage that returns after it was reported stuck holds its reply until the driver has
    force-cancelled it (the answer says so), or until the last resort's time has passed; either
    way its process lives on."""
    rc, said = _stuck(1.5, acked=acked)
    assert rc == 0 and "DONE" in said, (rc, said)
    (reported,) = said["REPORTED stage[3]"]
    (left,) = said["LEFT"]
    if acked:
        assert left < reported + 2.0, said
    else:
        assert left >= reported + 2.0, said  # waited out the last resort's time


def test_the_watch_reads_a_running_runs_flag_at_most_once_per_poll():
    reads: list[str] = []
    watch = CancelWatch(
        lambda run: reads.append(run) or False, _never_stuck, _never_asked, poll=0.2, max_poll=0.2, grace=60
    )
    watch.enter("r", "t")
    stop = time.monotonic() + 1.0
    while time.monotonic() < stop:
        watch.leave()
        watch.enter("r", "t")  # thousands of tiny tasks of one run
    watch.leave()
    assert 2 <= len(reads) <= 8, len(reads)


def test_watch_run_says_whether_the_call_was_cancelled():
    flagged: set[str] = set()
    watch = CancelWatch(lambda run: run in flagged, _never_stuck, _never_asked, poll=0.01, grace=60)
    assert watch.run("fine", "t", lambda: 42) == (False, 42)

    def own_interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        watch.run("fine", "t", own_interrupt)
    flagged.add("doomed")

    def spin():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sum(range(100))
        return "never interrupted"

    assert watch.run("doomed", "t", spin) == (True, None)
