"""Faults: worker death, interrupts, timeouts, leaks, and the run history under all of them."""

import _thread
import os
import signal
import threading
import time

import psutil
import pytest
import stages as st
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow

SLOW_MAP = Workflow(
    "slowmap", stages=[Stage("slow", st.slow, type="parameterized", options={"map_on": "xs"})]
)
QUICK = Workflow("quick", stages=[Stage("numbers", st.numbers)])


@pytest.mark.parametrize("kind", ["processes", "dask", "ray"])
def test_worker_death_mid_run_ends_the_run_and_the_executor_recovers(kind, tmp_path):
    from conftest import make_executor

    ex = make_executor(kind)
    try:
        pid_file = tmp_path / "pid"
        handle = ex.submit(
            Workflow("victim", stages=[Stage("work", st.pid_then_sleep)]),
            input={"path": str(pid_file), "delay": 4.0},
        )
        assert poll(lambda: pid_file.exists() and pid_file.read_text().strip(), 60)
        victim = int(pid_file.read_text().split()[0])
        assert victim != os.getpid() and victim in {p.pid for p in psutil.Process().children(recursive=True)}
        os.kill(victim, signal.SIGKILL)
        started = time.time()
        try:
            run = handle.wait(90)
            assert run.state == "finished"  # the engine retried the task elsewhere
        except fnb.StageError as err:
            assert kind != "processes", f"local processes retry a task whose worker died: {err}"
            text = str(err).lower()
            assert "died" in text or "worker" in text or "killed" in text, str(err)
            assert handle.run.state == "failed" and handle.run in ex.history
        assert time.time() - started < 90
        assert ex.run(QUICK, input={"n": 3}).result == [0, 1, 2]
    finally:
        if kind == "processes":
            ex.close()


def test_keyboard_interrupt_cancels_the_run(executor):
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        executor.run(SLOW_MAP, input={"xs": list(range(6)), "delay": 2.0})
    timer.cancel()
    run = executor.history[-1]
    assert run.state == "cancelled" and run.finished_at is not None
    assert "cancelled" in set(run.tasks.state)
    assert executor.run(QUICK, input={"n": 2}).result == [0, 1]


def test_run_timeout_fails_the_run(executor):
    started = time.time()
    with pytest.raises(fnb.RunTimeoutError, match="timed out after 1"):
        executor.run(SLOW_MAP, input={"xs": [1, 2], "delay": 6.0}, timeout=1)
    assert time.time() - started < 6
    run = executor.history[-1]
    assert run.state == "failed" and "timed out" in run.error
    assert executor.run(QUICK, input={"n": 1}).result == [0]


def test_stage_timeout_option_names_the_stage(executor):
    stage = Stage("stuck", st.slow, type="parameterized", options={"map_on": "xs", "timeout": 1})
    with pytest.raises(fnb.RunTimeoutError, match="stage 'stuck' timed out") as err:
        executor.run(Workflow("t", stages=[stage]), input={"xs": [1], "delay": 6.0})
    assert err.value.stage == "stuck" and executor.history[-1].state == "failed"


def test_history_keeps_every_outcome():
    with fnb.LocalExecutor(use_processes=False, cpus=2) as ex:
        ex.run(QUICK, input={"n": 1})
        with pytest.raises(fnb.StageError):
            ex.run(
                Workflow(
                    "bad", stages=[Stage("numbers", st.numbers), Stage("b", st.boom, depends_on=["numbers"])]
                )
            )
        handle = ex.submit(SLOW_MAP, input={"xs": [1, 2, 3], "delay": 1})
        handle.cancel()
        handle.wait(10)
        states = [r.state for r in ex.history]
        assert states == ["finished", "failed", "cancelled"]
        for run in ex.history:
            assert run.started_at is not None and run.finished_at is not None
        assert "KeyError" in ex.history[1].error and ex.history[2].error


def _snapshot():
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())}
    threads = {t.ident for t in threading.enumerate()}
    listening = {
        c.laddr.port
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in children | {me.pid}
    }
    return children, threads, listening


@pytest.mark.parametrize("kind", ["threads", "processes", "dask", "ray"])
def test_start_and_close_five_times_leaves_nothing(kind, ray_cluster):
    if kind == "ray":
        ray_cluster.close()  # one Ray per process: the shared one restarts on next use
    factories = {
        "threads": lambda: fnb.LocalExecutor(use_processes=False, cpus=2),
        "processes": lambda: fnb.LocalExecutor(use_processes=True, cpus=2),
        "dask": lambda: fnb.DaskExecutor(cpus=1, threads=1),
        "ray": lambda: fnb.RayExecutor(cpus=1, include_dashboard=False, logging_level="error"),
    }

    def ours():
        return {t for t in threading.enumerate() if t.name.startswith("flowdapt-nb") and t.is_alive()}

    children0, threads0, ports0 = _snapshot()
    ours0 = ours()  # the session's shared clusters have their own
    for _ in range(5):
        with factories[kind]() as ex:
            assert ex.run(QUICK, input={"n": 2}).result == [0, 1]
    assert poll(lambda: not (_snapshot()[0] - children0), 30), _snapshot()[0] - children0
    assert poll(lambda: not (ours() - ours0), 10), [t.name for t in ours() - ours0]
    assert poll(lambda: not (_snapshot()[2] - ports0), 10), _snapshot()[2] - ports0


def test_dashboards_and_local_clusters_bind_loopback(dask_executor):
    info = dask_executor.info()
    assert info["address"].startswith("tcp://127.0.0.1:") and "127.0.0.1" in info["dashboard_url"]
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    for conn in psutil.net_connections("inet"):
        if (
            conn.pid in children
            and conn.status == psutil.CONN_LISTEN
            and conn.laddr.port in (int(info["address"].rsplit(":", 1)[1]),)
        ):
            assert conn.laddr.ip == "127.0.0.1"


def test_targets_are_never_evaluated():
    wf = Workflow("w", stages=[Stage("a", "os.system('echo pwned')")])
    with pytest.raises(fnb.ConfigError, match="stage 'a'"):
        wf.resolve(namespace={})
