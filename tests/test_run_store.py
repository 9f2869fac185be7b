"""The run store (issue 19, part 1): runs written as they go on every executor, read back in a
new process; two writers at once; a driver killed mid-run leaves a 'lost' record; the magics and
the CLI read runs of earlier processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import poll
from kernel_support import cli as run_cli

import flowdapt_nb as fnb
from flowdapt_nb.run_store import get_store
from flowdapt_nb.task_log import decode_task_log

TESTS_DIR = Path(__file__).resolve().parent

PARTIAL = {
    "name": "store_partial",
    "stages": [
        {"name": "numbers", "target": "stages.numbers"},
        {
            "name": "checked",
            "target": "stages.fail_on_three",
            "type": "parameterized",
            "depends_on": ["numbers"],
            "options": {"allow_partial_failure": True},
        },
        {"name": "total", "target": "stages.total", "depends_on": ["checked"]},
    ],
}
FAILING = {
    "name": "store_boom",
    "stages": [
        {"name": "numbers", "target": "stages.numbers"},
        {"name": "explode", "target": "stages.boom", "depends_on": ["numbers"]},
    ],
}

# Reads runs back in a fresh interpreter: nothing of the writing process is shared but the file.
READER = """
import json, sys
import flowdapt_nb as fnb
db, uids = sys.argv[1], sys.argv[2:]
out = {}
for uid in uids:
    run = fnb.load_run(uid, store=db)
    out[uid] = {"state": run.state, "executor": run.executor, "input": run.input,
                "target": run.config.get("target"), "error": run.error,
                "tasks": {k: int(v) for k, v in run.tasks.groupby("state").size().items()},
                "stages": run.stages.set_index("stage")["state"].to_dict(),
                "failures": [[f.stage, f.item, f.error_type, f.error, f.traceback or ""] for f in run.failures],
                "error_traceback": run.error_traceback,
                "result_type": run.result_type, "workflow_hash": run.workflow_hash,
                "yaml": run.workflow_yaml, "finished": run.finished_at is not None}
frame = fnb.runs(store=db)
out["listed"] = dict(zip(frame["uid"], frame["state"]))
print(json.dumps(out))
"""


def read_back(db, *uids) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", READER, str(db), *uids],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=TESTS_DIR,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_runs_on_each_executor_read_back_in_a_new_process(executor):
    store = executor._run_store
    assert store is not None and store.path == os.environ["FLOWDAPT_NB_RUNS"]  # the suite's temp DB
    good = executor.run(PARTIAL, input={"n": 5})
    with pytest.raises(fnb.StageError):
        executor.run(FAILING, input={"n": 2})
    bad = executor.history[-1]
    assert store.flush()
    seen = read_back(store.path, good.uid, bad.uid)

    g = seen[good.uid]
    assert g["state"] == "finished" and g["executor"] == executor.kind and g["input"] == {"n": 5}
    assert g["target"] == executor.kind and g["finished"]
    assert g["tasks"] == {"failed": 1, "finished": 6}  # numbers, 5 items (one failed), total
    assert g["stages"] == {"numbers": "finished", "checked": "finished", "total": "finished"}
    assert [f[:4] for f in g["failures"]] == [["checked", 3, "ValueError", "ValueError: item 3 is bad"]]
    assert "fail_on_three" in g["failures"][0][4]  # the worker's traceback
    assert g["error_traceback"] is None
    assert g["result_type"] == "builtins.int" and "stages.fail_on_three" in g["yaml"]

    b = seen[bad.uid]
    assert b["state"] == "failed" and "explode" in b["error"]
    assert b["stages"]["explode"] == "failed"
    assert b["failures"] == []  # no dropped items: the error that ended the run, with its traceback
    assert "in boom" in b["error_traceback"] and "KeyError: 'boom happened'" in b["error_traceback"]
    assert b["result_type"] is None
    assert seen["listed"][good.uid] == "finished" and seen["listed"][bad.uid] == "failed"


SLOW_FAN = {
    "name": "store_slow_fan",
    "stages": [
        {"name": "numbers", "target": "stages.numbers"},
        {"name": "slow", "target": "stages.slow", "type": "parameterized", "depends_on": ["numbers"]},
    ],
}


def test_a_run_in_progress_has_live_rows_and_an_ended_one_a_task_log(tmp_path):
    """While a run goes on, its task rows are in live_tasks (another process can follow it); when
    it ends, one task log holds them all, with their times, and the live rows are gone."""
    db = str(tmp_path / "live.sqlite")
    with fnb.LocalExecutor(use_processes=False, cpus=2, runs=db) as ex:
        store = ex._run_store
        handle = ex.submit(SLOW_FAN, input={"n": 6, "delay": 0.5})
        uid = handle.run.uid

        def some_finished_while_running():
            store.flush()
            rows = store.task_rows(uid)
            done = [r for r in rows if r["state"] == "finished"]
            return rows if handle.run.state == "running" and done else None

        live = poll(some_finished_while_running, timeout=60, what="live rows of the running run")
        assert any(r["stage"] == "numbers" and r["item"] is None for r in live)
        handle.wait(60)
        assert store.flush()
        counts = store.query(
            "SELECT (SELECT count(*) FROM live_tasks WHERE run_uid = ?) AS live, "
            "(SELECT n FROM task_logs WHERE run_uid = ?) AS logged",
            (uid, uid),
        )[0]
        assert counts == {"live": 0, "logged": 7}
        rows = {(r["stage"], r["item"]): r for r in store.task_rows(uid)}
        assert rows == handle.run._tasks  # every field as the run holds it, times to the bit
        for row in rows.values():
            assert row["state"] == "finished" and row["worker"]
            assert row["queued"] <= row["start"] <= row["end"]
    assert fnb.load_run(uid, store=db).tasks["state"].tolist() == ["finished"] * 7


def test_store_off_and_in_memory(tmp_path):
    with fnb.LocalExecutor(use_processes=False, cpus=1, runs="off") as ex:
        ex.run(PARTIAL, input={"n": 2})
        assert ex._run_store is None
    with fnb.LocalExecutor(use_processes=False, cpus=1, runs=":memory:") as ex:
        run = ex.run(PARTIAL, input={"n": 2})
        frame = fnb.runs(store=":memory:")
        assert run.uid in set(frame["uid"])
        assert fnb.load_run(run.uid, store=":memory:").stages["state"].tolist() == ["finished"] * 3
    db = tmp_path / "sub" / "mine.sqlite"
    with fnb.LocalExecutor(use_processes=False, cpus=1, runs=str(db)) as ex:
        run = ex.run(PARTIAL, input={"n": 3})
    assert fnb.runs(store=str(db))["uid"].tolist() == [run.uid]
    with pytest.raises(ValueError, match="off"):
        fnb.runs(store="off")


def test_config_runs_field_from_yaml(tmp_path):
    db = tmp_path / "from_yaml.sqlite"
    ex = fnb.executor_from_config(f"target: local\nuse_processes: false\ncpus: 1\nruns: {db}\n")
    with ex:
        run = ex.run(PARTIAL, input={"n": 2})
    assert fnb.load_run(run.uid, store=str(db)).state == "finished"
    assert fnb.executor_from_config("target: local\nruns: off\n").config.runs is False


def finished_and_failed(db: str, n: int):
    """Two runs recorded in ``db`` on threads: PARTIAL with input n (finished), then FAILING."""
    with fnb.LocalExecutor(use_processes=False, cpus=2, runs=db) as ex:
        good = ex.run(PARTIAL, input={"n": n})
        with pytest.raises(fnb.StageError):
            ex.run(FAILING)
        failed = ex.history[-1]
        ex._run_store.flush()
    return good, failed


def test_filters_and_lookup(tmp_path):
    db = str(tmp_path / "filters.sqlite")
    first, failed = finished_and_failed(db, 3)
    assert fnb.runs(workflow="store_boom", store=db)["uid"].tolist() == [failed.uid]
    assert fnb.runs(state="failed", store=db)["uid"].tolist() == [failed.uid]
    assert fnb.runs(store=db)["uid"].tolist() == [failed.uid, first.uid]  # newest first
    assert fnb.runs(since="2999-01-01", store=db).empty
    assert len(fnb.runs(since=first.started_at, store=db)) == 2
    assert fnb.load_run(first.name, store=db).uid == first.uid  # by name, or a uid prefix
    assert fnb.load_run(first.uid[:10], store=db).uid == first.uid
    with pytest.raises(KeyError, match="no stored run"):
        fnb.load_run("zzzzzzzz", store=db)
    loaded = fnb.load_run(first.uid, store=db)
    assert loaded.result is None and "builtins.int" in loaded.result_note
    dash = loaded.dashboard()  # drawn after the fact from the stored record
    try:
        assert "store_partial" in repr(dash) and "finished" in repr(dash)
    finally:
        dash.close()


WRITER = """
import sys
import textwrap
import flowdapt_nb as fnb
db, n = sys.argv[1], int(sys.argv[2])
with fnb.LocalExecutor(use_processes=False, cpus=2, runs=db) as ex:
    for i in range(n):
        ex.run({"name": "concurrent", "stages": [
            {"name": "numbers", "target": "stages.numbers"},
            {"name": "square", "target": "stages.square", "type": "parameterized", "depends_on": ["numbers"]},
            {"name": "total", "target": "stages.total", "depends_on": ["square"]}]}, input={"n": 20})
    print(ex._run_store.errors)
"""


def test_two_processes_write_at_once(tmp_path):
    db = str(tmp_path / "shared.sqlite")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, db, "15"],
            cwd=TESTS_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [w.communicate(timeout=300) for w in writers]
    for w, (out, err) in zip(writers, outs):
        assert w.returncode == 0, err
        assert out.strip() == "0", err  # no batch failed to write
        assert "locked" not in err
    con = sqlite3.connect(db)
    try:
        states = con.execute(
            "SELECT state, count(*), count(DISTINCT pid) FROM runs GROUP BY state"
        ).fetchall()
        per_run = con.execute("SELECT n FROM task_logs").fetchall()
        live = con.execute("SELECT count(*) FROM live_tasks").fetchone()[0]
        logs = con.execute("SELECT columns, times FROM task_logs").fetchall()
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        con.close()
    assert states == [("finished", 30, 2)]
    assert per_run == [(22,)] * 30  # numbers, 20 squares, total: every task row of every run
    assert live == 0  # an ended run's rows are in its log only
    for log in logs:  # each log reads back whole: every task finished, with its times
        rows = decode_task_log(*log)
        assert sorted((r["stage"], r["item"]) for r in rows) == sorted(
            [("numbers", None), ("total", None)] + [("square", i) for i in range(20)]
        )
        assert all(r["state"] == "finished" and r["start"] <= r["end"] for r in rows)
    assert mode == "wal"


KILLED = """
import sys, time
import flowdapt_nb as fnb
db, marker = sys.argv[1], sys.argv[2]
ex = fnb.LocalExecutor(use_processes=False, cpus=2, runs=db).start()
handle = ex.submit({"name": "doomed", "stages": [
    {"name": "numbers", "target": "stages.numbers"},
    {"name": "nap", "target": "stages.pid_then_sleep"}]}, input={"n": 2, "path": marker, "delay": 600})
print(handle.run.uid, flush=True)
time.sleep(600)
"""


def test_driver_killed_mid_run_reads_back_lost(tmp_path):
    db = str(tmp_path / "killed.sqlite")
    driver = subprocess.Popen(
        [sys.executable, "-c", KILLED, db, str(tmp_path / "pid.txt")],
        cwd=TESTS_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        uid = driver.stdout.readline().strip()
        assert uid, driver.stderr.read() if driver.poll() is not None else "no uid printed"
        store = get_store(db)
        rows = tasks = None
        deadline = time.monotonic() + 120  # a bound for a hang, not a timing assertion
        while time.monotonic() < deadline:  # the record arrives while the run goes on
            rows = store.query("SELECT state FROM runs WHERE uid = ?", (uid,))
            tasks = {t["stage"]: t["state"] for t in store.task_rows(uid)}
            if rows and rows[0]["state"] == "running" and tasks == {"numbers": "finished", "nap": "running"}:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the run's record never showed it running: {rows} {tasks}")
        assert fnb.runs(store=db).set_index("uid").loc[uid, "state"] == "running"  # its process is alive
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stdout.close()
        driver.stderr.close()
    seen = read_back(db, uid)
    assert seen["listed"][uid] == "lost"
    record = seen[uid]
    assert record["state"] == "lost" and f"pid {driver.pid}" in record["error"]
    assert record["stages"]["numbers"] == "finished"
    assert record["tasks"] == {"finished": 1, "cancelled": 1}  # the nap never ends: its process is gone
    assert fnb.runs(state="lost", store=db)["uid"].tolist() == [uid]


EARLIER = """
import sys
import textwrap
import flowdapt_nb as fnb
with fnb.LocalExecutor(use_processes=False, cpus=1, runs=sys.argv[1]) as ex:
    print(ex.run({"name": "store_magic", "stages": [{"name": "numbers", "target": "stages.numbers"}]},
                 input={"n": 7}).uid)
"""


def earlier_process_run(db) -> str:
    """A run written by another process (an earlier kernel)."""
    out = subprocess.run(
        [sys.executable, "-c", EARLIER, db], cwd=TESTS_DIR, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.extension_manager.load_extension("flowdapt_nb")
    yield sh
    magics = sh.magics_manager.registry["FlowdaptMagics"]
    magics._close_current()
    sh.extension_manager.unload_extension("flowdapt_nb")


def test_magics_runs_and_compare_in_ipython(shell, tmp_path):
    from IPython.core.error import UsageError

    db = str(tmp_path / "magic.sqlite")
    earlier = earlier_process_run(db)
    line = lambda text: shell.run_line_magic("flowdapt", text)  # noqa: E731
    line(f"executor local --threads --cpus 2 --set runs={db}")
    shell.run_cell_magic(
        "flowdapt",
        "workflow store_magic",
        "- {name: numbers, target: stages.numbers}\n"
        "- {name: square, target: stages.square, type: parameterized, depends_on: [numbers]}\n",
    )
    first = line("run store_magic --input n=3")
    second = line("run store_magic --input n=5")
    listed = line("runs --workflow store_magic")
    assert listed["uid"].tolist() == [second.uid, first.uid, earlier]  # this kernel's and an earlier one's
    assert line("runs --failed").empty
    assert len(line("runs -n 1")) == 1
    diff = line(f"compare {first.uid[:8]} {second.uid[:8]}")
    assert diff.input.set_index("key").loc["n", ["a", "b"]].tolist() == ["3", "5"]
    assert diff.workflow_diff == ""  # the same YAML
    assert diff.stages["stage"].tolist() == ["numbers", "square"]
    assert diff.stages["duration_a"].notna().all() and diff.stages["duration_b"].notna().all()
    old = line(f"compare {earlier} {first.uid}")
    assert "square" in old.workflow_diff and "+  - name: square" in old.workflow_diff
    assert "input:" in repr(old) and "stages:" in repr(old)
    with pytest.raises(UsageError, match="no stored run 'nope'"):
        line(f"compare nope {first.uid}")
    with pytest.raises(UsageError, match="the following arguments are required"):
        line("compare onlyone")


def cli(*args):
    return run_cli(*args, cwd=TESTS_DIR)


def test_cli_runs_and_show(tmp_path):
    db = str(tmp_path / "cli.sqlite")
    good, bad = finished_and_failed(db, 5)
    table = cli("runs", "--db", db)
    assert table.returncode == 0, table.stderr
    assert good.uid[:12] in table.stdout and bad.uid[:12] in table.stdout and "failed" in table.stdout
    rows = [json.loads(x) for x in cli("runs", "--db", db, "--json", "--failed").stdout.splitlines()]
    assert [r["uid"] for r in rows] == [bad.uid] and rows[0]["state"] == "failed"
    shown = cli("show", good.uid[:8], "--db", db)
    assert shown.returncode == 0, shown.stderr
    assert "dropped item 3 of stage 'checked': ValueError: item 3 is bad" in shown.stdout
    assert "fail_on_three" in shown.stdout  # its traceback
    # the stage table fits a terminal: counts and each stage's time, no raw timestamps or floats
    header = next(ln for ln in shown.stdout.splitlines() if ln.split()[:3] == ["stage", "type", "state"])
    assert header.split()[-1] == "time" and "finished_at" not in shown.stdout
    tasks = cli("show", good.uid[:8], "--db", db, "--tasks").stdout
    assert any(
        ln.split() == ["stage", "item", "state", "worker", "time", "error"] for ln in tasks.splitlines()
    )
    record = json.loads(cli("show", bad.uid, "--db", db, "--json").stdout)
    assert (
        record["state"] == "failed"
        and record["failures"] == []
        and "boom happened" in record["error_traceback"]
    )
    assert len(record["tasks"]) == 2 and record["input"] == {}
    missing = cli("show", "nope", "--db", db)
    assert missing.returncode == 2 and "no stored run 'nope'" in missing.stderr


def test_cli_show_of_a_run_with_no_stages_recorded():
    """A stored run whose workflow no longer loads and lists no stages still shows."""
    import pandas as pd

    from flowdapt_nb.cli_runs import _stage_table

    assert _stage_table(pd.DataFrame()) == "(no stages recorded)"


def test_cli_run_is_recorded(tmp_path):
    db = str(tmp_path / "clirun.sqlite")
    (tmp_path / "wf.yaml").write_text(
        "kind: workflow\nmetadata: {name: clirec}\nspec:\n  stages:\n"
        "    - {name: numbers, target: stages.numbers}\n"
    )
    env = {"FLOWDAPT_NB_RUNS": db}
    out = run_cli("run", tmp_path / "wf.yaml", "--input", "n=2", cwd=TESTS_DIR, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    listed = run_cli("runs", "--json", cwd=TESTS_DIR, env=env)
    [row] = [json.loads(x) for x in listed.stdout.splitlines()]
    assert row["workflow"] == "clirec" and row["state"] == "finished" and row["tasks"] == 1


def test_writer_thread_ends_with_its_executors_and_restarts(tmp_path):
    db = str(tmp_path / "restart.sqlite")
    ex = fnb.LocalExecutor(use_processes=False, cpus=1, runs=db).start()
    store = ex._run_store
    first = ex.run(PARTIAL, input={"n": 2})
    assert store._thread is not None and store._thread.is_alive()
    thread = store._thread
    ex.close()
    thread.join(timeout=30)  # nothing left to write, no executor attached: it ends
    assert not thread.is_alive() and store._thread is None
    with ex.start():  # a started-again executor records again
        second = ex.run(PARTIAL, input={"n": 3})
    assert fnb.runs(store=db)["uid"].tolist() == [second.uid, first.uid]


def test_detach_stops_recording_until_attached_again(tmp_path):
    """What the benchmarks do to time a run with the store off: a detached store hears nothing
    of the executor (its writer thread ends), and records again once attached."""
    db = str(tmp_path / "detach.sqlite")
    ex = fnb.LocalExecutor(use_processes=False, cpus=1, runs=db).start()
    try:
        store = ex._run_store
        first = ex.run(PARTIAL, input={"n": 2})
        thread = store._thread
        store.detach(ex)
        ex._run_store = None
        ex.run(PARTIAL, input={"n": 3})  # not recorded
        thread.join(timeout=30)  # no executor attached, nothing to write: the writer ends
        assert not thread.is_alive() and store._attached == 0
        ex._run_store = store
        store.attach(ex)
        third = ex.run(PARTIAL, input={"n": 4})
    finally:
        ex.close()
    assert fnb.runs(store=db)["uid"].tolist() == [third.uid, first.uid]
    assert store._attached == 0  # the close detached it once, not twice


def test_a_database_of_another_layout_is_set_aside(tmp_path):
    """A runs file written by another version (other columns, other user_version) is moved aside
    with a warning, never written into: the new store starts empty and works."""
    import sqlite3

    from flowdapt_nb.run_store import SCHEMA_VERSION, RunStore

    path = tmp_path / "runs.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE runs (uid TEXT PRIMARY KEY, state TEXT)")
    old.execute(
        "CREATE TABLE failures (run_uid TEXT, seq INTEGER, stage TEXT, item INTEGER, error TEXT, "
        "error_type TEXT, traceback TEXT)"
    )
    old.execute("INSERT INTO runs VALUES ('old-run', 'finished')")
    old.commit()
    old.close()
    with pytest.warns(UserWarning, match="another layout"):
        store = RunStore(str(path))
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store._db.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
    aside = [
        p
        for p in tmp_path.iterdir()
        if p.name.startswith("runs.sqlite.v0-") and not p.name.endswith(("-wal", "-shm"))
    ]
    assert aside, list(tmp_path.iterdir())
    kept = sqlite3.connect(aside[0])
    assert kept.execute("SELECT uid FROM runs").fetchall() == [("old-run",)]
    kept.close()
    # a database this version wrote opens as it is
    store2 = RunStore(str(tmp_path / "fresh.sqlite"))
    store2._db.execute("INSERT INTO runs (uid, state) VALUES ('r1', 'finished')")
    reopened = RunStore(str(tmp_path / "fresh.sqlite"))
    assert reopened._db.execute("SELECT uid FROM runs").fetchall() == [("r1",)]


def test_task_log_round_trip_keeps_missing_times_items_and_errors():
    """A task never started (no start/end), a simple stage's task (item None), an error text and
    a worker name read back exactly as written, times to the bit."""
    from flowdapt_nb.task_log import encode_task_log

    now = time.time()
    rows = [
        {"stage": "root", "item": None, "state": "finished", "worker": "MainThread", "queued": now,
         "start": now + 0.001, "end": now + 0.002, "error": None},
        {"stage": "each", "item": 0, "state": "failed", "worker": "w-1", "queued": now + 0.0031,
         "start": now + 0.0042, "end": now + 0.0053, "error": "ValueError: item 0 is bad"},
        {"stage": "each", "item": 1, "state": "cancelled", "worker": None, "queued": now + 0.0064,
         "start": None, "end": None, "error": None},
        {"stage": "never", "item": None, "state": None, "worker": None, "queued": None,
         "start": None, "end": None, "error": None},
    ]  # fmt: skip
    assert decode_task_log(*encode_task_log(rows)) == rows
    assert decode_task_log(*encode_task_log([])) == []


def test_task_log_round_trip_of_interleaved_stages_items_and_workers():
    """Stages that interleave, items out of order or repeated in another stage, workers that
    alternate, states that vary: the compact columns (runs, ranges, codes) give every row back."""
    from flowdapt_nb.task_log import encode_task_log

    now = time.time()
    rows = []
    for i in range(60):
        stage = ("a", "b", "a", "c")[i % 4]
        item = None if stage == "c" else (i * 7) % 13 if stage == "b" else i
        rows.append(
            {"stage": stage, "item": item, "state": ("finished", "failed", "cached")[i % 3],
             "worker": f"w{i % 2}", "queued": now + i, "start": now + i + 0.5 if i % 5 else None,
             "end": now + i + 0.75 if i % 5 else None, "error": "boom" if i % 3 == 0 else None}
        )  # fmt: skip
    rows += [
        {"stage": "d", "item": k, "state": "finished", "worker": "w9", "queued": now, "start": now,
         "end": now, "error": None}
        for k in range(100, 400)
    ]  # fmt: skip
    assert decode_task_log(*encode_task_log(rows)) == rows


def test_encoding_a_large_task_log_does_not_set_off_the_garbage_collector():
    """The writer shares the interpreter with the engine: a tracked object per row (a row tuple)
    set off a GC pass every 700 rows, each scanning the engine's young objects (the writer's CPU
    for a 5,000-task run tripled). Encoding 5,000 rows makes next to no tracked objects. In a
    fresh interpreter: GC callbacks see every thread's passes, and this one has many threads."""
    script = textwrap.dedent("""
        import gc, time
        from flowdapt_nb.task_log import decode_task_log, encode_task_log
        now = time.time()
        rows = [
            {"stage": "each", "item": i, "state": "finished", "worker": f"w{i % 3}", "queued": now + i,
             "start": now + i + 0.1, "end": now + i + 0.2, "error": None}
            for i in range(5000)
        ]
        encode_task_log(rows[:10])  # imports done
        passes = []
        gc.collect()
        gc.callbacks.append(lambda phase, info: phase == "start" and passes.append(info["generation"]))
        columns, times = encode_task_log(rows)
        gc.callbacks.clear()
        assert decode_task_log(columns, times) == rows
        print("passes", passes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "passes []" in out.stdout, f"GC passes while encoding: {out.stdout}"


def test_task_logs_of_the_first_layout_still_read_back():
    """Logs written before the compact columns (every column a list, compressed times as
    (queued, start, end) per row) read back as they did."""
    import zlib
    from array import array

    columns = {"stage": ["root", "each"], "item": [-1, 0], "state": ["finished", "failed"],
               "worker": ["MainThread", "w-1"], "error": [None, "ValueError: bad"]}  # fmt: skip
    times = array("d", [1.0, 2.0, 3.0, 4.0, float("nan"), float("nan")])
    if sys.byteorder != "little":
        times.byteswap()
    log = zlib.compress(json.dumps(columns).encode()), zlib.compress(times.tobytes())
    assert decode_task_log(*log) == [
        {"stage": "root", "item": None, "state": "finished", "worker": "MainThread", "queued": 1.0,
         "start": 2.0, "end": 3.0, "error": None},
        {"stage": "each", "item": 0, "state": "failed", "worker": "w-1", "queued": 4.0,
         "start": None, "end": None, "error": "ValueError: bad"},
    ]  # fmt: skip


def test_stored_stage_summaries_match_the_runs_own(tmp_path):
    """The writer keeps the stages' names and types only; summaries are drawn from the task log
    when read, and equal the ones the run itself gave."""
    from flowdapt_nb.run import stage_summaries

    db = str(tmp_path / "runs.sqlite")
    with fnb.LocalExecutor(use_processes=False, cpus=2, runs=db) as ex:
        run = ex.run(fnb.load_workflow(PARTIAL), input={"n": 6})
        ex._run_store.flush()
    stored = fnb.load_run(run.uid, store=db)
    assert stored.stage_summaries == stage_summaries(run)
    assert [s["stage"] for s in stored.stage_summaries] == ["numbers", "checked", "total"]
    assert stored.stage_summaries[1]["failed"] == 1
