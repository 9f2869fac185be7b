"""start(wait=False): returns at once, ``state`` shows the start, the first run waits for it, a
failed start is kept and raised by the next run, close() during a start is bounded and leaves
no process; and local process workers load a function once per version, not once per run."""

from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest
import stages as st
from conftest import poll
from kernel_support import kernel

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow
from flowdapt_nb.errors import ExecutorClosedError

QUICK = Workflow("quick", stages=[Stage("numbers", st.numbers)])


def _children():
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    }


def _dead_address() -> str:
    """An address on this machine where nothing listens (a port we bound and let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


FACTORIES = {
    "threads": lambda: fnb.LocalExecutor(use_processes=False, cpus=2),
    "processes": lambda: fnb.LocalExecutor(use_processes=True, cpus=2),
    "dask": lambda: fnb.DaskExecutor(cpus=1, threads=1),
    "ray": lambda: fnb.RayExecutor(cpus=1, include_dashboard=False, logging_level="error"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_start_without_waiting_then_run_waits(kind, ray_cluster):
    if kind == "ray":
        ray_cluster.close()  # one Ray per process: the shared one restarts on next use
    children0 = _children()
    ex = FACTORIES[kind]()
    assert ex.state == "stopped"
    seen = []
    try:
        returned = ex.start(wait=False)
        seen.append(ex.state)
        assert returned is ex
        if kind in ("dask", "ray"):  # a cluster takes far longer to start than a call to return
            assert not ex.running and seen[0].startswith("starting"), seen
        watcher = threading.Thread(
            target=lambda: poll(lambda: seen.append(ex.state) or ex.running, 240, interval=0.02)
        )
        watcher.start()
        run = ex.run(QUICK, input={"n": 3})  # waits for the start
        assert run.result == [0, 1, 2] and ex.state == "running"
        assert ex.start(wait=False) is ex and ex.running  # starting a running executor: a no-op
        watcher.join(240)
        assert seen[-1] == "running"
        assert all(s.startswith("starting") or s == "running" for s in seen), seen
        assert ex.info()["state"] == "running" and ex.start_error is None
    finally:
        ex.close()
    assert ex.state == "stopped"
    assert poll(lambda: not (_children() - children0), 60, interval=0.02), _children() - children0


@pytest.mark.timeout(180)
def test_start_failure_is_shown_and_raised_by_the_next_run():
    ex = fnb.DaskExecutor(cluster_address=_dead_address(), connect_timeout=1)
    ex.start(wait=False)
    assert poll(lambda: ex.state.startswith("failed"), 120, interval=0.02), ex.state
    error = ex.start_error
    assert error is not None and not ex.running
    assert ex.info()["state"] == ex.state and type(error).__name__ in ex.state
    with pytest.raises(type(error)) as raised:
        ex.run(QUICK, input={"n": 1})
    assert raised.value is error
    # the same failure, started the blocking way, raises at once from start()
    again = fnb.DaskExecutor(cluster_address=_dead_address(), connect_timeout=1)
    with pytest.raises(type(error)):
        again.start()
    assert again.state.startswith("failed") and not again.running


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["processes", "dask"])
def test_close_during_a_start_is_bounded_and_leaves_no_process(kind):
    children0 = _children()
    ex = FACTORIES[kind]()
    ex.start(wait=False)
    closer = threading.Thread(target=ex.close)
    closer.start()
    closer.join(120)  # a hang guard, not a timing: close() waits at most START_CLOSE_WAIT for the start
    assert not closer.is_alive(), "close() during a start did not return"
    assert poll(lambda: not ex.running and not ex.state.startswith("starting"), 120, interval=0.02), ex.state
    assert ex.state == "stopped" and not ex.running
    with pytest.raises(ExecutorClosedError):
        ex.run(QUICK, input={"n": 1})
    assert poll(lambda: not (_children() - children0), 60, interval=0.02), _children() - children0


def worker_loads():
    """Files the worker process has unpickled so far (functions and run contexts)."""
    from flowdapt_nb.executors import local

    return local._loads


def worker_loads_again():
    from flowdapt_nb.executors import local

    return local._loads


@pytest.mark.timeout(120)
def test_process_workers_load_a_function_once_per_version():
    wf = Workflow("loads", stages=[Stage("worker_loads", worker_loads)])
    other = Workflow("loads2", stages=[Stage("worker_loads_again", worker_loads_again)])
    with fnb.LocalExecutor(use_processes=True, cpus=1) as ex:  # one worker: every run sees its count
        counts = [ex.run(wf).result for _ in range(4)]
        # the first run loads the function and its context; later runs only their own context
        assert [b - a for a, b in zip(counts, counts[1:])] == [1, 1, 1], counts
        assert ex._backend.function_ships == 1
        after = ex.run(other).result  # a new function: loaded once more, with its context
        assert after - counts[-1] == 2
        assert ex._backend.function_ships == 2
        assert ex.run(wf).result - after == 1  # the first function is still loaded


@pytest.mark.timeout(300)
def test_kernel_executor_magic_no_wait_returns_then_the_card_replaces_the_start(tmp_path):
    """In a real kernel: ``%flowdapt executor dask --no-wait`` ends its cell while the start goes
    on (its output shows the start); the card replaces that output once the executor runs, and
    the next ``%flowdapt run`` works (it would wait for the start)."""
    import queue

    with kernel(tmp_path) as kc:
        setup = (
            "def numbers(n=4):\n    return list(range(n))\n"
            "get_ipython().run_line_magic('load_ext', 'flowdapt_nb')\n"
            "get_ipython().run_cell_magic('flowdapt', 'workflow nums', '- {name: numbers, target: numbers}')\n"
        )
        reply = kc.execute_interactive(setup, timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        msg_id = kc.execute(
            "%flowdapt executor dask --cpus 1 --no-wait\nprint('cell done:', flowdapt_executor.state)"
        )
        msgs, deadline, card_at, idle_at = [], time.monotonic() + 240, None, None
        while time.monotonic() < deadline and card_at is None:
            try:
                m = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            msgs.append(m)
            if (
                m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle"
                and m["parent_header"].get("msg_id") == msg_id
            ):
                idle_at = len(msgs) - 1
            if (
                m["msg_type"] == "update_display_data"
                and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
            ):
                card_at = len(msgs) - 1
        assert card_at is not None, [m["msg_type"] for m in msgs]
        displays = [
            m
            for m in msgs
            if m["msg_type"] == "display_data"
            and "Starting the Dask executor" in m["content"]["data"].get("text/plain", "")
        ]
        assert displays, "no start feedback"
        feedback_id = displays[0]["content"]["transient"]["display_id"]
        assert msgs[card_at]["content"]["transient"]["display_id"] == feedback_id
        printed = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
        assert "cell done: starting" in printed  # the cell ended before the executor was up
        assert idle_at is not None and idle_at < card_at  # ... and the card came after it
        out = []
        reply = kc.execute_interactive(
            "r = %flowdapt run nums --input n=3\nprint(r.result)", timeout=120, output_hook=out.append
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "[0, 1, 2]" in "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        reply = kc.execute_interactive("%flowdapt stop", timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
