"""Clusters on 127.0.0.1 for tests, started with the engines' own command lines (`ray start`,
`dask scheduler`, `dask worker`): every node is its own process tree, its output in a log file
in the cluster's temp dir, and every process is stopped by PID (SIGTERM, wait, SIGKILL what is
left). One place for the suite's cluster start-up: multi-node clusters, attach tests and the TLS
cluster all build on `NodeProcesses`."""

from __future__ import annotations

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


def kill_all(procs: list) -> None:
    """SIGKILL these processes (psutil.Process), skipping any already gone, and wait for them."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


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
    kill_all(family)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def kill_tree(proc: subprocess.Popen) -> None:
    """A node lost for real: SIGKILL the node's process and all its descendants at once."""
    kill_all(psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)])
    proc.wait(10)


def wait_for_workers(ex, n: int, timeout: float = 120, logs=lambda: "") -> None:
    """Until an attached executor sees ``n`` workers (or Ray nodes); ``logs()`` goes into the error."""
    deadline = time.time() + timeout
    while len(ex.info()["workers"]) < n:
        if time.time() > deadline:
            raise TimeoutError(f"{n} workers not within {timeout} s: {logs()}")
        time.sleep(0.5)


class NodeProcesses:
    """The processes of one cluster we started: each node's output in ``<dir>/<name>.log``;
    ``stop()`` ends them by PID, last started first (workers before their scheduler or head),
    and removes the dir. A context manager: ``with SomeNodes(...) as nodes:``."""

    prefix = "fnbnodes"

    def __init__(self):
        # Ray's socket paths must stay under 107 bytes: a short dir directly under /tmp.
        self.dir = Path(tempfile.mkdtemp(prefix=self.prefix, dir="/tmp"))
        self.procs: dict[str, subprocess.Popen] = {}

    def _popen(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(self.dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {}))
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int | None = 3000) -> str:
        try:
            text = (self.dir / f"{name}.log").read_text(errors="replace")
            return text[-tail:] if tail else text
        except OSError:
            return ""

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            stop_tree(self.procs[name])
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class RayNodes(NodeProcesses):
    """A Ray head plus worker nodes, each started with ``ray start --block`` (so each node is one
    process tree whose root we own). ``workers`` maps a name to extra ``ray start`` arguments;
    ``head_args`` go to the head's."""

    prefix = "fnbmn"

    def __init__(self, workers: dict[str, list[str]], head_cpus: int = 1, head_args: list[str] | None = None):
        super().__init__()
        self.port = free_port()
        self.head_cpus = head_cpus
        self.head_args = head_args or []
        self.worker_args = workers
        self.address = f"127.0.0.1:{self.port}"
        self.raylet_ports: dict[str, int] = {}

    def _ray_start(self, name: str, args: list[str]) -> subprocess.Popen:
        env = {"RAY_TMPDIR": str(self.dir)}
        if os.path.exists(os.path.expanduser("~/.ray/auth_token")):
            env["RAY_AUTH_MODE"] = os.environ.get(
                "RAY_AUTH_MODE", "token"
            )  # a node joining by address needs it
        return self._popen(
            name,
            [
                str(BIN / "ray"),
                "start",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--disable-usage-stats",
                *args,
            ],
            env,
        )

    def _start(self) -> None:
        # One node at a time, each up before the next starts: on a loaded machine nodes that
        # start together starve the GCS and time out (Ray waits a fixed 30 s for a raylet).
        self._start_node(
            "head",
            [
                "--head",
                "--port",
                str(self.port),
                "--num-cpus",
                str(self.head_cpus),
                "--include-dashboard",
                "false",
                "--temp-dir",
                str(self.dir),
                *self.head_args,
            ],
        )
        for name, args in self.worker_args.items():
            self._start_node(name, ["--address", self.address, "--num-cpus", "1", *args])

    def _start_node(self, name: str, args: list[str], timeout: float = 90, tries: int = 3) -> None:
        """Until ``ray start`` says the node runs (it then blocks). A node that timed out during
        start-up (Ray waits a fixed 30 s for its raylet to register, too short on a loaded
        machine) is started again, up to ``tries`` times in all."""
        # Each node's raylet on a port we chose: how ray.nodes() tells our nodes apart when they
        # all share 127.0.0.1 (see node_ids).
        self.raylet_ports[name] = free_port()
        args = [*args, "--node-manager-port", str(self.raylet_ports[name])]
        for _ in range(tries):
            self._ray_start(name, args)
            deadline = time.time() + timeout
            while "Ray runtime started" not in self.log(name, tail=None):
                if self.procs[name].poll() is not None or time.time() > deadline:
                    break
                time.sleep(0.5)
            else:
                return
            failure = self.log(name)
            stop_tree(self.procs[name])
            self._kill_strays()
        raise RuntimeError(f"Ray node {name} did not start in {tries} tries; the last said:\n{failure}")

    def _kill_strays(self) -> None:
        """Ray processes of ours that outlived their ``ray start`` (one that raised during start-up
        leaves its GCS and raylet behind, no longer its children): every one has our temp dir
        on its command line, and no one else's does."""
        mine = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.dir) in arg for arg in p.info["cmdline"] or []):
                    mine.append(p)
            except psutil.Error:
                pass
        kill_all(mine)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            stop_tree(self.procs[name])
        self._kill_strays()
        shutil.rmtree(self.dir, ignore_errors=True)

    def node_ids(self) -> dict[str, str]:
        """Our node names -> Ray node ids, from the GCS of the cluster this process is connected to."""
        import ray

        by_port = {port: name for name, port in self.raylet_ports.items()}
        return {
            by_port[n["NodeManagerPort"]]: n["NodeID"]
            for n in ray.nodes()
            if n.get("Alive") and n.get("NodeManagerPort") in by_port
        }


class DaskNodes(NodeProcesses):
    """A Dask scheduler plus worker processes (``dask worker``, one per name, with the given
    ``--resources`` string), all on 127.0.0.1. ``scheduler_args`` / ``extra`` (worker arguments)
    and ``protocol`` let a subclass start a TLS cluster the same way."""

    prefix = "fnbdmn"

    def __init__(
        self,
        workers: dict[str, str],
        memory_limit: str = "600MB",
        extra: list[str] | None = None,
        scheduler_env: dict[str, str] | None = None,
        scheduler_args: list[str] | None = None,
        protocol: str = "tcp",
    ):
        super().__init__()
        self.port, self.dash = free_port(), free_port()
        self.address = f"{protocol}://127.0.0.1:{self.port}"
        self.protocol = protocol
        self.worker_resources = workers
        self.memory_limit = memory_limit
        self.extra = extra or []
        self.scheduler_env = scheduler_env or {}
        self.scheduler_args = scheduler_args or []
        self.worker_ports: dict[str, int] = {}

    def _start(self) -> None:
        self._popen(
            "scheduler",
            [
                str(BIN / "dask"),
                "scheduler",
                "--protocol",
                self.protocol,
                *self.scheduler_args,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dashboard-address",
                f"127.0.0.1:{self.dash}",
            ],
            self.scheduler_env,
        )
        wait_port(self.port)
        for name, resources in self.worker_resources.items():
            port = self.worker_ports[name] = free_port()
            self._popen(
                name,
                [
                    str(BIN / "dask"),
                    "worker",
                    self.address,
                    "--host",
                    "127.0.0.1",
                    "--worker-port",
                    str(port),
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--memory-limit",
                    self.memory_limit,
                    "--name",
                    name,
                    "--local-directory",
                    str(self.dir / name),
                    *(["--resources", resources] if resources else []),
                    *self.extra,
                ],
            )

        # Every worker registered before anyone attaches: a scheduler with a short
        # no-workers-timeout would otherwise fail the attaching client's first tasks.
        for name in self.worker_resources:
            self.wait_registered(name)

    def wait_registered(self, name: str, timeout: float = 120) -> None:
        """Until worker ``name`` says it registered with the scheduler."""
        deadline = time.time() + timeout
        while "Registered to" not in self.log(name, tail=None):
            if self.procs[name].poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"Dask worker {name} did not register within {timeout} s:\n{self.log(name)}"
                )
            time.sleep(0.3)

    def worker_address(self, name: str) -> str:
        return f"{self.protocol}://127.0.0.1:{self.worker_ports[name]}"

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{self.log(name)}" for name in self.procs)
