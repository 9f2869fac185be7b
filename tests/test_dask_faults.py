"""Dask under faults (issue 14 points 1, 2, 9): every way a future ends ends its task, a lost
scheduler fails the run, a timed-out or cancelled task gives its worker thread back, and what
stages print reaches the driver bounded.

Tests that kill or restart a Dask worker or scheduler use a cluster of their own (an executor
of their own, or ``dask scheduler``/``dask worker`` processes stopped by PID), never the
session's shared one: a shared cluster still settling after a lost worker slows later tests.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow
from flowdapt_nb.errors import ClusterLostError
from flowdapt_nb.output_capture import TASK_OUTPUT_LIMIT, RunOutputBudget, truncation_note

pytestmark = pytest.mark.timeout(300)


def numbers(n=3):
    return list(range(n))


QUICK = Workflow("quick", stages=[Stage("numbers", numbers)])


def bye():
    sys.exit(3)


def interrupt():
    raise KeyboardInterrupt("from a stage")


def pid():
    return os.getpid()


def stuck(seconds=60):
    time.sleep(seconds)
    return "woke"


def slow(x, delay=1.0):
    time.sleep(delay)
    return x


def chatty(lines=30_000, width=99):
    line = "y" * width
    for _ in range(lines):
        print(line)
    return "printed"


def chatty_item(x, lines=2_000):
    line = "z" * 99
    for _ in range(lines):
        print(line)
    return x


def close_bounded(ex, limit=60):
    closer = threading.Thread(target=ex.close, daemon=True)
    closer.start()
    closer.join(limit)
    assert not closer.is_alive(), f"close() still blocked after {limit} s"


@pytest.fixture
def own_dask():
    """A one-worker, one-thread Dask cluster for this test alone."""
    ex = fnb.DaskExecutor(cpus=1, threads=1).start()
    yield ex
    close_bounded(ex)


# --- point 1: every terminal future state ends its task -------------------------------------


@pytest.mark.parametrize(
    "stage_fn, text",
    [(bye, "SystemExit: 3"), (interrupt, "KeyboardInterrupt: from a stage")],
    ids=["sys.exit", "KeyboardInterrupt"],
)
@pytest.mark.parametrize("kind", ["dask", "threads", "processes"])
def test_a_stage_that_exits_or_interrupts_fails_with_a_stage_error(kind, stage_fn, text):
    ex = {
        "dask": lambda: fnb.DaskExecutor(cpus=1, threads=1),  # may lose its worker: its own
        "threads": lambda: fnb.LocalExecutor(use_processes=False, cpus=1),
        "processes": lambda: fnb.LocalExecutor(use_processes=True, cpus=1),
    }[kind]().start()
    try:
        before = ex.run(Workflow("pid", stages=[Stage("pid", pid)])).result
        handle = ex.submit(Workflow("w", stages=[Stage("bye", stage_fn)]))
        with pytest.raises(fnb.StageError) as err:
            handle.wait(90)  # a hang is a TimeoutError here, not a stalled suite
        assert err.value.stage == "bye" and text in str(err.value).splitlines()[0], str(err.value)
        assert handle.run.state == "failed"
        if kind == "dask":  # the worker survived the stage: same process, no restart
            assert ex.run(Workflow("pid", stages=[Stage("pid", pid)])).result == before
        assert ex.run(QUICK, input={"n": 2}).result == [0, 1]
    finally:
        close_bounded(ex)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc):
    """SIGTERM a `dask` process we started (it stops its own children), then SIGKILL what's left."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = [proc.pid]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    for p in family:
        try:
            psutil.Process(p).kill()
        except psutil.Error:
            pass
    proc.wait(10)


def _dask_process(*args, env=None):
    """A quiet ``dask scheduler`` / ``dask worker`` process of this environment."""
    command = [os.path.join(os.path.dirname(sys.executable), "dask"), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _scheduler(port, env=None):
    """A ``dask scheduler`` on 127.0.0.1:``port``, once it listens."""
    proc = _dask_process(
        "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0", env=env
    )
    try:
        poll(lambda: _listening(port), 60, what="the dask scheduler listening")
    except BaseException:
        _stop(proc)
        raise
    return proc


def _worker(port, threads=1):
    return _dask_process(
        "worker",
        f"tcp://127.0.0.1:{port}",
        "--nthreads",
        str(threads),
        "--host",
        "127.0.0.1",
        "--no-dashboard",
    )


def _listening(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_killed_scheduler_fails_the_run_with_a_lost_cluster_error():
    port = _free_port()
    sched = _scheduler(port)
    worker = _worker(port, threads=2)
    ex = None
    try:
        ex = fnb.DaskExecutor(cluster_address=f"tcp://127.0.0.1:{port}", connect_timeout=15).start()
        ex.client.wait_for_workers(1, timeout=60)
        wf = Workflow("w", stages=[Stage("slow", slow, type="parameterized", options={"map_on": "xs"})])
        handle = ex.submit(wf, input={"xs": list(range(40))})
        assert poll(lambda: (handle.run.tasks.state == "finished").any(), 60)
        os.kill(sched.pid, signal.SIGKILL)
        sched.wait(10)
        with pytest.raises(Exception) as err:
            handle.wait(90)
        assert not isinstance(err.value, TimeoutError), "the run still says running"
        lost = err.value if isinstance(err.value, ClusterLostError) else err.value.__cause__
        assert isinstance(lost, ClusterLostError), repr(err.value)
        assert f"lost the Dask scheduler at tcp://127.0.0.1:{port}" in str(err.value)
        assert handle.run.state == "failed"
        # a later run on the same executor ends too, in bounded time, with an error
        later = None
        try:
            later = ex.submit(QUICK, input={"n": 2})
        except Exception:
            pass  # refused at once: fine
        if later is not None:
            with pytest.raises(Exception) as err2:
                later.wait(120)
            assert not isinstance(err2.value, TimeoutError), "a run after the loss still says running"
            assert "lost the Dask scheduler" in str(err2.value), repr(err2.value)
        close_bounded(ex)
    finally:
        if ex is not None and ex.running:
            close_bounded(ex)
        _stop(worker)
        _stop(sched)


def test_attaching_before_any_worker_joined_waits_for_one():
    """The executor's cluster memory is an actor on a worker: a start that comes before the
    workers does not fail for want of one (here the scheduler gives up on a task after 1 s)."""
    port = _free_port()
    sched = _scheduler(port, env=dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT="1s"))
    worker = None
    ex = fnb.DaskExecutor(cluster_address=f"tcp://127.0.0.1:{port}", connect_timeout=60)
    try:
        ex.start(wait=False)
        poll(lambda: ex.client is not None, 60, what="the executor's client connected")
        worker = _worker(port)
        ex.wait_started(120)
        assert ex.run(QUICK, input={"n": 2}).result == [0, 1]
        ex.memory_store.put("default", "k", b"1", "bytes")
        assert ex.memory_store.get("default", "k") == b"1"
    finally:
        close_bounded(ex)
        for proc in (worker, sched):
            if proc is not None:
                _stop(proc)


# --- point 2: a timed-out or cancelled task gives its thread back -----------------------------


@pytest.mark.parametrize("how", ["run timeout", "stage timeout", "cancel"])
def test_a_timed_out_or_cancelled_task_frees_its_worker(own_dask, how):
    ex = own_dask
    if how == "stage timeout":
        wf = Workflow("stuck", stages=[Stage("stuck", stuck, options={"timeout": 2})])
    else:
        wf = Workflow("stuck", stages=[Stage("stuck", stuck)])
    handle = ex.submit(wf, input={"seconds": 120}, timeout=2 if how == "run timeout" else None)
    if how == "cancel":
        assert poll(lambda: (handle.run.tasks.state == "running").any(), 60)
        handle.cancel()
        handle._finished.wait(30)
        assert handle.run.state == "cancelled"
    else:
        with pytest.raises(fnb.RunTimeoutError):
            handle.wait(60)
    # the only worker thread was held by the stuck task: the next run goes only if it was freed
    quick = ex.submit(QUICK, input={"n": 3})
    assert quick.wait(90).result == [0, 1, 2]
    assert ex.restarts and any(t.startswith("stuck-") for t in ex.restarts[-1]["tasks"]), ex.restarts
    assert list(ex.restarts[-1]["workers"].values()) == ["OK"]


def pid_then_sleep(path="", seconds=8.0):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def test_a_task_moved_off_a_lost_worker_finds_the_runs_context_and_function(tmp_path):
    """The run's context and functions must outlive any one worker: Dask's memory manager keeps
    one copy where the task runs, and the task rerun on a survivor needs them again."""
    ex = fnb.DaskExecutor(cpus=2, threads=1).start()
    try:
        path = tmp_path / "pid"
        handle = ex.submit(
            Workflow("hold", stages=[Stage("hold", pid_then_sleep)]),
            input={"path": str(path), "seconds": 8.0},
        )
        assert poll(lambda: path.exists() and path.read_text(), 60)
        victim = int(path.read_text())
        engine = ex._active[handle.run.uid][1]
        client = ex.client
        by_pid = {pid: addr for addr, pid in client.run(os.getpid).items()}
        handles = [engine.ctx_handle, *engine.fn_handles]
        # until the memory manager dropped the survivor's copies (it runs every 2 s)
        poll(lambda: all(set(h) == {by_pid[victim]} for h in client.who_has(handles).values()), 10)
        os.kill(victim, signal.SIGKILL)
        run = handle.wait(120)
        assert run.state == "finished" and run.result != victim
    finally:
        close_bounded(ex)


def test_cluster_memory_survives_a_restart_as_a_new_empty_store(own_dask):
    """One worker: the cluster memory lived on the restarted worker. It works afterwards."""
    ex = own_dask
    ex.memory_store.put("default", "k", b"1", "bytes")
    with pytest.raises(fnb.RunTimeoutError):
        ex.run(Workflow("stuck", stages=[Stage("stuck", stuck)]), input={"seconds": 120}, timeout=2)
    assert ex.run(QUICK, input={"n": 1}).result == [0]
    ex.memory_store.put("default", "k2", b"2", "bytes")
    assert ex.memory_store.get("default", "k2") == b"2"


def memory_round_trip(value="v"):
    """A stage using cluster memory from its worker: put, then read back."""
    fnb.cluster_memory.put("from-stage", value)
    return fnb.cluster_memory.get("from-stage")


def test_cluster_memory_on_a_killed_worker_is_replaced_before_the_next_run(caplog):
    """The worker holding the cluster memory is SIGKILLed (its nanny starts a new one): the next
    run gets a new, empty store, with a warning, instead of waiting forever on the dead actor
    (a cached run's first artifact write waited on it until the test timed out)."""
    ex = fnb.DaskExecutor(cpus=2, threads=1).start()
    try:
        ex.memory_store.put("default", "k", b"1", "bytes")
        holder = ex._memory.actor._address
        victim = ex.client.run(os.getpid, workers=[holder])[holder]
        os.kill(victim, signal.SIGKILL)
        assert poll(lambda: holder not in ex.client.scheduler_info()["workers"], 60), "worker still listed"
        wf = Workflow("mem", stages=[Stage("mem", memory_round_trip)])
        with caplog.at_level("WARNING", logger="flowdapt_nb"):
            run = ex.submit(wf, input={"value": "after"}).wait(90)  # bounded: a hang fails here
        assert run.result == "after"
        assert f"the cluster memory was on departed Dask worker {holder}; it starts empty" in caplog.text
        assert ex._memory.actor._address != holder
        assert ex.memory_store.lookup("default", "k") is None  # a new store: what the old one held is gone
    finally:
        close_bounded(ex)


# --- point 9: what stages print is bounded ----------------------------------------------------


def _drain(capfd, until, timeout=60):
    """Driver output (printed from Dask's client thread) until ``until(text)`` holds."""
    seen = []

    def done():
        out, err = capfd.readouterr()
        seen.append(out + err)
        return until("".join(seen))

    assert poll(done, timeout), "".join(seen)[-2000:]
    time.sleep(0.5)
    out, err = capfd.readouterr()
    return "".join(seen) + out + err


def test_a_task_forwards_at_most_its_output_limit_and_says_how_much_it_dropped(dask_executor, capfd):
    lines, width = 30_000, 99
    capfd.readouterr()
    assert (
        dask_executor.run(
            Workflow("chatty", stages=[Stage("chatty", chatty)]), input={"lines": lines, "width": width}
        ).result
        == "printed"
    )
    dropped = lines * (width + 1) - TASK_OUTPUT_LIMIT
    note = truncation_note(dropped)
    text = _drain(capfd, lambda t: note in t)
    forwarded = [line for line in text.splitlines() if line.startswith("(chatty ")]
    body = sum(len(line.split(") ", 1)[1]) for line in forwarded if "yyy" in line)
    # the kept bytes are exactly the limit: whole lines plus the newlines between them
    newlines = sum(1 for line in forwarded if "yyy" in line)
    assert body + newlines == TASK_OUTPUT_LIMIT, (body, newlines)
    assert sum(1 for line in forwarded if note in line) == 1


def test_a_run_prints_at_most_its_output_budget(dask_executor, capfd, monkeypatch):
    monkeypatch.setattr(dask_executor, "_output_budget", RunOutputBudget(limit=500_000))
    capfd.readouterr()
    wf = Workflow(
        "chatty", stages=[Stage("chatty", chatty_item, type="parameterized", options={"map_on": "xs"})]
    )
    run = dask_executor.run(wf, input={"xs": list(range(6)), "lines": 2_000})  # 6 x 200 kB
    assert run.result == list(range(6))
    text = _drain(capfd, lambda t: "this run printed more than 500000 bytes" in t)
    printed = [line.split(") ", 1)[1] for line in text.splitlines() if "zzz" in line]
    assert sum(len(line) + 1 for line in printed) <= 500_000  # each line and its newline
    assert text.count("this run printed more than") == 1


def test_output_budget_forgets_old_runs():
    budget = RunOutputBudget(limit=10, runs=2)
    assert budget.admit("a", "x" * 8) == ("x" * 8, None)
    assert budget.admit("a", "x" * 8)[0] is None and "more than 10 bytes" in budget.admit("b", "y" * 11)[1]
    budget.admit("c", "z")
    assert list(budget.used) == ["b", "c"]


def test_capture_still_captures_after_someone_swapped_sys_stdout(monkeypatch):
    """pytest and kernels swap sys.stdout; a capture made after that must still see the prints
    (a process-wide 'installed' flag once left them going past the capture, to the new stdout)."""
    import io

    from flowdapt_nb.output_capture import capture

    got = []
    with capture(lambda stream, text: got.append(text)):
        print("before the swap")
    swapped_in = io.StringIO()
    monkeypatch.setattr(sys, "stdout", swapped_in)
    with capture(lambda stream, text: got.append(text)):
        print("after the swap")
    assert got == ["before the swap", "after the swap"]
    assert swapped_in.getvalue() == ""  # went to the capture, not past it


def test_capture_sends_whole_lines_in_order_up_to_its_limit_then_one_note():
    from flowdapt_nb.output_capture import capture

    got = []
    with capture(lambda stream, text: got.append((stream, text)), limit=50_000):
        for i in range(10_000):
            print(f"line {i:05d}")  # 11 bytes each: 110,000 in all
        print("no newline at the end", end="", file=sys.stderr)
    out = "\n".join(text for stream, text in got if stream == "stdout" and not text.startswith("[output"))
    lines = out.split("\n")
    assert lines == [f"line {i:05d}" for i in range(len(lines) - 1)] + [lines[-1]]
    assert len(out) == 50_000  # the kept bytes: the limit falls inside a line, which goes as far as it got
    assert ("stdout", truncation_note(110_000 - 50_000)) in got
    assert ("stderr", truncation_note(len("no newline at the end"))) in got  # the limit was spent
