"""Local executor faults, for real: stuck stages under timeouts and closes, worker processes that
die mid fan-out, close() from another thread, fan-outs where every item fails, and the history's
byte budget. Anything that could hang runs in a subprocess or under a join/wait bound."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fault_stages as fs
import psutil
import pytest
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow
from flowdapt_nb.sizes import estimate_bytes

TESTS_DIR = Path(__file__).resolve().parent
KINDS = ["threads", "processes"]
MAP = {"map_on": "xs"}


def local(kind, cpus=2, **fields):
    return fnb.LocalExecutor(use_processes=(kind == "processes"), cpus=cpus, **fields).start()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pids_in(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in folder.glob("*.pid")]


def script(code: str, *args) -> list[str]:
    """The command line of a driver script run in its own process (tests/ importable)."""
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


SCRIPT_ENV = dict(os.environ, PYTHONPATH=str(TESTS_DIR))


# --- point 2: a timeout or cancel gives the slot back ---------------------------------------------


@pytest.mark.parametrize("limit", ["run", "stage"])
def test_processes_timeout_kills_the_stuck_worker_and_frees_its_slot(limit, tmp_path):
    ex = local("processes", cpus=1)
    try:
        assert ex.run(Workflow("q", stages=[Stage("quick", fs.quick)])).result == [0, 1, 2]  # worker warm
        options = {**MAP, "timeout": 3} if limit == "stage" else MAP
        wf = Workflow(
            "stuck", stages=[Stage("stuck", fs.record_pid_then_sleep, type="parameterized", options=options)]
        )
        with pytest.raises(fnb.RunTimeoutError, match="timed out after 3"):
            ex.run(wf, input={"xs": [0], "folder": str(tmp_path)}, timeout=3 if limit == "run" else None)
        assert poll(lambda: pids_in(tmp_path), 30)
        victim = pids_in(tmp_path)[0]
        assert poll(lambda: not alive(victim), 10), "the timed-out task's process still runs"
        # the only slot is free again: a trivial run ends (it would wait 600 s behind the stuck task)
        handle = ex.submit(Workflow("q", stages=[Stage("quick", fs.quick)]))
        assert handle.wait(60).result == [0, 1, 2]
        assert victim not in ex._backend.pool.pids()
    finally:
        ex.close()


def test_processes_cancel_kills_the_running_task(tmp_path):
    ex = local("processes", cpus=1)
    try:
        wf = Workflow("stuck", stages=[Stage("stuck", fs.record_pid_then_sleep)])
        handle = ex.submit(wf, input={"folder": str(tmp_path)})
        assert poll(lambda: pids_in(tmp_path), 60)
        victim = pids_in(tmp_path)[0]
        handle.cancel()
        assert handle.wait(30).state == "cancelled"
        assert poll(lambda: not alive(victim), 10)
        assert ex.run(Workflow("q", stages=[Stage("quick", fs.quick)])).result == [0, 1, 2]
    finally:
        ex.close()


def test_threads_timeout_says_the_thread_runs_on_and_keeps_its_slot():
    release = threading.Event()

    def held(x=0):
        release.wait(120)
        return x

    ex = local("threads", cpus=2)
    try:
        wf = Workflow("held", stages=[Stage("held", held)])
        with pytest.raises(fnb.RunTimeoutError, match="can't be stopped") as err:
            ex.run(wf, timeout=1)
        assert "holds its slot" in str(err.value)
        # the stuck thread is not a free slot: new runs get one slot, resources show one free
        assert ex._backend.capacity == 1
        assert ex.resources().iloc[0]["cpus_available"] <= 1
        assert ex.run(Workflow("q", stages=[Stage("quick", fs.quick)])).result == [0, 1, 2]
        release.set()  # the stage returns: its slot comes back
        assert poll(lambda: ex._backend.capacity == 2, 30)
    finally:
        release.set()
        ex.close()


# --- point 3: close() returns whatever stages do; nothing outlives the driver -----------------------

CLOSE_STUCK = """
    import sys, threading, time
    import flowdapt_nb as fnb
    import fault_stages as fs
    ex = fnb.LocalExecutor(use_processes=(sys.argv[1] == "processes"), cpus=2).start()
    handles = [ex.submit(fnb.Workflow("stuck", stages=[fnb.Stage("s", fs.record_pid_then_sleep)]),
                         input={"x": i, "folder": sys.argv[2]}) for i in range(2)]
    import os
    while len(os.listdir(sys.argv[2])) < 2:
        time.sleep(0.05)
    ex.close()
    print("closed", [h.run.state for h in handles], [h.run.error for h in handles], flush=True)
"""


@pytest.mark.parametrize("kind", KINDS)
def test_close_returns_with_stuck_stages_and_the_script_exits(kind, tmp_path):
    # before: close() never returned (threads: the script could not even exit)
    out = subprocess.run(
        script(CLOSE_STUCK, kind, tmp_path), capture_output=True, text=True, timeout=90, env=SCRIPT_ENV
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "closed ['cancelled', 'cancelled']" in out.stdout
    assert "executor closed during the run" in out.stdout
    if kind == "processes":
        for pid in pids_in(tmp_path):
            assert poll(lambda pid=pid: not alive(pid), 10), f"worker {pid} outlived close()"


def test_processes_close_stops_workers_whose_stage_left_a_non_daemon_thread():
    ex = local("processes", cpus=2)
    pid = ex.run(Workflow("w", stages=[Stage("s", fs.start_endless_thread)])).result
    assert pid in ex._backend.pool.pids()
    closer = threading.Thread(target=ex.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() blocked on the worker's endless thread"
    assert poll(lambda pid=pid: not alive(pid), 10)


def test_processes_workers_exit_when_the_driver_is_killed(tmp_path):
    code = """
        import sys, time
        import flowdapt_nb as fnb
        import fault_stages as fs
        ex = fnb.LocalExecutor(use_processes=True, cpus=2).start()
        ex.submit(fnb.Workflow("stuck", stages=[fnb.Stage("s", fs.record_pid_then_sleep)]),
                  input={"folder": sys.argv[1]})
        print(" ".join(map(str, ex._backend.pool.pids())), flush=True)
        time.sleep(600)
    """
    driver = subprocess.Popen(script(code, tmp_path), stdout=subprocess.PIPE, text=True, env=SCRIPT_ENV)
    try:
        workers = [int(p) for p in driver.stdout.readline().split()]
        assert len(workers) == 2
        assert poll(lambda: pids_in(tmp_path), 60)
        # the workers, the cluster-memory manager, multiprocessing's resource tracker
        started = {p.pid for p in psutil.Process(driver.pid).children(recursive=True)}
        assert set(workers) <= started
    finally:
        driver.kill()
        driver.wait(30)
    for pid in started:
        assert poll(lambda pid=pid: not alive(pid), 15), f"process {pid} outlived its killed driver"


def test_close_does_not_wait_on_its_own_lock_for_each_active_run():
    ex = local("threads", cpus=2)
    wf = Workflow("naps", stages=[Stage("nap", fs.nap, type="parameterized", options=MAP)])
    handles = [ex.submit(wf, input={"xs": list(range(200))}) for _ in range(3)]
    assert poll(lambda: all(h.run.state == "running" for h in handles), 30)
    closer = threading.Thread(target=ex.close, daemon=True)
    closer.start()
    closer.join(20)  # before: 10 s per active run (30 s), waiting on a lock close() itself held
    assert not closer.is_alive()
    assert [h.run.state for h in handles] == ["cancelled"] * 3


def test_cli_exits_after_ctrl_c_leaving_no_worker(tmp_path):
    (tmp_path / "sleepers.py").write_text(
        "import os, time\n\ndef nap(folder):\n"
        "    open(os.path.join(folder, 'pid'), 'w').write(str(os.getpid()))\n"
        "    time.sleep(300)\n"
    )
    (tmp_path / "wf.yaml").write_text(
        "kind: workflow\nmetadata: {name: napper}\nspec:\n  stages:\n"
        "    - {name: nap, target: sleepers.nap}\n"
    )
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowdapt_nb.cli",
            "run",
            "wf.yaml",
            "--path",
            str(tmp_path),
            "--input",
            f"folder={tmp_path}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert poll(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), 90)
        tree = [p.pid for p in psutil.Process(cli.pid).children(recursive=True)]
        os.kill(cli.pid, signal.SIGINT)
        out, err = cli.communicate(timeout=60)  # before: still running 100 s after three SIGINTs
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, err[-2000:]
    assert "cancelled" in err
    left = [pid for pid in tree if poll(lambda pid=pid: not alive(pid), 10) is False]
    assert not left, f"processes outlived the CLI: {left}"


# --- point 5: one worker death fails only its item ----------------------------------------------------


@pytest.mark.parametrize("how", ["exit", "segv", "sigkill"])
def test_processes_worker_death_fails_only_its_item(how):
    ex = local("processes", cpus=2)
    try:
        wf = Workflow("w", stages=[Stage("work", fs.die_on, type="parameterized", options=MAP)])
        other = ex.submit(
            Workflow("other", stages=[Stage("nap", fs.nap, type="parameterized", options=MAP)]),
            input={"xs": list(range(10)), "delay": 0.1},
        )
        run = ex.submit(wf, input={"xs": list(range(20)), "how": how, "delay": 0.1}).wait(180)
        assert run.state == "finished"
        assert run.result == [x for x in range(20) if x != 5]
        assert [f.item for f in run.failures] == [5]
        assert "died" in run.failures[0].error and "twice" in run.failures[0].error  # retried once
        assert other.wait(120).result == list(range(10))  # the unrelated run lost nothing
        assert ex._backend.pool.replaced >= 2
        assert ex.run(Workflow("q", stages=[Stage("quick", fs.quick)])).result == [0, 1, 2]
    finally:
        ex.close()


def test_processes_worker_death_inside_a_chunk_fails_only_its_item():
    ex = local("processes", cpus=2)
    try:
        wf = Workflow("w", stages=[Stage("work", fs.die_on, type="parameterized", options=MAP)])
        # tiny items go out in chunks; the last one kills its worker, chunked with others
        run = ex.submit(wf, input={"xs": list(range(400)), "victim": 399, "delay": 0.0}).wait(180)
        assert run.result == list(range(399))
        assert [f.item for f in run.failures] == [399]
    finally:
        ex.close()


def test_processes_sigkill_from_outside_mid_fanout_loses_nothing(tmp_path):
    ex = local("processes", cpus=2)
    try:
        wf = Workflow("w", stages=[Stage("s", fs.record_pid_then_sleep, type="parameterized", options=MAP)])
        handle = ex.submit(wf, input={"xs": list(range(12)), "folder": str(tmp_path), "seconds": 0.3})
        assert poll(lambda: len(pids_in(tmp_path)) >= 3, 60)
        os.kill(pids_in(tmp_path)[-1], signal.SIGKILL)
        run = handle.wait(180)
        assert run.state == "finished" and run.result == list(range(12)) and not run.failures
    finally:
        ex.close()


# --- point 6: close() under a run says so; a closed executor refuses to run ---------------------------


@pytest.mark.parametrize("kind", [*KINDS, "dask"])
def test_close_from_another_thread_fails_the_run_clearly(kind):
    # a Dask cluster of its own (closing the session's shared one would only restart it)
    ex = fnb.DaskExecutor(cpus=1, threads=1).start() if kind == "dask" else local(kind)
    wf = Workflow("naps", stages=[Stage("nap", fs.nap, type="parameterized", options=MAP)])
    threading.Timer(1.0, ex.close).start()
    with pytest.raises(fnb.ExecutorClosedError, match="executor closed during the run") as err:
        ex.run(wf, input={"xs": list(range(100))})
    run = err.value.run
    assert run.state == "cancelled" and run.error == "executor closed during the run"
    assert poll(lambda: not ex.running, 30)
    with pytest.raises(fnb.ExecutorClosedError, match="start"):
        ex.run(wf, input={"xs": [1]})
    with pytest.raises(fnb.ExecutorClosedError):
        ex.submit(wf, input={"xs": [1]})
    assert not ex.running  # refused: nothing was started behind the user's back
    ex.start()
    try:
        assert ex.run(wf, input={"xs": [1, 2]}).result == [1, 2]
    finally:
        ex.close()


def test_a_user_cancel_is_still_not_an_error():
    ex = local("threads")
    try:
        handle = ex.submit(
            Workflow("naps", stages=[Stage("nap", fs.nap, type="parameterized", options=MAP)]),
            input={"xs": list(range(50))},
        )
        handle.cancel()
        run = handle.wait(30)
        assert run.state == "cancelled" and run.error == "cancelled by the user"
    finally:
        ex.close()


# --- point 7: a fan-out whose every item failed fails its stage ---------------------------------------


@pytest.mark.parametrize("kind", ["threads", "processes", "dask", "ray"])
def test_fanout_whose_every_item_failed_fails_the_stage(kind):
    from conftest import make_executor

    ex = make_executor(kind)  # the engine decides: every executor alike
    try:
        wf = Workflow(
            "bad",
            stages=[
                Stage("all_bad", fs.always_fails, type="parameterized", options=MAP),
                Stage("after", fs.quick, depends_on=["all_bad"]),
            ],
        )
        with pytest.raises(fnb.StageError, match="stage 'all_bad' failed") as err:
            ex.run(wf, input={"xs": [1, 2, 3]})
        text = str(err.value)
        assert "all 3 items failed" in text and "item 0: ValueError: item 1 is bad" in text
        assert err.value.run.state == "failed" and err.value.run.failed_stage == "all_bad"
        # some items surviving is still a partial failure
        ok = ex.run(
            Workflow("some", stages=[Stage("s", fs.die_on, type="parameterized", options=MAP)]),
            input={"xs": [1, 2], "victim": -1, "delay": 0},
        )
        assert ok.result == [1, 2]
    finally:
        if kind in KINDS:
            ex.close()


def test_cli_exits_1_when_every_item_failed(tmp_path):
    (tmp_path / "wf.yaml").write_text(
        "kind: workflow\nmetadata: {name: bad}\nspec:\n  stages:\n"
        "    - {name: all_bad, target: fault_stages.always_fails, type: parameterized, options: {map_on: xs}}\n"
    )
    (tmp_path / "threads.yaml").write_text("target: local\nuse_processes: false\ncpus: 2\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowdapt_nb.cli",
            "run",
            "wf.yaml",
            "--config",
            "threads.yaml",
            "--path",
            str(TESTS_DIR),
            "--input-json",
            '{"xs": [1, 2]}',
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "all_bad" in out.stderr and "all 2 items failed" in out.stderr


# --- point 8: the history is bounded by bytes ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_history_drops_old_results_past_its_byte_budget(kind):
    ex = local(kind, cpus=1, history_bytes="50MB")
    try:
        wf = Workflow("big", stages=[Stage("big", fs.sized)])
        runs = [ex.run(wf, input={"i": i, "megabytes": 20}) for i in range(5)]
        history = ex.history
        assert len(history) == 5 and [r.uid for r in history] == [r.uid for r in runs]
        assert [r.result_dropped for r in history] == [True, True, True, False, False]
        for record in history[:3]:
            assert record.result is None and "history_bytes" in record.result_note
            assert record.state == "finished" and record.started_at is not None
        assert all(len(r.result) == 20_000_000 for r in history[3:])
        assert all(len(r.result) == 20_000_000 for r in runs)  # the caller's own runs keep theirs
        # the newest result stays whatever its size
        huge = ex.run(wf, input={"megabytes": 60})
        assert ex.history[-1].result is huge.result and ex.history[-2].result_dropped
    finally:
        ex.close()


def test_result_sizes_are_estimated_without_copying():
    import numpy as np
    import pandas as pd

    assert estimate_bytes(np.zeros(1_000_000)) == 8_000_000
    frame = pd.DataFrame({"a": np.zeros(100_000), "b": np.ones(100_000)})
    assert estimate_bytes(frame) >= 1_600_000
    assert estimate_bytes(b"x" * 5_000_000) >= 5_000_000
    assert 9_000_000 <= estimate_bytes([bytes(100_000) for _ in range(100)] * 1) <= 11_000_000
    assert estimate_bytes({"k": np.zeros(10), "v": [1, 2, 3]}) > 0
    assert estimate_bytes(None) > 0


def test_processes_that_die_as_they_start_fail_tasks_instead_of_respawning_forever(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent("""
        if __name__ != "__main__":  # each worker re-imports this file as __mp_main__ and dies there
            import os
            os._exit(7)
        import operator
        from flowdapt_nb.executors.local_pool import ProcessPool
        pool = ProcessPool(2)
        try:
            print("ran:", pool.submit(operator.add, 1, 2).result(timeout=60))
        except Exception as exc:
            print("failed:", exc)
        try:
            pool.submit(operator.add, 1, 2)
        except RuntimeError as exc:
            print("refused:", exc)
        pool.close()
    """)
    )
    out = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=120)
    assert "failed: local worker processes exit as they start (exit code 7" in out.stdout, (
        out.stdout + out.stderr
    )
    assert "refused: local worker processes exit as they start" in out.stdout
