"""A script that forgets close(): at exit, executors it started stop their clusters and
processes and clean up after themselves; an executor attached to someone else's cluster leaves
that cluster running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import psutil

SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import flowdapt_nb as fnb

    wf = fnb.Workflow("w", stages=[fnb.Stage("one", lambda: 1)])
    executors = [fnb.LocalExecutor(use_processes=True, cpus=2),
                 fnb.DaskExecutor(cpus=1, threads=1, dashboard_port=0)]
    if len(sys.argv) > 1:  # attach to the test's cluster as well
        executors.append(fnb.DaskExecutor(cluster_address=sys.argv[1]))
    for ex in executors:
        ex.start()
        assert ex.run(wf).result == 1
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"pids": pids, "ship_dir": executors[0]._backend._ship_dir}), flush=True)
    # A daemon thread still holds the executors (a watcher, a background job), so they are never
    # garbage-collected and their __del__ never runs; and no close(): the interpreter exits with
    # them running. Only the exit hook closes them.
    threading.Thread(target=lambda held=executors: time.sleep(3600), daemon=True).start()
""")


def _same_package_env() -> dict:
    """The script imports the flowdapt_nb this test runs (its cluster's worker, in this
    process, unpickles what the script sends)."""
    import flowdapt_nb

    root = os.path.dirname(os.path.dirname(os.path.abspath(flowdapt_nb.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        time.sleep(0.1)
    return alive


def _kill(pids: list[int]) -> None:
    for pid in pids:  # only what the script started: a failed test leaves nothing behind
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def test_exit_without_close_stops_owned_and_leaves_attached(tmp_path):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address=None,
    )  # in this process: the script only attaches to it
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, cluster.scheduler_address],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            env=_same_package_env(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        pids = report["pids"]
        # the local pool's workers, its memory manager, the LocalCluster's nanny and worker
        assert len(pids) >= 4, pids
        alive = _wait_gone(pids, 30)
        _kill(alive)
        assert alive == [], f"left running after the script exited: {alive}"
        # closed, not just killed: the local backend removed the folder it ships functions through
        left = os.path.exists(report["ship_dir"])
        shutil.rmtree(report["ship_dir"], ignore_errors=True)
        assert not left, "the local executor was not closed at exit (its temp folder is still there)"
        # the attached cluster was only disconnected: it still has its worker and computes
        assert len(cluster.scheduler.workers) == 1
        with Client(cluster.scheduler_address, timeout=30) as client:
            assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
    finally:
        cluster.close()


def test_exit_hook_closes_what_is_running():
    """The hook itself, in this process: it closes a running executor (its worker processes and
    memory manager end) and leaves a closed one as it is."""
    import flowdapt_nb as fnb
    from flowdapt_nb.executors.base import _close_at_exit

    running = fnb.LocalExecutor(use_processes=True, cpus=1).start()
    closed = fnb.LocalExecutor(use_processes=False, cpus=1).start()
    closed.close()
    pids = [*running._backend.pool.pids(), running._manager._process.pid]
    _close_at_exit([running, closed])  # not every live one: the session's shared clusters stay
    assert not running.running and not closed.running
    alive = _wait_gone(pids, 30)
    _kill(alive)
    assert alive == []
