"""What a Ray executor that starts its own node exposes: every socket its processes listen on is
bound to loopback (none reachable through the machine's other addresses), and the auth token
file is readable by its owner only.

Runs in a subprocess with its own HOME (so the token file is the test's own) and a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.timeout(600)

_PROBE = textwrap.dedent('''
    import json, os, socket, stat, sys, time
    import psutil
    import flowdapt_nb as fnb

    LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")

    def ray_processes():
        """This driver and every process under it that belongs to Ray."""
        me = psutil.Process()
        out = [me]
        for p in me.children(recursive=True):
            try:
                if "ray" in " ".join(p.cmdline()).lower():
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def listeners():
        pids = {p.pid: p for p in ray_processes()}
        rows = []
        for c in psutil.net_connections("inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids:
                try:
                    name = pids[c.pid].name()
                except psutil.Error:
                    name = "?"
                rows.append([c.laddr.ip, c.laddr.port, name])
        return sorted(rows)

    def outside_addresses():
        """This machine's addresses other than loopback (IPv4)."""
        return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                       if a.family == socket.AF_INET and not a.address.startswith("127.")})

    def reachable_from_outside(port):
        for ip in outside_addresses():
            try:
                socket.create_connection((ip, port), 1).close()
                return ip
            except OSError:
                pass
        return None

    token = os.path.join(os.environ["HOME"], ".ray", "auth_token")
    report = {}
    wf = fnb.Workflow("q", stages=[fnb.Stage("q", "builtins.list")])
    for round_ in ("fresh", "loose"):
        if round_ == "loose":  # a token file an older Ray wrote readable by everyone
            os.chmod(token, 0o644)
        with fnb.RayExecutor(cpus=1, include_dashboard=True, logging_level="error") as ex:
            ex.run(wf)
            time.sleep(2)  # agents open their ports after start-up
            rows = listeners()
            report[round_] = {
                "token_mode": oct(stat.S_IMODE(os.stat(token).st_mode)) if os.path.exists(token) else None,
                "listeners": rows,
                "not_loopback": [r for r in rows if r[0] not in LOOPBACK],
                "reachable": [[r[1], reachable_from_outside(r[1])] for r in rows
                              if reachable_from_outside(r[1])],
                "address": ex.info()["address"], "dashboard": ex.info()["dashboard_url"],
                "outside": outside_addresses(),
            }
    print("REPORT " + json.dumps(report), flush=True)
''')


def test_owned_ray_listens_on_loopback_only_and_keeps_its_token_private():
    home = tempfile.mkdtemp(prefix="fnb-home-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = home
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=480, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, proc.stdout + proc.stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    for round_, seen in report.items():
        names = {name for _, _, name in seen["listeners"]}
        # the node's services were found (the check would pass vacuously otherwise)
        assert {"gcs_server", "raylet"} <= names, (round_, seen)
        assert seen["not_loopback"] == [], (round_, seen)
        assert seen["reachable"] == [], (round_, seen)
        assert seen["address"].startswith("127.0.0.1:"), seen
        assert seen["dashboard"].startswith("http://127.0.0.1:"), seen
        # the token file: written 0600 by us when new, tightened to 0600 when found looser
        assert seen["token_mode"] == "0o600", (round_, seen)
