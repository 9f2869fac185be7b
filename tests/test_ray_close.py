"""Closing a Ray executor while other threads are in Ray calls (dashboards reading resources,
cluster memory calls, the event poller, cancel threads) leaves the process alive and able to
start Ray again.

Before the call gate (``flowdapt_nb.executors.call_gate``), such a call landing inside
``ray.shutdown()`` either ended the process (Ray's core worker, once shut down, exits the process
with status 1 and prints nothing: the suite vanished in the middle of a Ray test) or left Ray's
global state pointing at the old head, so that the next ``ray.init`` hung for ever (the driver
below hung in its second start, 2 of 2 tries). The driver runs in a subprocess with a timeout:
a death or a hang fails this test only."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from flowdapt_nb.executors.call_gate import CallGate, GateClosed

_DRIVER = textwrap.dedent("""
    import sys, threading, time
    import flowdapt_nb as fnb

    for cycle in range(int(sys.argv[1])):
        ex = fnb.RayExecutor(cpus=2, include_dashboard=False, logging_level="error").start()
        memory = ex._memory  # what notebook-level cluster_memory calls reach in the driver
        memory.put("ns", "k", b"1", "int")
        stop = threading.Event()
        calls = {"nodes": 0, "memory": 0}

        def read_nodes():  # what a resource dashboard's thread does
            while not stop.is_set():
                if ex._nodes():
                    calls["nodes"] += 1

        def read_memory():
            while not stop.is_set():
                try:
                    memory.get("ns", "k")
                    calls["memory"] += 1
                except Exception:  # closed: refused, as a user would be told
                    time.sleep(0.001)

        threads = [threading.Thread(target=f, daemon=True) for f in (read_nodes, read_nodes, read_memory, read_memory)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not (calls["nodes"] and calls["memory"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        ex.close()
        stop.set()
        for t in threads:
            t.join(10)
        print("CYCLE", cycle, calls["nodes"] > 0, calls["memory"] > 0, flush=True)
    print("ALIVE", flush=True)
""")


def test_closing_while_threads_call_ray_keeps_the_process_and_the_next_start(tmp_path):
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        out, err = driver.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # hung: end it and every process it started, by PID
        procs = psutil.Process(driver.pid).children(recursive=True)
        for proc in [*procs, driver]:
            try:
                proc.kill()
            except (psutil.Error, ProcessLookupError):
                pass
        psutil.wait_procs(procs, timeout=30)
        out, err = driver.communicate(timeout=30)
        pytest.fail(f"the driver hung (a Ray start after a close?): {out}\n{err[-3000:]}")
    assert driver.returncode == 0, f"the driver died (status {driver.returncode}): {out}\n{err[-3000:]}"
    assert out.split() == ["CYCLE", "0", "True", "True", "CYCLE", "1", "True", "True", "ALIVE"], err[-3000:]


def test_call_gate_waits_for_calls_inside_and_refuses_new_ones():
    gate = CallGate()
    inside, leave = threading.Event(), threading.Event()

    def call():
        with gate:
            inside.set()
            leave.wait(30)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    assert inside.wait(30)
    assert gate.close(timeout=0.1) is False  # a call is still inside: closing says so
    with pytest.raises(GateClosed, match="closing"), gate:
        pass
    threading.Timer(0.2, leave.set).start()
    t0 = time.monotonic()
    assert gate.close(timeout=30) is True  # returns once the call left
    assert time.monotonic() - t0 < 25  # a bound for a hang, not a timing assertion
    worker.join(5)
    assert not worker.is_alive()
