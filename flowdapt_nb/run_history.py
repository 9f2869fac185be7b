"""Reading the run store: ``runs()`` as a table, ``load_run(uid)`` as a WorkflowRun, ``compare``.

Runs of earlier processes (a restarted kernel, a CLI run, another notebook) show up here; a run
whose process was killed mid-way reads back as ``lost``.
"""

from __future__ import annotations

import difflib
import json
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from .errors import RemoteError
from .run import Failure, WorkflowRun, _ts, stage_summaries
from .run_store import apply_lost, get_store

if TYPE_CHECKING:
    from .workflow import Workflow

RUN_COLUMNS = [
    "uid",
    "name",
    "workflow",
    "state",
    "executor",
    "namespace",
    "started_at",
    "finished_at",
    "duration",
    "tasks",
    "failures",
    "error",
    "result_type",
    "result_bytes",
    "workflow_hash",
]


def _store(store):
    """A RunStore from a store, a ``runs:`` setting (path / ':memory:') or None (the default)."""
    from .run_store import RunStore

    found = store if isinstance(store, RunStore) else get_store(store)
    if found is None:
        raise ValueError(f"the run store is off (runs: {store!r}); pass a database path to read one")
    found.flush()  # this process's runs so far are in
    return found


def _since(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return time.time() - value.total_seconds()
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        stamp = datetime.fromisoformat(value)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    raise ValueError(
        f"since must be a datetime, an ISO date string, a timedelta or a Unix time, "
        f"not {type(value).__name__}"
    )


def run_records(
    workflow: str | None = None,
    state: str | Iterable[str] | None = None,
    since=None,
    store=None,
    limit: int | None = None,
) -> list[dict]:
    """The stored runs as dicts, newest first (what ``runs()`` tabulates)."""
    db = _store(store)
    where: list[str] = []
    params: list[object] = []
    if workflow:
        where.append("workflow = ?")
        params.append(workflow)
    after = _since(since)
    if after is not None:
        where.append("created >= ?")
        params.append(after)
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created DESC"
    here = socket.gethostname()
    rows = [apply_lost(r, here) for r in db.query(sql, params)]
    if state:
        wanted = {state} if isinstance(state, str) else set(state)
        rows = [r for r in rows if r["state"] in wanted]
    return rows[:limit] if limit else rows


def runs(
    workflow: str | None = None,
    state: str | Iterable[str] | None = None,
    since=None,
    store=None,
    limit: int | None = None,
):
    """pandas DataFrame of stored runs, newest first: uid, name, workflow, state, executor,
    namespace, started_at, finished_at (UTC), duration (s), tasks, failures, error, result_type,
    result_bytes, workflow_hash.

    ``state`` is one of pending, running, finished, failed, cancelled, or ``lost`` (its process
    ended mid-run); ``since`` a datetime, ISO string, timedelta (that long ago) or Unix time;
    ``store`` a database path (default: ``$FLOWDAPT_NB_RUNS`` or the user data dir).

    >>> fnb.runs(workflow="demo", state="failed")   # doctest: +SKIP
    """
    import pandas as pd

    out = []
    for r in run_records(workflow, state, since, store, limit):
        start, end = r["started"] or r["created"], r["finished"]
        out.append(
            {
                "uid": r["uid"],
                "name": r["name"],
                "workflow": r["workflow"],
                "state": r["state"],
                "executor": r["executor"],
                "namespace": r["namespace"],
                "started_at": _ts(start),
                "finished_at": _ts(end),
                "duration": round(end - start, 6) if start and end else None,
                "tasks": r["n_tasks"],
                "failures": r["n_failures"],
                "error": r["error"],
                "result_type": r["result_type"],
                "result_bytes": r["result_bytes"],
                "workflow_hash": r["workflow_hash"],
            }
        )
    frame = pd.DataFrame(out, columns=RUN_COLUMNS)
    for col in ("tasks", "failures", "result_bytes"):
        frame[col] = frame[col].astype("Int64")
    return frame


def find_record(uid: str, store=None) -> dict:
    """The stored record of a run by uid, a unique uid prefix, or its name."""
    db = _store(store)
    uid = str(uid).strip()
    rows = db.query("SELECT * FROM runs WHERE uid = ? OR name = ?", (uid, uid))
    if not rows and len(uid) >= 4:
        rows = db.query("SELECT * FROM runs WHERE uid LIKE ? LIMIT 3", (uid.replace("%", "") + "%",))
    if not rows:
        raise KeyError(f"no stored run {uid!r} in {db.path} (fnb.runs() lists them)")
    if len(rows) > 1:
        raise KeyError(
            f"{uid!r} matches {len(rows)} runs ({', '.join(r['uid'][:12] for r in rows)}); give more of the uid"
        )
    return apply_lost(rows[0])


class _Definition:
    """A stand-in workflow definition for a stored run whose YAML no longer loads."""

    class _Stage:
        def __init__(self, name, type_):
            self.name, self.type, self.depends_on = name, type_, []

    def __init__(self, name: str, stages: list[dict]):
        self.name = name
        self.stages = [self._Stage(s["stage"], s.get("type", "simple")) for s in stages]

    def terminal_stages(self):
        return self.stages[-1:]


class StoredRun(WorkflowRun):
    """A run read back from the run store: a WorkflowRun with its tasks, stages and failures, and
    the stored extras: ``config`` (executor config), ``workflow_yaml``, ``workflow_hash``,
    ``result_type``, ``result_bytes``, ``stage_summaries``, ``pid``/``host`` of the process that ran
    it, and ``error_traceback`` (the traceback of the error that ended a failed run; ``exception``
    stands in for that error). ``failures`` are the items dropped under allow_partial_failure.
    ``result`` is None (the store keeps its type and size, not the value)."""

    config: dict
    workflow_yaml: str | None
    workflow_hash: str | None
    result_type: str | None
    result_bytes: int | None
    stage_summaries: list[dict]
    pid: int | None
    host: str | None
    error_traceback: str | None

    def dashboard(self):
        """A TaskDashboard of this run, drawn from its stored record."""
        from .widgets.tasks import TaskDashboard

        return TaskDashboard(_Offline(self), run=self)


class _Offline:
    """What a dashboard needs of an executor, for a stored run (no live events)."""

    def __init__(self, run):
        from .events import EventBus

        self.kind = run.executor
        self.events = EventBus()
        self.history = [run]
        self._active: dict = {}

    def info(self) -> dict:
        return {"kind": self.kind, "state": "stopped", "address": None, "dashboard_url": None}


def load_run(uid: str, store=None) -> StoredRun:
    """A stored run as a WorkflowRun (``StoredRun``): state, timings, ``tasks``, ``stages``,
    ``failures`` (with tracebacks), input, ``config``; ``.dashboard()`` draws it after the fact.

    >>> run = fnb.load_run("3f2a9c1d")   # a uid, a unique prefix of one, or a run name  # doctest: +SKIP
    """
    from .workflow import load_workflow

    db = _store(store)
    rec = find_record(uid, db)
    stages = json.loads(rec["stages_json"] or "[]")  # names and types (older records: summaries)
    definition: Workflow | _Definition
    try:
        definition = load_workflow(rec["workflow_yaml"])
    except Exception:
        definition = _Definition(rec["workflow"], stages)
    run = StoredRun(definition, json.loads(rec["input_json"] or "{}"), rec["namespace"], rec["executor"])
    run.uid, run.name, run.workflow = rec["uid"], rec["name"], rec["workflow"]
    run.state, run.error, run.failed_stage = rec["state"], rec["error"], rec["failed_stage"]
    run._started = rec["started"]
    run._finished = rec["finished"]
    if run.state == "lost":
        run._finished = rec["heartbeat"]  # the last time its process was heard of
    run.result_dropped = rec["result_type"] is not None
    size = "" if rec["result_bytes"] is None else f", about {rec['result_bytes']} bytes"
    run.result_note = (
        f"the run store keeps the result's type and size, not the result: {rec['result_type']}{size}"
        if run.result_dropped
        else None
    )
    run.config = json.loads(rec["config_json"] or "{}")
    run.workflow_yaml, run.workflow_hash = rec["workflow_yaml"], rec["workflow_hash"]
    run.result_type, run.result_bytes = rec["result_type"], rec["result_bytes"]
    run.pid, run.host = rec["pid"], rec["host"]
    for t in db.task_rows(rec["uid"]):
        if run.state == "lost" and t["state"] in ("queued", "running"):
            t["state"] = "cancelled"  # its process is gone: it will never end
        run._tasks[(t["stage"], t["item"])] = t
    run.stage_summaries = stage_summaries(run)  # from the task log: the writer leaves them out
    run.error_traceback = None
    for f in db.query(
        "SELECT stage, item, error, error_type, traceback, fatal FROM failures WHERE run_uid = ? "
        "ORDER BY seq",
        (rec["uid"],),
    ):
        if f.pop("fatal"):  # the error that ended the run: its type and the worker's traceback
            run.exception = RemoteError(f["error_type"], f["error"], f["traceback"])
            run.error_traceback = f["traceback"]
        else:
            run._failures.append(Failure(**f, exception=None))
    return run


# --- comparing ------------------------------------------------------------------------------------


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1] or "(value)": value}


def _side_by_side(a: dict, b: dict, only_diff: bool):
    import pandas as pd

    fa, fb = _flat(a), _flat(b)
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, "—"), fb.get(key, "—")
        if only_diff and va == vb:
            continue
        rows.append(
            {
                "key": key,
                "a": json.dumps(va) if not isinstance(va, str) else va,
                "b": json.dumps(vb) if not isinstance(vb, str) else vb,
                "same": va == vb,
            }
        )
    return pd.DataFrame(rows, columns=["key", "a", "b", "same"])


class RunComparison:
    """Two stored runs side by side: ``input`` and ``config`` (keys that differ), ``workflow_diff``
    (unified diff of their YAML), ``stages`` (per-stage state and duration of each)."""

    def __init__(self, a: StoredRun, b: StoredRun):
        import pandas as pd

        self.a, self.b = a, b
        self.input = _side_by_side(a.input, b.input, only_diff=False)
        self.config = _side_by_side(a.config, b.config, only_diff=True)
        self.workflow_diff = "".join(
            difflib.unified_diff(
                (a.workflow_yaml or "").splitlines(True),
                (b.workflow_yaml or "").splitlines(True),
                fromfile=f"a: {a.name}",
                tofile=f"b: {b.name}",
            )
        )
        sa = {s["stage"]: s for s in a.stage_summaries}
        sb = {s["stage"]: s for s in b.stage_summaries}
        names = list(sa) + [n for n in sb if n not in sa]
        self.stages = pd.DataFrame(
            [
                {
                    "stage": n,
                    "state_a": sa.get(n, {}).get("state"),
                    "state_b": sb.get(n, {}).get("state"),
                    "duration_a": sa.get(n, {}).get("duration"),
                    "duration_b": sb.get(n, {}).get("duration"),
                }
                for n in names
            ],
            columns=["stage", "state_a", "state_b", "duration_a", "duration_b"],
        )

    def __repr__(self) -> str:
        parts = [
            f"a: {self.a.name} ({self.a.state}, {self.a.executor})",
            f"b: {self.b.name} ({self.b.state}, {self.b.executor})",
            "",
            "input:",
            self.input.to_string(index=False) if len(self.input) else "  (none)",
            "",
            "config (differences):",
            self.config.to_string(index=False) if len(self.config) else "  (same)",
            "",
            "workflow:",
            self.workflow_diff or "  (same YAML)",
            "",
            "stages:",
            self.stages.to_string(index=False),
        ]
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        from html import escape

        diff = f"<pre>{escape(self.workflow_diff)}</pre>" if self.workflow_diff else "<p>same YAML</p>"
        return (
            f"<div><b>a</b>: {escape(self.a.name)} ({escape(self.a.state)}) · <b>b</b>: "
            f"{escape(self.b.name)} ({escape(self.b.state)})<h4>input</h4>{self.input.to_html(index=False)}"
            f"<h4>config (differences)</h4>{self.config.to_html(index=False) if len(self.config) else '<p>same</p>'}"
            f"<h4>workflow</h4>{diff}<h4>stages</h4>{self.stages.to_html(index=False)}</div>"
        )


def compare(uid_a: str, uid_b: str, store=None) -> RunComparison:
    """Two stored runs side by side: input, config, workflow diff, per-stage durations."""
    return RunComparison(load_run(uid_a, store), load_run(uid_b, store))
