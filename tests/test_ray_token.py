"""Attaching to a Ray cluster that uses token auth (a real ``ray start --head`` with
``RAY_AUTH_MODE=token``, started and stopped by PID): the right token attaches and runs; a wrong
or a missing token is one clear error at once that names the setting to fix, and leaves nothing
started. Each driver runs in a subprocess of its own: Ray's auth settings are per process."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap

import pytest
from clusters_multinode import RayNodes

pytestmark = pytest.mark.timeout(900)

_DRIVER = textwrap.dedent("""
    import json, os, sys
    import psutil
    import flowdapt_nb as fnb

    def inc(x):
        return x + 1

    out = {}
    ex = fnb.RayExecutor(cluster_address=sys.argv[1], logging_level="error", connect_timeout=300)
    try:
        ex.start()
        out["result"] = ex.run(fnb.Workflow("w", stages=[fnb.Stage("s", inc)]), input={"x": 1}).result
        ex.close()
    except Exception as exc:
        out["error"] = [type(exc).__name__, str(exc)]
    import ray
    out["ray_connected"] = ray.is_initialized()
    out["auth_mode"] = os.environ.get("RAY_AUTH_MODE")
    out["children"] = [" ".join(p.cmdline())[:200] for p in psutil.Process().children(recursive=True)]
    print("OUT " + json.dumps(out), flush=True)
""")


@pytest.fixture(scope="module")
def token_head():
    """A Ray head with token auth; yields (address, token)."""
    token = secrets.token_hex(16)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # for the head's processes only
    try:
        nodes = RayNodes({}, head_cpus=1)
        nodes.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield nodes.address, token
    nodes.stop()


def _attach(address: str, tmp_path, **env) -> dict:
    """Run the driver with a home of its own (no ~/.ray/auth_token) and ``env``; its report."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
    }
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, address],
        capture_output=True,
        text=True,
        timeout=600,
        env={**base, "HOME": str(home), **env},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OUT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][4:])


def test_right_token_from_a_file_attaches_and_runs(token_head, tmp_path):
    address, token = token_head
    path = tmp_path / "token"
    path.write_text(token)
    path.chmod(0o600)
    out = _attach(address, tmp_path, RAY_AUTH_TOKEN_PATH=str(path))
    assert out.get("error") is None, out
    assert out["result"] == 2


def test_wrong_token_is_one_clear_error_at_once(token_head, tmp_path):
    address, _ = token_head
    out = _attach(address, tmp_path, RAY_AUTH_TOKEN=secrets.token_hex(16))
    kind, message = out["error"]
    assert kind == "TokenRefusedError", out  # from the token check, not the connect_timeout retry loop
    assert (
        f"'{address}' refused this driver's auth token (from the RAY_AUTH_TOKEN environment variable)"
        in message
    )
    assert "RAY_AUTH_TOKEN_PATH" in message and "ray get-auth-token" in message
    # nothing half-started: not connected, no Ray process of ours, auth mode as it was
    assert not out["ray_connected"] and out["children"] == [] and out["auth_mode"] is None, out


def test_missing_token_is_one_clear_error_at_once(token_head, tmp_path):
    address, _ = token_head
    out = _attach(address, tmp_path)
    kind, message = out["error"]
    assert kind == "TokenRefusedError", out
    assert "requires an auth token" in message and "this driver has none" in message, message
    assert "set RAY_AUTH_TOKEN to the cluster's token" in message
    assert not out["ray_connected"] and out["children"] == [], out
