"""Multi-node Ray and Dask clusters on 127.0.0.1 for tests: every node is its own set of
processes started with the engines' own command lines (`ray start`, `dask scheduler`,
`dask worker`), and every process is stopped by PID (SIGTERM, wait, SIGKILL what is left)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listened on {port} within {timeout} s")


def stop_tree(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM a process we started and wait; then SIGKILL it and any descendant still alive
    (descendants are listed first: once the parent is gone they can't be found by it)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    psutil.wait_procs(family, timeout=10)


def kill_tree(proc: subprocess.Popen) -> None:
    """A node lost for real: SIGKILL the node's process and all its descendants at once."""
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=10)
    proc.wait(10)


def ancestors(pid: int) -> set[int]:
    """PIDs of a process's parents, up to init."""
    out = set()
    try:
        p = psutil.Process(pid).parent()
        while p is not None:
            out.add(p.pid)
            p = p.parent()
    except psutil.Error:
        pass
    return out


class RayNodes:
    """A Ray head plus worker nodes, each started with ``ray start --block`` (so each node is one
    process tree whose root we own). ``workers`` maps a name to extra ``ray start`` arguments."""

    def __init__(self, workers: dict[str, list[str]], head_cpus: int = 1):
        self.port = free_port()
        # Socket paths must stay under 107 bytes: a short dir directly under /tmp.
        self.temp = tempfile.mkdtemp(prefix="fnbmn", dir="/tmp")
        self.head_cpus = head_cpus
        self.worker_args = workers
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, RAY_TMPDIR=self.temp)
        if os.path.exists(os.path.expanduser("~/.ray/auth_token")):
            env.setdefault("RAY_AUTH_MODE", "token")  # a node joining by address needs it (FACTS.md)
        log = open(Path(self.temp) / f"{name}.log", "wb")
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                                 "--disable-usage-stats", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.temp)
        log.close()
        self.procs[name] = proc
        return proc

    def start(self) -> "RayNodes":
        try:
            # One node at a time, each up before the next starts: on a loaded machine nodes that
            # start together starve the GCS and time out (Ray waits a fixed 30 s for a raylet).
            self._start_node("head", ["--head", "--port", str(self.port), "--num-cpus", str(self.head_cpus),
                                      "--include-dashboard", "false", "--temp-dir", self.temp])
            for name, args in self.worker_args.items():
                self._start_node(name, ["--address", self.address, "--num-cpus", "1", *args])
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, name: str, args: list[str], timeout: float = 150) -> None:
        """Until ``ray start`` says the node runs (it then blocks). A node that timed out during
        start-up (Ray's fixed 30 s, too short on a loaded machine) is started once more."""
        self._start(name, args)
        deadline = time.time() + timeout
        tries = 1
        while "Ray runtime started" not in self.log(name, tail=None):
            if self.procs[name].poll() is not None:
                if tries < 2:
                    tries += 1
                    stop_tree(self.procs[name])
                    self._start(name, args)
                    continue
                raise RuntimeError(f"Ray node {name} ended during start-up:\n{self.log(name)}")
            if time.time() > deadline:
                raise TimeoutError(f"Ray node {name} not started within {timeout} s:\n{self.log(name)}")
            time.sleep(0.5)

    def node_of_pid(self, pid: int) -> str | None:
        """Which of our nodes a process belongs to (Ray workers are children of their node's raylet)."""
        up = ancestors(pid)
        for name, proc in self.procs.items():
            if proc.pid in up:
                return name
        return None

    def log(self, name: str, tail: int | None = 3000) -> str:
        try:
            text = (Path(self.temp) / f"{name}.log").read_text(errors="replace")
            return text[-tail:] if tail else text
        except OSError:
            return ""

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "head"] + (["head"] if "head" in self.procs else []):
            stop_tree(self.procs[name])
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class DaskNodes:
    """A Dask scheduler plus worker processes (``dask worker``, one per name, with the given
    ``--resources`` string), all on 127.0.0.1."""

    def __init__(self, workers: dict[str, str], memory_limit: str = "600MB", extra: list[str] | None = None,
                 scheduler_env: dict[str, str] | None = None):
        self.port, self.dash = free_port(), free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="fnbdmn", dir="/tmp")
        self.worker_resources = workers
        self.memory_limit = memory_limit
        self.extra = extra or []
        self.scheduler_env = scheduler_env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.worker_ports: dict[str, int] = {}

    def _popen(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(Path(self.dir) / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **(env or {})))
        log.close()
        self.procs[name] = proc
        return proc

    def start(self) -> "DaskNodes":
        try:
            self._popen("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--dashboard-address", f"127.0.0.1:{self.dash}"],
                        self.scheduler_env)
            wait_port(self.port)
            for name, resources in self.worker_resources.items():
                port = self.worker_ports[name] = free_port()
                self._popen(name, [str(BIN / "dask"), "worker", self.address, "--host", "127.0.0.1",
                                   "--worker-port", str(port), "--nthreads", "1", "--nworkers", "1",
                                   "--memory-limit", self.memory_limit, "--name", name,
                                   "--local-directory", str(Path(self.dir) / name),
                                   *(["--resources", resources] if resources else []), *self.extra])
        except BaseException:
            self.stop()
            raise
        return self

    def worker_address(self, name: str) -> str:
        return f"tcp://127.0.0.1:{self.worker_ports[name]}"

    def log(self, name: str) -> str:
        try:
            return (Path(self.dir) / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "scheduler"] + (["scheduler"] if "scheduler" in self.procs else []):
            stop_tree(self.procs[name])
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def ray_resources_json(d: dict) -> str:
    return json.dumps(d)
