"""Ray under real faults: a head that dies under an attached driver, a run that times out on a
stuck task, a result that can't be serialized, helper actors that die.

The head-kill test starts its own ``ray start --head`` (own ports, own short temp dir) and runs
the driver in a subprocess with a timeout: a driver that Ray ends, or that hangs, fails the test
and nothing else. Everything else uses executors this test process owns."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb.errors import StageError, UnserializableResultError

pytestmark = pytest.mark.timeout(600)

BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Head:
    """A Ray head of our own on 127.0.0.1, stopped by its process group (never `ray stop`)."""

    def __init__(self, cpus: int = 2):
        self.port = _free_port()
        self.tmp = tempfile.mkdtemp(prefix="fnbh", dir="/tmp")  # Ray's socket paths must stay short
        self.proc = subprocess.Popen(
            [
                f"{BIN}/ray",
                "start",
                "--head",
                "--port",
                str(self.port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(cpus),
                "--include-dashboard",
                "false",
                "--temp-dir",
                self.tmp,
                "--block",
                "--disable-usage-stats",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_listening(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError as exc:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"our Ray head did not listen on {self.address}") from exc
                time.sleep(0.5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        shutil.rmtree(self.tmp, ignore_errors=True)


# The driver: attach, run once, start a slow fan-out, SIGKILL the head's GCS and raylet (by
# PID), then report how the run ended, whether close() returned, and that the process is still
# alive well past the 60 s after which Ray would have ended it.
_DRIVER = textwrap.dedent("""
    import sys, time, psutil
    import flowdapt_nb as fnb

    def sleep_then_return(x):
        time.sleep(x)
        return x

    address, head_pid = sys.argv[1], int(sys.argv[2])
    ex = fnb.RayExecutor(cluster_address=address, logging_level="error", connect_timeout=120,
                         connection_monitor_interval=0.5, ping_timeout=2, ping_failure_threshold=3).start()
    wf = fnb.Workflow("slow", stages=[fnb.Stage("slow", sleep_then_return, type="parameterized",
                                                options={"map_on": "xs"})])
    print("FIRST", ex.run(wf, input={"xs": [0, 0]}).result, flush=True)
    handle = ex.submit(wf, input={"xs": [30] * 6})
    while not any(t["state"] == "running" for t in handle.run.tasks.to_dict("records")):
        time.sleep(0.2)
    victims = [p for p in psutil.Process(head_pid).children(recursive=True)
               if any(n in " ".join(p.cmdline()) for n in ("gcs_server", "raylet"))]
    print("KILLING", sorted(p.name() for p in victims), time.strftime("%H:%M:%S"), flush=True)
    killed_at = time.monotonic()
    for p in victims:
        p.kill()
    try:
        handle.wait(240)
        print("ENDED", handle.run.state, flush=True)
    except TimeoutError:
        print("HUNG", handle.run.state, flush=True)
    except Exception as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        print("FAILED", type(exc).__name__, type(cause).__name__, str(exc).splitlines()[0], flush=True)
    print("STATE", handle.run.state, flush=True)
    ex.close()
    print("CLOSED", flush=True)
    try:
        ex.run(wf, input={"xs": [0]})
    except Exception as exc:
        print("LATER", type(exc).__name__, str(exc).splitlines()[0], flush=True)
    while time.monotonic() - killed_at < 70:  # Ray would end a driver it still holds at 60 s
        time.sleep(1)
    print("ALIVE", flush=True)
""")


def test_killed_head_fails_the_run_and_the_driver_lives_on():
    head = _Head()
    try:
        head.wait_listening()
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, head.address, str(head.proc.pid)],
            capture_output=True,
            text=True,
            timeout=480,
            env={**os.environ, "RAY_TMPDIR": head.tmp},
        )
    finally:
        head.stop()
    out = proc.stdout
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line}
    assert "FIRST [0, 0]" in out, out + proc.stderr[-3000:]
    assert "KILLING" in lines, out + proc.stderr[-3000:]
    # the run failed on a lost-cluster error naming the address (not "running" for ever)
    assert "FAILED" in lines, out + proc.stderr[-3000:]
    assert lines["FAILED"].startswith("FAILED ClusterLostError"), lines["FAILED"]
    assert f"lost the Ray cluster at {head.address}" in lines["FAILED"], lines["FAILED"]
    assert lines["STATE"] == "STATE failed", out
    assert "CLOSED" in lines, out
    # a later run says the cluster is lost (it does not start a new local Ray in this process)
    assert "LATER ClusterLostError" in lines.get("LATER", ""), out
    # the driver process outlived the moment Ray would have ended it, and exited normally
    assert "ALIVE" in lines and proc.returncode == 0, out + proc.stderr[-3000:]


# --- a timed-out task gives its CPU back --------------------------------------------------------


@pytest.fixture(scope="module")
def own_ray(ray_cluster):
    """A 1-CPU Ray this module owns (one Ray per process: the session's is closed first and comes
    back for the next test that asks for it)."""
    ray_cluster.close()
    ex = fnb.RayExecutor(cpus=1, include_dashboard=False, logging_level="error").start()
    yield ex
    ex.close()


def _slow(seconds=600):
    time.sleep(seconds)
    return seconds


def _quick(n=3):
    return list(range(n))


def test_timed_out_task_gives_its_cpu_back(own_ray):
    stuck = fnb.Workflow("stuck", stages=[fnb.Stage("stuck", _slow)])
    with pytest.raises(fnb.RunTimeoutError):
        own_ray.run(stuck, timeout=3)
    # the only CPU is free again: a trivial run goes, long before the stuck sleep would end
    handle = own_ray.submit(fnb.Workflow("quick", stages=[fnb.Stage("quick", _quick)]))
    assert handle.wait(120).result == [0, 1, 2]
    # the same through a stage's options.timeout
    stuck_stage = fnb.Workflow("stuck2", stages=[fnb.Stage("stuck", _slow, options={"timeout": 3})])
    with pytest.raises(fnb.RunTimeoutError):
        own_ray.run(stuck_stage)
    assert own_ray.submit(fnb.Workflow("quick", stages=[fnb.Stage("quick", _quick)])).wait(120).result == [
        0,
        1,
        2,
    ]


def test_cancelled_run_gives_its_cpu_back(own_ray):
    handle = own_ray.submit(fnb.Workflow("stuck", stages=[fnb.Stage("stuck", _slow)]))
    while not any(t["state"] == "running" for t in handle.run.tasks.to_dict("records")):
        time.sleep(0.1)
    handle.cancel()
    handle._finished.wait(60)
    assert handle.run.state == "cancelled"
    assert own_ray.submit(fnb.Workflow("quick", stages=[fnb.Stage("quick", _quick)])).wait(120).result == [
        0,
        1,
        2,
    ]


# --- a result that can't leave its worker ---------------------------------------------------------


def _make_lock():
    import threading

    return threading.Lock()


def _describe(x):
    return repr(x)


@pytest.mark.parametrize(
    "stages",
    [
        [fnb.Stage("make", _make_lock)],
        [fnb.Stage("make", _make_lock), fnb.Stage("use", _describe, depends_on=["make"])],
    ],
    ids=["terminal", "upstream"],
)
def test_unserializable_result_names_the_stage_that_returned_it(own_ray, stages):
    with pytest.raises(StageError) as info:
        own_ray.run(fnb.Workflow("unpicklable", stages=stages))
    assert info.value.stage == "make"
    assert isinstance(info.value.__cause__, UnserializableResultError)
    assert "lock" in str(info.value)


def _maybe_lock(x):
    import threading

    return threading.Lock() if x == 2 else x


def test_fan_out_item_with_unserializable_result_fails_alone(own_ray):
    wf = fnb.Workflow(
        "fan",
        stages=[
            fnb.Stage(
                "maybe",
                _maybe_lock,
                type="parameterized",
                options={"map_on": "xs", "allow_partial_failure": True},
            )
        ],
    )
    run = own_ray.run(wf, input={"xs": [0, 1, 2, 3]})
    assert run.result == [0, 1, 3]
    assert len(run.failures) == 1 and "can't be serialized" in run.failures[0].error


# --- helper actors that die ----------------------------------------------------------------------


def _remember():
    fnb.cluster_memory.put("k", 1)
    return fnb.cluster_memory.get("k")


def test_dead_helper_actors_are_replaced(own_ray):
    import ray

    numbers = fnb.Workflow("q", stages=[fnb.Stage("numbers", _quick)])
    assert own_ray.run(numbers).result == [0, 1, 2]
    own_ray.make_current()
    fnb.cluster_memory.put("before", 1)
    ray.kill(own_ray._memory.actor)

    def memory_error():
        try:
            fnb.cluster_memory.get("before")
        except RuntimeError as exc:
            return str(exc)
        return None

    # the driver's own calls say what happened (ray.kill is asynchronous: a call sent at once
    # may still reach the actor before it dies, so wait for the first one that fails)
    error = poll(memory_error, timeout=30, what="a call to the killed memory actor to fail")
    assert re.search("cluster memory actor .* died", error), error
    # the next run starts a new memory actor; stages use it
    assert own_ray.run(fnb.Workflow("m", stages=[fnb.Stage("remember", _remember)]), timeout=120).result == 1
    # the event sink dies: the next runs replace it and still report their tasks
    ray.kill(own_ray._sink)
    for _ in range(2):
        run = own_ray.run(numbers, timeout=120)
        assert run.result == [0, 1, 2]
        assert set(run.tasks["state"]) == {"finished"}
