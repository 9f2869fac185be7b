"""The terminal face of `flowdapt-nb run` (issue 20), driven as a subprocess: live progress on
stderr while the run goes, stdout only the result, --output formats, failures, exit codes, Ctrl-C,
and the bar redrawn in place in a pseudo-terminal."""

import fcntl
import json
import os
import pickle
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import psutil
import pytest
from kernel_support import CLI, start_cli
from kernel_support import cli as run_cli

WAIT = 120  # seconds any one subprocess may take before the test fails (never a speed assertion)

STAGES = """\
import os, time

def numbers(n=3):
    print("making", n, "numbers")
    return list(range(n))

def gated(x):
    # waits until the test creates the gate file named in $PROG_GATE (bounded), so the run is
    # surely still going while the test reads its progress
    gate = os.environ.get("PROG_GATE")
    deadline = time.monotonic() + 120
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("squaring", x)
    return x * x

def total(xs):
    return sum(xs)

def explode(xs):
    raise ValueError("the total exploded")

def no_threes(x):
    if x % 3 == 0:
        raise ValueError(f"no multiples of 3: {x}")
    return x

def frame(xs):
    import pandas as pd
    return pd.DataFrame({"x": list(range(len(xs))), "y": xs})
"""

WORKFLOW = """\
kind: workflow
metadata: {name: squares}
spec:
  stages:
    - {name: numbers, target: progstages.numbers}
    - {name: square, target: progstages.gated, type: parameterized, depends_on: [numbers]}
    - {name: total, target: progstages.%s, depends_on: [square]}
"""
PARTIAL = """\
kind: workflow
metadata: {name: partial}
spec:
  stages:
    - {name: numbers, target: progstages.numbers}
    - {name: keep, target: progstages.no_threes, type: parameterized, depends_on: [numbers]}
    - {name: total, target: progstages.total, depends_on: [keep]}
"""
ALL_FAIL = PARTIAL.replace("no_threes", "explode_item").replace("name: partial", "name: allfail")


@pytest.fixture
def project(tmp_path):
    (tmp_path / "progstages.py").write_text(
        STAGES + "\ndef explode_item(x):\n    raise KeyError(f'item {x}')\n"
    )
    (tmp_path / "wf.yaml").write_text(WORKFLOW % "total")
    (tmp_path / "bad.yaml").write_text(WORKFLOW % "explode")
    (tmp_path / "frame.yaml").write_text(WORKFLOW % "frame")
    (tmp_path / "partial.yaml").write_text(PARTIAL)
    (tmp_path / "allfail.yaml").write_text(ALL_FAIL)
    (tmp_path / "threads.yaml").write_text("target: local\nuse_processes: false\ncpus: 2\n")
    (tmp_path / "procs.yaml").write_text("target: local\nuse_processes: true\ncpus: 2\n")
    return tmp_path


def cli(*args, cwd, timeout=WAIT):
    return run_cli(*args, cwd=cwd, timeout=timeout)


def start(*args, cwd, gate):
    return start_cli(*args, cwd=cwd, env={"PROG_GATE": str(gate)})


def read_until(proc, pattern: str, lines: list, timeout=WAIT) -> str:
    """Read proc's stderr line by line until a line holds ``pattern``; that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if not ready:
            continue
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if pattern in line:
            return line
    proc.kill()
    raise AssertionError(f"no line with {pattern!r} on stderr:\n{''.join(lines)}")


# --- live progress on stderr, clean stdout ------------------------------------------------------


@pytest.mark.parametrize("config", ["threads.yaml", "procs.yaml"])
def test_plain_progress_shows_while_the_run_goes_and_stdout_is_only_the_result(project, config):
    gate = project / "gate"
    proc = start("run", "wf.yaml", "-c", config, "--progress", "plain", "-i", "n=4", cwd=project, gate=gate)
    lines: list = []
    try:
        header = read_until(proc, "flowdapt-nb: workflow 'squares' on the local executor", lines)
        line = read_until(proc, "square: running", lines)
        # the run is still going (it waits for the gate): this line came live, not at the end
        assert proc.poll() is None
        assert "/4 done" in line and "running" in line and "failed" in line and "elapsed" in line
        assert "ETA" in line
        if config == "threads.yaml":  # while nothing changes, a summary line comes every few seconds
            summary = read_until(proc, " running: numbers 1/1, square 0/4 (", lines)
            assert proc.poll() is None and "total 0/-" in summary
        gate.write_text("open")
        out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait()
    err = "".join(lines) + err
    assert proc.returncode == 0, err
    assert out == "14\n"  # the result and nothing else
    assert "no dashboard" in header
    assert "(numbers) making 4 numbers" in err  # a stage's print, prefixed with the stage
    assert "(square[3]) squaring 3" in err  # ... and the item
    assert "square: finished 4/4 done, 0 running, 0 failed" in err
    assert "total: finished 1/1 done" in err
    assert "finished in" in err.splitlines()[-1] and "6 done" in err.splitlines()[-1]


def test_progress_none_prints_only_stage_output(project):
    out = cli("run", "wf.yaml", "-c", "threads.yaml", "--progress", "none", "-i", "n=3", cwd=project)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "5\n"
    assert "running" not in out.stderr and "flowdapt-nb:" not in out.stderr
    assert "(square[2]) squaring 2" in out.stderr


def test_auto_progress_is_plain_when_stderr_is_not_a_terminal(project):
    out = cli("run", "wf.yaml", "-c", "threads.yaml", "-i", "n=2", cwd=project)
    assert out.returncode == 0, out.stderr
    assert "square: finished 2/2 done" in out.stderr and "\x1b[" not in out.stderr


# --- --output / --format --------------------------------------------------------------------------


def test_output_file_formats(project):
    out = cli("run", "wf.yaml", "-c", "threads.yaml", "-i", "n=4", "--output", "r.json", cwd=project)
    assert out.returncode == 0 and out.stdout == "", out.stderr
    assert json.loads((project / "r.json").read_text()) == 14
    out = cli("run", "wf.yaml", "-c", "threads.yaml", "-i", "n=4", "-o", "r.pkl", cwd=project)
    assert out.returncode == 0 and out.stdout == "", out.stderr
    assert pickle.loads((project / "r.pkl").read_bytes()) == 14
    out = cli("run", "frame.yaml", "-c", "threads.yaml", "-i", "n=3", "-o", "r.parquet", cwd=project)
    assert out.returncode == 0 and out.stdout == "", out.stderr
    import pandas as pd

    frame = pd.read_parquet(project / "r.parquet")
    assert frame["y"].tolist() == [0, 1, 4] and frame["x"].tolist() == [0, 1, 2]
    out = cli(
        "run",
        "frame.yaml",
        "-c",
        "threads.yaml",
        "-i",
        "n=3",
        "-o",
        "frame.out",
        "--format",
        "pickle",
        cwd=project,
    )
    assert out.returncode == 0, out.stderr
    assert pickle.loads((project / "frame.out").read_bytes())["y"].tolist() == [0, 1, 4]


def test_output_errors(project):
    out = cli("run", "wf.yaml", "-o", "r.txt", cwd=project)
    assert out.returncode == 2 and "can't tell the format from the suffix '.txt'" in out.stderr
    out = cli("run", "wf.yaml", "--format", "parquet", cwd=project)
    assert out.returncode == 2 and "--format parquet writes a file: give --output FILE" in out.stderr
    # known only once the run finished: the result is not a DataFrame
    out = cli("run", "wf.yaml", "-c", "threads.yaml", "-i", "n=2", "-o", "r.parquet", cwd=project)
    assert out.returncode == 1 and not (project / "r.parquet").exists()
    assert (
        "--format parquet needs a pandas DataFrame (or Series) result; this run's result is int" in out.stderr
    )


# --- failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["threads.yaml", "procs.yaml"])
def test_failed_stage_shows_the_users_frames_and_ours_with_verbose(project, config):
    out = cli("run", "bad.yaml", "-c", config, "-i", "n=3", cwd=project)
    assert out.returncode == 1 and out.stdout == ""
    err = out.stderr
    assert "error: run failed: stage 'total' failed: ValueError: the total exploded" in err
    assert 'progstages.py", line' in err and "in explode" in err
    assert 'raise ValueError("the total exploded")' in err
    shown = err.split("error: run failed")[1].split(
        "(flowdapt_nb's own frames are hidden; --verbose shows them)"
    )
    assert len(shown) == 2 and "flowdapt_nb/" not in shown[0]  # the traceback holds none of our frames
    assert "total: failed 0/1 done, 0 running, 1 failed" in err
    verbose = cli("run", "bad.yaml", "-c", config, "-i", "n=3", "--verbose", cwd=project)
    assert verbose.returncode == 1
    tail = verbose.stderr.split("error: run failed")[1]
    assert "flowdapt_nb/worker.py" in tail and 'progstages.py", line' in tail


def test_dropped_items_are_a_table(project):
    out = cli("run", "partial.yaml", "-c", "threads.yaml", "-i", "n=7", cwd=project)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "12\n"  # 1 + 2 + 4 + 5: items 0, 3 and 6 dropped
    err = out.stderr.splitlines()
    start = err.index("warning: 3 item(s) failed and were dropped (allow_partial_failure):")
    assert err[start + 1].split() == ["stage", "item", "error"]
    rows = [line.split(None, 2) for line in err[start + 2 : start + 5]]
    assert [(r[0], r[1]) for r in rows] == [("keep", "0"), ("keep", "3"), ("keep", "6")] or sorted(
        (r[0], r[1]) for r in rows
    ) == [("keep", "0"), ("keep", "3"), ("keep", "6")]
    assert all(r[2].startswith("ValueError: no multiples of 3") for r in rows)


def test_a_stage_whose_every_item_failed_lists_them(project):
    out = cli("run", "allfail.yaml", "-c", "threads.yaml", "-i", "n=3", cwd=project)
    assert out.returncode == 1 and out.stdout == ""
    assert "error: run failed: stage 'keep'" in out.stderr
    assert "3 task(s) failed:" in out.stderr
    for item in range(3):
        assert any(
            line.split()[:2] == ["keep", str(item)] and "KeyError" in line for line in out.stderr.splitlines()
        )


# --- exit codes ------------------------------------------------------------------------------------


def test_exit_1_when_the_timeout_passes(project):
    proc = start(
        "run",
        "wf.yaml",
        "-c",
        "procs.yaml",
        "--progress",
        "plain",
        "-i",
        "n=2",
        "--timeout",
        "3",
        cwd=project,
        gate=project / "never",
    )
    try:
        out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err
    assert out == "" and "error: run squares-" in err and "timed out after 3.0 s" in err


def test_exit_2_bad_usage_and_bad_files(project):
    (project / "typo.yaml").write_text("target: local\ncpu: 2\n")
    out = cli("run", "wf.yaml", "-c", "typo.yaml", cwd=project)
    assert out.returncode == 2 and "typo.yaml: line 2: unknown key 'cpu'" in out.stderr
    out = cli("run", "wf.yaml", "--progress", "fancy", cwd=project)
    assert out.returncode == 2 and "invalid choice: 'fancy'" in out.stderr
    # a root stage whose required argument the run input lacks: found once the executor is up
    (project / "needs.yaml").write_text(
        "kind: workflow\nmetadata: {name: needs}\nspec:\n  stages:\n"
        "    - {name: total, target: progstages.total}\n"
    )
    out = cli("run", "needs.yaml", "-c", "threads.yaml", cwd=project)
    assert out.returncode == 2 and "xs" in out.stderr and out.stdout == "", out.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_exit_3_when_the_cluster_cannot_be_reached(project, kind):
    port = _closed_port()
    address = f"tcp://127.0.0.1:{port}" if kind == "dask" else f"127.0.0.1:{port}"
    (project / "far.yaml").write_text(f"target: {kind}\ncluster_address: '{address}'\nconnect_timeout: 3\n")
    out = cli("run", "wf.yaml", "-c", "far.yaml", cwd=project)
    assert out.returncode == 3, out.stderr
    assert f"error: could not start the {kind} executor" in out.stderr and str(port) in out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr


def test_help_lists_the_exit_codes(project):
    out = cli("run", "--help", cwd=project)
    text = " ".join(out.stdout.split())
    for code, words in (
        ("0", "the run finished"),
        ("1", "a stage failed"),
        ("2", "bad usage"),
        ("3", "the executor could not be reached or started"),
        ("130", "interrupted"),
    ):
        assert f"{code} {words}" in text, out.stdout


def interrupt_when_running(proc, what: str):
    """Wait until ``proc`` (a ``run --progress plain`` started by ``start``) reports square's
    tasks running, note its child processes, press Ctrl-C (SIGINT) and wait for it to exit:
    (stdout, all of stderr, the children it had)."""
    lines: list = []
    try:
        read_until(proc, "square: running", lines)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, f"the {what} started no worker process"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait()
    return out, "".join(lines) + err, children


def test_ctrl_c_exits_130_after_cancelling_and_leaves_no_process(project):
    gate = project / "never"  # never created: the tasks wait until cancelled
    proc = start(
        "run", "wf.yaml", "-c", "procs.yaml", "--progress", "plain", "-i", "n=2", cwd=project, gate=gate
    )
    out, err, children = interrupt_when_running(proc, "local process executor")
    assert proc.returncode == 130, err
    assert out == ""
    assert "interrupted: cancelling the run and stopping the executor" in err
    assert "error: interrupted; the run was cancelled and the executor stopped" in err
    assert "cancelled" in err
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def test_ctrl_c_on_a_dask_cluster_it_started_stops_the_workers(project):
    (project / "dask.yaml").write_text("target: dask\ncpus: 2\nthreads: 1\n")
    proc = start(
        "run",
        "wf.yaml",
        "-c",
        "dask.yaml",
        "--progress",
        "plain",
        "-i",
        "n=2",
        cwd=project,
        gate=project / "never",
    )
    out, err, children = interrupt_when_running(proc, "Dask executor")
    assert proc.returncode == 130, err
    assert out == "" and "error: interrupted; the run was cancelled and the executor stopped" in err
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


# --- a terminal: the bar redrawn in place -------------------------------------------------------


def test_bar_redraws_in_place_in_a_pseudo_terminal(project):
    gate = project / "gate"
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "PROG_GATE": str(gate)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [*CLI, "run", "wf.yaml", "-c", "threads.yaml", "-i", "n=4"],
        cwd=project,
        stdin=child,
        stdout=subprocess.PIPE,
        stderr=child,
        env=env,
    )
    os.close(child)
    screen = b""
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:  # the bar shows, redrawn, while the tasks wait at the gate
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                screen += os.read(main, 65536)
            if screen.count(b"\x1b[1A") >= 5 and b"square" in screen:
                break
        assert proc.poll() is None
        gate.write_text("open")
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:  # the child side closed
                    break
                if not data:
                    break
                screen += data
            elif proc.poll() is not None:
                break
        out = proc.stdout.read()
        proc.wait(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait()
        os.close(main)
    text = screen.decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert out == b"14\n"  # stdout is a pipe: only the result, no escape codes
    assert "\x1b[1A" in text and "\x1b[2K" in text  # cursor up, erase line: redrawn in place
    assert "━" in text  # rich's bar
    assert "flowdapt-nb: workflow 'squares' on the local executor (threads, 2 CPUs)" in text
    final = text.rsplit("\x1b[2K", 1)[-1]
    plain = _strip_ansi(final)
    assert "square" in plain and "4/4" in plain and "finished" in plain
    assert "(square[3]) squaring 3" in _strip_ansi(text)  # stage output printed above the bar


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


# --- flowdapt-nb status ADDRESS -----------------------------------------------------------------


def test_status_lists_a_dask_clusters_workers_and_leaves_it_running(dask_executor, tmp_path):
    info = dask_executor.info()
    out = cli("status", info["address"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"dask cluster at {info['address']}" in out.stdout
    assert f"workers: {len(info['workers'])}" in out.stdout
    for worker in info["workers"]:
        assert worker["name"] in out.stdout
    assert "resources: cpus" in out.stdout
    assert dask_executor.info()["state"] == "running"  # only disconnected, never stopped
    assert len(dask_executor.info()["workers"]) == len(info["workers"])


def test_status_of_an_unreachable_cluster_exits_3(tmp_path):
    port = _closed_port()
    out = cli("status", f"tcp://127.0.0.1:{port}", "--timeout", "3", cwd=tmp_path)
    assert out.returncode == 3 and out.stdout == ""
    assert f"error: could not reach the dask cluster at tcp://127.0.0.1:{port}" in out.stderr


def test_status_of_a_silent_ray_address_gives_up_with_3(tmp_path):
    """Something listens but never answers as Ray: the command ends (3), it does not hang."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        out = cli("status", f"127.0.0.1:{port}", "--kind", "ray", "--timeout", "2", cwd=tmp_path, timeout=180)
    assert out.returncode == 3, out.stderr
    assert f"error: could not reach the ray cluster at 127.0.0.1:{port}" in out.stderr


DRAIN_SCRIPT = """
import sys, time
from flowdapt_nb.cli_streams import OutputPipe

got = []

def slow_emit(line):  # a reader slower than the writer: lines pile up in the pipe
    time.sleep(0.002)
    got.append(line)

with OutputPipe(slow_emit) as pipe:
    for i in range(300):
        print(f"line {i}")
    drained = pipe.drain(timeout=30)
    seen = len(got)
    pipe.stderr.write(f"drained={drained} seen={seen} last={got[-1] if got else None}\\n")
"""


def test_output_pipe_drain_hands_on_every_line_written_before_it():
    """The run's last printed lines reach the view before its final line: drain() returns only
    once the reader has handed on everything written to the pipe before it (in order)."""
    proc = subprocess.run([sys.executable, "-c", DRAIN_SCRIPT], capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    assert "drained=True seen=300 last=line 299" in proc.stderr, proc.stderr
