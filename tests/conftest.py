"""Shared fixtures: one Dask and one Ray cluster per test session, on 127.0.0.1, and the
same behaviour tests parametrized over four executors (threads, processes, Dask, Ray)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import pytest
from browser_support import chromium, lab  # noqa: F401  (the browser tests' JupyterLab and chromium fixtures)

# A shell that starts jobs in the background (``cmd &`` without job control) hands them SIGINT
# ignored, and Python then ignores Ctrl-C too: the interrupt tests need it handled.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent

# Worker processes (spawned pools, Dask nannies, Ray workers) import stage functions from tests/.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# Ray gets its own temp dir so it never meets another Ray on this machine.
_RAY_TMP = tempfile.mkdtemp(prefix="fnb-ray-")
os.environ.setdefault("RAY_TMPDIR", _RAY_TMP)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Artifacts the suite writes go to a temp folder, never the user's data dir.
_ARTIFACTS_TMP = tempfile.mkdtemp(prefix="fnb-artifacts-")
os.environ.setdefault("FLOWDAPT_NB_ARTIFACTS", _ARTIFACTS_TMP)
# So do the runs the suite records (the run store), and every process a test starts inherits it.
# The nbval-run notebooks/ inherit both too: the whole suite collects tests/ (this file) first.
# (No conftest.py at the root or in notebooks/: Ray and pool workers and pytest itself import
# this file as plain `conftest`, and another one would shadow it.)
_RUNS_TMP = tempfile.mkdtemp(prefix="fnb-runs-")
os.environ.setdefault("FLOWDAPT_NB_RUNS", os.path.join(_RUNS_TMP, "runs.sqlite"))

EXECUTOR_KINDS = ["threads", "processes", "dask", "ray"]


def _holds(value) -> bool:
    """Truthiness that also takes tables: a DataFrame (whose truth is ambiguous) holds when it
    has rows, like any other sized value."""
    if value is None or value is False:
        return False
    return len(value) > 0 if hasattr(value, "__len__") else bool(value)


def poll(predicate, timeout: float = 60.0, interval: float = 0.05, *, before=None, what: str | None = None):
    """Call ``predicate`` until it returns something truthy (a table: with rows) or ``timeout``
    seconds pass; its last value. The one polling helper of the suite (``from conftest import
    poll``): a test waits on real processes and threads this way, never with a fixed sleep.

    ``before``: called before each check (e.g. ``executor.events.flush`` to deliver throttled
    event batches now). ``what``: say what was awaited, and raise ``AssertionError`` with it
    when the time is up instead of returning the falsy value."""
    deadline = time.monotonic() + timeout
    while True:
        if before is not None:
            before()
        value = predicate()
        if _holds(value):
            return value
        if time.monotonic() > deadline:
            if what is not None:
                raise AssertionError(f"{what} (waited {timeout:g} s)")
            return value
        time.sleep(interval)


OUTPUT_DIR = ROOT / "test-output"


class SharedCluster:
    """A session-wide executor that a test may close (e.g. to attach elsewhere); the next user
    gets it started again."""

    def __init__(self, factory):
        self.factory = factory
        self.executor = None

    def get(self):
        if self.executor is None or not self.executor.running:
            self.executor = self.factory()
            self.executor.start()
        return self.executor

    def close(self):
        if self.executor is not None:
            self.executor.close()
            self.executor = None


def _dask():
    import flowdapt_nb as fnb

    return fnb.DaskExecutor(
        cpus=2, threads=1, resources={"hamster_wheels": 2}, env_vars={"FNB_TEST_ENV": "dask"}
    )


def _ray():
    import flowdapt_nb as fnb

    return fnb.RayExecutor(
        cpus=2,
        resources={"hamster_wheels": 2},
        env_vars={"FNB_TEST_ENV": "ray"},
        logging_level="error",
        include_dashboard=True,
    )


_shared = {"dask": SharedCluster(_dask), "ray": SharedCluster(_ray)}


@pytest.fixture(scope="session")
def dask_cluster():
    return _shared["dask"]


@pytest.fixture(scope="session")
def ray_cluster():
    return _shared["ray"]


@pytest.fixture
def dask_executor(dask_cluster):
    ex = dask_cluster.get()
    yield ex
    _settle(ex)


@pytest.fixture
def ray_executor(ray_cluster):
    return ray_cluster.get()


def make_executor(kind: str):
    """A started executor of ``kind``; local ones are fresh, Dask/Ray are the session's."""
    import flowdapt_nb as fnb

    if kind == "threads":
        return fnb.LocalExecutor(use_processes=False, cpus=2).start()
    if kind == "processes":
        return fnb.LocalExecutor(use_processes=True, cpus=2).start()
    return _shared[kind].get().make_current()


@pytest.fixture(params=EXECUTOR_KINDS)
def executor(request):
    """Each behaviour test runs on all four executors."""
    ex = make_executor(request.param)
    yield ex
    if request.param in ("threads", "processes"):
        ex.close()
    _settle(ex)


def _settle(ex):
    """A Dask worker restarting to free a timed-out task's thread comes back before the next
    test starts (it would count as a new process there, or as a missing worker)."""
    wait = getattr(ex, "_wait_for_restarts", None)
    if wait is not None and ex.running:
        wait()


@pytest.fixture(scope="session")
def output_dir():
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


def pytest_sessionfinish(session, exitstatus):
    for shared in _shared.values():
        try:
            shared.close()
        except Exception as exc:  # pragma: no cover
            warnings.warn(f"closing a shared cluster failed: {exc}", stacklevel=1)
    import shutil

    for folder in (_ARTIFACTS_TMP, _RAY_TMP, _RUNS_TMP):
        shutil.rmtree(folder, ignore_errors=True)
    # Nothing we started may outlive the suite: Ray, Dask, Jupyter or pool processes.
    leftovers = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue  # multiprocessing's own helper: it ends with this interpreter

            child.wait(timeout=10)
        except psutil.TimeoutExpired:
            leftovers.append(child)
        except psutil.Error:
            pass
    if leftovers:
        names = ", ".join(f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in leftovers if p.is_running())
        session.config._fnb_leftovers = names
        for p in leftovers:
            try:
                p.kill()
            except psutil.Error:
                pass
        if names:
            print(f"\nERROR: processes left behind by the test suite: {names}", file=sys.stderr)
            session.exitstatus = 1
