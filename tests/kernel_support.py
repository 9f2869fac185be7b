"""Test helpers that start real processes: an IPython kernel (jupyter_client) in its own Jupyter
and IPython dirs, and the ``flowdapt-nb`` command line as a subprocess. Each is bounded in time,
so a hang fails one test, and stopped by the test that started it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path


def _cli() -> list[str]:
    """The installed ``flowdapt-nb`` script, or the module where it isn't installed."""
    script = Path(sys.executable).with_name("flowdapt-nb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flowdapt_nb.cli"]


CLI = _cli()


def cli(*args, cwd, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``flowdapt-nb ARGS`` in ``cwd`` and wait for it (``timeout`` seconds at most);
    ``env`` adds to this process's environment."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_cli(*args, cwd, env: dict | None = None) -> subprocess.Popen:
    """Start ``flowdapt-nb ARGS`` in ``cwd`` with stdout and stderr piped (text); the caller
    ends it (kill + wait in a ``finally``)."""
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@contextlib.contextmanager
def kernel(tmp_path: Path, ready_timeout: float = 60):
    """A started python3 kernel whose Jupyter and IPython dirs are under ``tmp_path`` (its cwd);
    yields its client, ready. Channels stopped and the kernel shut down at the end."""
    with kernel_manager(tmp_path, ready_timeout) as (_, kc):
        yield kc


@contextlib.contextmanager
def kernel_manager(tmp_path: Path, ready_timeout: float = 60):
    """As ``kernel``, yielding ``(manager, client)``: the manager interrupts the kernel and
    knows its process (``manager.provisioner.process.pid``)."""
    from jupyter_client import KernelManager

    env = dict(
        os.environ,
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=ready_timeout)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
