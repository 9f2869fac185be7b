"""The run store: every run's record in SQLite, written as it goes, readable from any process.

Where: ``$FLOWDAPT_NB_RUNS`` when set, else ``<user data dir>/runs.sqlite`` (beside the
``artifacts`` folder); an executor's ``runs:`` field overrides it (a path, ``":memory:"``, or
``off``/``false``). What: workflow (YAML and its hash), input (a JSON-able repr), executor config,
state, timings, its stages (their summaries are drawn from the task rows when read), every task
row, every failure with its traceback, and the result's type and estimated size (never the result
itself).

Why a writer thread: the executor hands a run to ``RunStore.begin`` and its event bus hands run
events to a queue (a C queue put); one daemon thread per database writes in batches ~0.5 s apart,
reading the task rows that changed from the runs themselves, so the engine's thread never waits on
disk nor does anything per task for the store, and a killed process loses at most the last second
(see LIVE_AFTER).
SQLite runs in WAL mode with a busy timeout, so two kernels writing the same file are safe.

A run whose writer process is gone while its record still says pending/running reads back as
``lost`` (the process was killed or exited mid-run).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import socket
import sqlite3
import threading
import time

from .task_log import SIMPLE_ITEM, decode_task_log, encode_task_log

ENV_VAR = "FLOWDAPT_NB_RUNS"
OFF = ("off", "false", "no", "none", "disabled")
FLUSH_EVERY = 0.5  # seconds between batches: what a killed process can lose
# A run's task rows are written while it runs once it has run this long (its begin row at once):
# most runs end sooner, and their rows go straight into the task log. A killed process still
# loses at most LIVE_AFTER + FLUSH_EVERY = 1 s of task records.
LIVE_AFTER = 0.5
HEARTBEAT_EVERY = 5.0  # seconds between 'still running' marks of active runs
STALE_AFTER = 120.0  # a running record not marked for this long, from another host, reads as lost
REPR_LIMIT = 2000  # characters kept of one input value's repr

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    uid TEXT PRIMARY KEY, name TEXT, workflow TEXT, workflow_hash TEXT, workflow_yaml TEXT,
    input_json TEXT, namespace TEXT, executor TEXT, config_json TEXT, state TEXT, error TEXT,
    failed_stage TEXT, created REAL, started REAL, finished REAL, result_type TEXT,
    result_bytes INTEGER, stages_json TEXT, n_tasks INTEGER, n_failures INTEGER,
    pid INTEGER, host TEXT, proc_start REAL, heartbeat REAL);
CREATE INDEX IF NOT EXISTS runs_by_workflow ON runs (workflow, created);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created);
CREATE TABLE IF NOT EXISTS live_tasks (
    run_uid TEXT NOT NULL, stage TEXT NOT NULL, item INTEGER NOT NULL, state TEXT, worker TEXT,
    queued REAL, start REAL, "end" REAL, error TEXT, PRIMARY KEY (run_uid, stage, item));
CREATE TABLE IF NOT EXISTS task_logs (
    run_uid TEXT PRIMARY KEY, n INTEGER NOT NULL, columns BLOB NOT NULL, times BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    run_uid TEXT NOT NULL, seq INTEGER NOT NULL, stage TEXT, item INTEGER, error TEXT,
    error_type TEXT, traceback TEXT, fatal INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run_uid, seq));
"""
SCHEMA_VERSION = 2  # PRAGMA user_version of a database this code wrote; bump when SCHEMA changes
# Task rows live in two places. A run in progress: ``live_tasks``, one row per task, upserted as
# states change (another process can follow it). A run that ended: one ``task_logs`` row, its
# columns encoded (``encode_task_log``), and its live rows deleted. Writing 5,000 rows one by one
# cost ~18 ms of SQLite at a tiny run's end, longer than a quarter of the run; the log costs ~3 ms.


# --- where ----------------------------------------------------------------------------------------


def default_path() -> str:
    """``$FLOWDAPT_NB_RUNS`` when set, else ``<user data dir>/runs.sqlite``."""
    from .artifacts import user_data_dir

    return os.environ.get(ENV_VAR) or os.path.join(user_data_dir(), "runs.sqlite")


def resolve_setting(setting) -> str | None:
    """The database an executor's ``runs:`` setting names: a path, ':memory:', or None (off).
    ``None``/``True`` mean the default; ``False`` or 'off' turn the store off."""
    if setting is None or setting is True:
        setting = os.environ.get(ENV_VAR) or None
        if setting is None:
            return default_path()
    if setting is False or (isinstance(setting, str) and setting.strip().lower() in OFF):
        return None
    if setting == ":memory:":
        return setting
    return os.path.abspath(os.path.expanduser(str(setting)))


_stores: dict[str, RunStore] = {}
_stores_lock = threading.Lock()


def get_store(setting=None) -> RunStore | None:
    """The store for a ``runs:`` setting (one per database per process), or None when off."""
    path = resolve_setting(setting)
    if path is None:
        return None
    with _stores_lock:
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = RunStore(path)
        return store


def attach_executor(executor) -> RunStore | None:
    """The store an executor's ``runs:`` setting names, subscribed to its events; None when off.
    A store that can't be opened (a read-only folder, a damaged file) is a warning, never a
    failed start: runs then go unrecorded."""
    try:
        store = get_store(executor.config.runs)
        if store is not None:
            store.attach(executor)
        return store
    except Exception as exc:
        import warnings

        warnings.warn(
            f"run store not used ({type(exc).__name__}: {exc}); set runs: to a writable path, or runs: off",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# --- what goes in ---------------------------------------------------------------------------------


def _jsonable(value, depth: int = 0):
    """A JSON-able stand-in for a run input: plain values as they are, others as a short repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value if not isinstance(value, str) or len(value) <= REPR_LIMIT else value[:REPR_LIMIT] + "…"
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if depth < 4 and isinstance(value, (list, tuple)) and len(value) <= 100:
        return [_jsonable(v, depth + 1) for v in value]
    if depth < 4 and isinstance(value, dict) and len(value) <= 100:
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    text = _bounded_repr(value)
    return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT] + "…"


def _bounded_repr(value) -> str:
    """``repr(value)``, or for a long list/tuple the repr of a prefix long enough to fill
    REPR_LIMIT: the same first characters, without writing out all of 5,000 items (~0.25 ms) to
    keep 2,000 characters of them."""
    if type(value) in (list, tuple):  # a subclass may write its own repr
        take = 64
        while take < len(value):
            text = repr(value[:take])
            if len(text) > REPR_LIMIT:
                return text
            take *= 4
    return repr(value)


_yaml_cache: dict[str, tuple[str, str]] = {}  # repr of a workflow's to_dict() -> (YAML, its hash)
YAML_CACHE_SIZE = 64
_yaml_lock = threading.Lock()


def _workflow_text(definition) -> tuple[str, str]:
    """A workflow's YAML and its hash. Writing YAML is slow (~1.5 ms for four stages: several
    percent of a tiny run) and notebooks run the same workflow many times, so both are kept by
    the workflow's content (its ``to_dict()``, ~20 us): an edited workflow gets new text."""
    try:
        key = repr(definition.to_dict())
    except Exception:
        key = None
    found = _yaml_cache.get(key) if key is not None else None
    if found is not None:
        return found
    try:
        text = definition.to_yaml()
    except Exception:  # a definition that can't be written back (exotic targets): its repr
        text = repr(definition)
    found = (text, hashlib.sha256(text.encode()).hexdigest()[:16])
    if key is not None:
        with _yaml_lock:  # one writer thread per database: several may be here at once
            if len(_yaml_cache) >= YAML_CACHE_SIZE:
                _yaml_cache.pop(next(iter(_yaml_cache)))  # the oldest
            _yaml_cache[key] = found
    return found


def _result_info(run) -> tuple[str | None, int | None]:
    """The result's type and estimated size: the estimate the executor made for its history
    budget when there is one (measuring a large result twice cost a tiny run ~0.1 ms)."""
    result = run.result
    if result is None:
        return None, None
    size = getattr(run, "_result_bytes", None)
    if size is None:
        from .sizes import estimate_bytes

        try:
            size = int(estimate_bytes(result))
        except Exception:
            size = None
    kind = type(result)
    return f"{kind.__module__}.{kind.__qualname__}", size


def _failure_rows(run) -> list[tuple]:
    """Every failure: items dropped under allow_partial_failure, then the error that ended the run
    (``fatal`` 1)."""
    import traceback as tb

    rows = [(f.stage, f.item, f.error, f.error_type, f.traceback, 0) for f in run.failures]
    exc = run.exception
    if exc is not None:
        cause = exc.__cause__ or exc
        text = getattr(cause, "remote_traceback", None) or getattr(exc, "remote_traceback", None)
        if not text:
            text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        rows.append(
            (
                getattr(exc, "stage", None) or run.failed_stage,
                getattr(exc, "item", None),
                run.error or f"{type(exc).__name__}: {exc}",
                type(cause).__name__,
                text,
                1,
            )
        )
    return rows


def _task_params(uid: str, rows) -> list[tuple]:
    return [
        (
            uid,
            r["stage"],
            SIMPLE_ITEM if r["item"] is None else r["item"],
            r["state"],
            r["worker"],
            r["queued"],
            r["start"],
            r["end"],
            r["error"],
        )
        for r in rows
    ]


_BEGIN_COLUMNS = (
    "uid, name, workflow, workflow_hash, workflow_yaml, input_json, namespace, executor, config_json, "
    "created, pid, host, proc_start, state, heartbeat"
)
_BEGIN_INSERT = f"INSERT OR REPLACE INTO runs ({_BEGIN_COLUMNS}) VALUES ({','.join('?' * 15)})"
_BEGIN_STATE = 13  # a begin row's values before its state and heartbeat
_END_COLUMNS = (
    "state, error, failed_stage, started, finished, result_type, result_bytes, stages_json, n_tasks, "
    "n_failures, heartbeat"
)
_END_UPDATE = f"UPDATE runs SET ({_END_COLUMNS}) = ({','.join('?' * 11)}) WHERE uid=?"
_WHOLE_INSERT = (
    f"INSERT OR REPLACE INTO runs ({_BEGIN_COLUMNS[: _BEGIN_COLUMNS.index(', state')]}, {_END_COLUMNS}) "
    f"VALUES ({','.join('?' * 24)})"
)

_TASK_UPSERT = (
    'INSERT INTO live_tasks (run_uid, stage, item, state, worker, queued, start, "end", error) '
    "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (run_uid, stage, item) DO UPDATE SET "
    "state=excluded.state, worker=excluded.worker, queued=excluded.queued, "
    'start=excluded.start, "end"=excluded."end", error=excluded.error'
)


# --- the store ------------------------------------------------------------------------------------


class RunStore:
    """One SQLite database of runs: a writer thread for this process's runs, and readers."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()  # one connection, shared by the writer and readers
        if path != ":memory:":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._db = self._connect(path)
        if not self._schema_fits():
            self._db = self._set_aside(path)
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()  # set by flush(): end the batch window early
        self._runs: dict = {}  # uid -> WorkflowRun still being written
        self._owner: dict = {}  # uid -> id() of the executor that runs it
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # guards _thread and _attached
        self._attached = 0  # running executors subscribed: the writer thread ends when none is left
        self._tokens: dict = {}  # id() of an attached executor -> its event-bus subscriptions
        self._written: dict = {}  # uid of a run in progress -> {task key: the state last written}
        self._begun: dict = {}  # uid of a run in progress -> when it reached the writer (monotonic)
        self._configs: dict = {}  # id() of an executor -> (its config, as JSON)
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._proc_start = _process_start(self._pid)
        self.errors = 0  # batches that failed to write (logged; runs go on)

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 30000")
        if path != ":memory:":
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
        return db

    def _schema_fits(self) -> bool:
        """A new database, or one written with this SCHEMA_VERSION."""
        has_runs = self._db.execute("SELECT 1 FROM sqlite_master WHERE name='runs'").fetchone()
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        return not has_runs or version == SCHEMA_VERSION

    def _set_aside(self, path: str) -> sqlite3.Connection:
        """A database of another layout (another flowdapt_nb version) is renamed, never mixed
        with or overwritten: its runs stay readable by the version that wrote them."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        self._db.close()
        if path == ":memory:":
            return self._connect(path)
        aside = f"{path}.v{version}-{int(time.time())}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
        import warnings

        warnings.warn(
            f"run store {path} has another layout (version {version}): moved to {aside}, starting a new one",
            stacklevel=3,
        )
        return self._connect(path)

    # --- writing: called from the executor (cheap: a queue put) ---
    def begin(self, run, executor) -> None:
        """A run was submitted: its record is written with the next batch."""
        self._queue.put(("begin", run, executor.config_dict(), id(executor)))

    def attach(self, executor) -> int:
        """Subscribe to a started executor's event bus: its run events go to the writer thread
        ('stopped' detaches it); returns the token. Task rows are read from the runs themselves,
        once per batch: no task event reaches this store, so it adds no work per task to the
        engine's thread."""
        owner, put = id(executor), self._queue.put
        with self._start_lock:
            self._attached += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._write_loop, name="flowdapt-nb-run-store", daemon=True
                )
                self._thread.start()
        tokens = (
            executor.events.subscribe(put, kinds=("run",)),  # the queue's own put: no wrapper
            executor.events.subscribe(lambda event: put(("executor", event, owner)), kinds=("executor",)),
        )
        self._tokens[owner] = tokens
        return tokens[0]

    def detach(self, executor) -> None:
        """Stop recording a running executor's runs (closing it does this too); runs already
        begun are still written to their end; ``attach`` starts again. The benchmarks use it to
        time one executor with the store off and on."""
        if not executor.running:
            return  # a closed executor's 'stopped' event has detached it
        tokens = self._tokens.pop(id(executor), None)
        if tokens is None:
            return
        for token in tokens:
            executor.events.unsubscribe(token)
        with self._start_lock:
            self._attached -= 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what this process handed the writer so far is on disk."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(("flush", done))
        self._wake.set()  # write now, not at the end of the batch window
        return done.wait(timeout)

    # --- the writer thread ---
    def _write_loop(self) -> None:
        """Write a batch every FLUSH_EVERY seconds while runs are in progress (or at once when
        flushed); sleep while none is. Ends when no executor is attached and nothing is left to
        write (a closed executor leaves no thread behind; the next start begins a new one)."""
        last_beat = 0.0
        while True:
            batch = [] if self._runs else [self._queue.get()]  # nothing in progress: asleep till a begin
            if not (batch and _is_flush(batch[0])):
                self._wake.wait(FLUSH_EVERY)  # one batch window (flush() ends it early)
            self._wake.clear()
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            now = time.time()
            beat = bool(self._runs) and now - last_beat > HEARTBEAT_EVERY
            try:
                self._write(batch, now if beat else None)
                if beat:
                    last_beat = now
            except Exception:
                self.errors += 1
                import logging

                logging.getLogger("flowdapt_nb").exception(
                    "run store: writing a batch to %s failed", self.path
                )
            for entry in batch:
                if _is_flush(entry):
                    entry[1].set()
            with self._start_lock:
                if self._attached <= 0 and not self._runs and self._queue.empty():
                    self._thread = None
                    return

    def _sort_batch(self, batch: list) -> tuple[dict, list]:
        """Take in a batch: runs begun (uid -> their new records' rows) and runs that ended."""
        begins: dict = {}
        ended: list = []
        runs = self._runs
        for entry in batch:
            if type(entry) is not tuple:  # a run event
                if entry.state in ("finished", "failed", "cancelled"):
                    run = runs.get(entry.run)
                    if run is not None and run not in ended:
                        ended.append(run)
            elif entry[0] == "begin":
                _, run, config, owner = entry
                runs[run.uid] = run
                self._owner[run.uid] = owner
                self._written[run.uid] = {}
                self._begun[run.uid] = time.monotonic()
                begins[run.uid] = self._begin_row(run, self._config_text(owner, config))
            elif entry[0] == "executor":
                event, owner = entry[1], entry[2]
                if event.state == "stopped":  # its bus closes: its runs' records end here
                    self._configs.pop(owner, None)
                    with self._start_lock:
                        self._attached -= 1
                    ended.extend(
                        r for uid, r in runs.items() if self._owner.get(uid) == owner and r not in ended
                    )
        return begins, ended

    def _write(self, batch: list, heartbeat: float | None) -> None:
        begins, ended = self._sort_batch(batch)
        runs = self._runs
        ending = {run.uid for run in ended}
        # runs still going: the task rows that changed since the last batch (a run that ended
        # is written whole, once, by _end)
        live_before = time.monotonic() - LIVE_AFTER
        going = [(uid, run) for uid, run in runs.items() if uid not in ending]
        progress = [self._changed_rows(uid, run) for uid, run in going if self._begun[uid] <= live_before]
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if begins:
                    db.executemany(_BEGIN_INSERT, [row for uid, row in begins.items() if uid not in ending])
                for params in progress:
                    if params:
                        db.executemany(_TASK_UPSERT, params)
                for uid, run in going:  # state and timings of every run in progress
                    db.execute(
                        "UPDATE runs SET state=?, started=?, error=? WHERE uid=?",
                        (run.state, run._started, run.error, uid),
                    )
                if heartbeat is not None:
                    db.executemany(
                        "UPDATE runs SET heartbeat=? WHERE uid=?", [(heartbeat, uid) for uid, _ in going]
                    )
                if ended:
                    self._end(db, ended, begins)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        for run in ended:
            runs.pop(run.uid, None)
            self._owner.pop(run.uid, None)
            self._written.pop(run.uid, None)
            self._begun.pop(run.uid, None)

    def _changed_rows(self, uid: str, run) -> list[tuple]:
        """The task rows of a run in progress whose state moved since they were last written."""
        written = self._written.setdefault(uid, {})
        with run._lock:
            changed = [r for key, r in run._tasks.items() if written.get(key) != r["state"]]
            for r in changed:
                written[(r["stage"], r["item"])] = r["state"]
            return _task_params(uid, changed)

    def _config_text(self, owner: int, config: dict) -> str:
        """An executor's config as JSON, written once per config (every run of an executor
        carries the same one: its JSON was a tenth of a tiny run's record)."""
        known = self._configs.get(owner)
        if known is None or known[0] != config:
            known = self._configs[owner] = (config, json.dumps(_jsonable(config)))
        return known[1]

    def _begin_row(self, run, config: str) -> tuple:
        text, digest = _workflow_text(run.definition)
        return (
            run.uid,
            run.name,
            run.workflow,
            digest,
            text,
            json.dumps(_jsonable(run.input)),
            run.namespace,
            run.executor,
            config,
            time.time(),
            self._pid,
            self._host,
            self._proc_start,
            run.state,  # the last two change as it goes (_BEGIN_STATE)
            time.time(),
        )

    def _end(self, db, ended: list, begins: dict) -> None:
        """Runs ended: their final records from the run objects (all rows with their timings),
        one statement per table for the whole batch. A run that began in this same batch (in
        ``begins``) is inserted whole, once."""
        logs, lived, failures, wholes, updates = [], [], [], [], []
        for run in ended:
            with run._lock:  # the final rows, in one consistent read
                rows = list(run._tasks.values())
                columns, times = encode_task_log(rows)
                run._offer_log(len(rows), columns, times)  # ex.history packs it with this log
            logs.append((run.uid, len(rows), columns, times))
            if self._written.get(run.uid):  # rows written while it ran: the log replaces them
                lived.append((run.uid,))
            failures += [(run.uid, i, *f) for i, f in enumerate(_failure_rows(run))]
            final = self._final_values(run, len(rows))
            begin_row = begins.get(run.uid)
            if begin_row is not None:
                wholes.append((*begin_row[:_BEGIN_STATE], *final))
            else:
                updates.append((*final, run.uid))
        db.executemany("INSERT OR REPLACE INTO task_logs (run_uid, n, columns, times) VALUES (?,?,?,?)", logs)
        if lived:
            db.executemany("DELETE FROM live_tasks WHERE run_uid=?", lived)
        if failures:  # written once: a run ends once
            db.executemany("INSERT OR REPLACE INTO failures VALUES (?,?,?,?,?,?,?,?)", failures)
        if wholes:
            db.executemany(_WHOLE_INSERT, wholes)
        if updates:
            db.executemany(_END_UPDATE, updates)

    @staticmethod
    def _final_values(run, n_tasks: int) -> tuple:
        """An ended run's columns after its begin row's (``_END_COLUMNS``)."""
        rtype, rbytes = _result_info(run)
        # the stages' names and types; their summaries are drawn from the task log when read
        stages = json.dumps([{"stage": st.name, "type": st.type} for st in run.definition.stages])
        return (
            run.state,
            run.error,
            run.failed_stage,
            run._started,
            run._finished,
            rtype,
            rbytes,
            stages,
            n_tasks,
            len(run.failures),
            time.time(),
        )

    # --- reading ---
    def task_rows(self, uid: str) -> list[dict]:
        """A run's task rows (stage, item, state, worker, queued, start, end, error): its log when
        it ended, else the rows written so far (item None for a simple stage's task)."""
        with self._lock:
            log = self._db.execute(
                "SELECT columns, times FROM task_logs WHERE run_uid = ?", (uid,)
            ).fetchone()
        if log is not None:
            return decode_task_log(*log)
        rows = self.query(
            'SELECT stage, item, state, worker, queued, start, "end", error FROM live_tasks '
            "WHERE run_uid = ?",
            (uid,),
        )
        for r in rows:
            if r["item"] == SIMPLE_ITEM:
                r["item"] = None
        return rows

    def query(self, sql: str, params=()) -> list[dict]:
        """Rows of a read as dicts (column name -> value)."""
        with self._lock:
            cursor = self._db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        self.flush(5)
        with self._lock:
            self._db.close()


def _is_flush(entry) -> bool:
    return type(entry) is tuple and entry[0] == "flush"


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _writer_gone(row: dict, here: str) -> bool:
    """Whether the process that wrote a pending/running record is gone (killed, or exited mid-run)."""
    if row["host"] == here:
        pid = row["pid"]
        if pid == os.getpid() and row.get("proc_start") == _process_start(pid):
            return not any(row["uid"] in s._runs for s in list(_stores.values()))
        started = _process_start(pid) if pid else None
        if started is None:
            return True
        return row.get("proc_start") is not None and abs(started - row["proc_start"]) > 1.0
    return row.get("heartbeat") is not None and time.time() - row["heartbeat"] > STALE_AFTER


def apply_lost(row: dict, here: str | None = None) -> dict:
    """A pending/running record whose writer is gone reads as 'lost', saying why."""
    if row.get("state") in ("pending", "running") and _writer_gone(row, here or socket.gethostname()):
        row["state"] = "lost"
        row["error"] = (
            f"the process that ran it (pid {row['pid']} on {row['host']}) ended before the run "
            f"did: killed, or exited mid-run"
        )
    return row


@atexit.register
def _flush_all() -> None:  # a clean exit writes the last batch
    for store in list(_stores.values()):
        try:
            store.flush(2.0)
        except Exception:
            pass
