"""The record of one workflow run, and the handle of a run in progress."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from .states import RUN_STATES, RUN_TERMINAL, TASK_STATES, TERMINAL, advances, stage_state  # noqa: F401

TASK_COLUMNS = ["stage", "item", "state", "worker", "queued", "start", "end", "duration", "error"]
PACK_OVER = 256  # an ended run with this many task rows or more may be packed (WorkflowRun._pack)


class Failure(dict):
    """An item dropped under ``allow_partial_failure``: ``stage``, ``item``, ``error``,
    ``error_type`` and ``traceback``, readable as keys or attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _ts(t: float | None):
    """A UTC datetime to the millisecond (microseconds are noise in a table)."""
    if t is None:
        return None
    stamp = datetime.fromtimestamp(t, tz=UTC)
    return stamp.replace(microsecond=stamp.microsecond // 1000 * 1000)


def _seconds(value: float | None) -> float | None:
    """A duration in seconds (float; to the microsecond, so a fast task is never 0)."""
    return None if value is None else round(value, 6)


def _new_row(stage: str, item: int | None, state: str | None = None, queued: float | None = None) -> dict:
    """A task's row in ``WorkflowRun.tasks``, before anything else is known of it."""
    return {
        "stage": stage,
        "item": item,
        "state": state,
        "worker": None,
        "queued": queued,
        "start": None,
        "end": None,
        "error": None,
    }


def stage_summaries(run, rows: list[dict] | None = None) -> list[dict]:
    """Per stage of ``run``, in workflow order: stage, type, state (``states.stage_state``), tasks,
    a count per task state (and 'cached'), start (first task start), end (last task end; Unix
    times) and duration (seconds, None while a task is still queued or running).

    ``rows`` are the run's task rows (a copy taken under its lock); read from ``run`` when None.
    ``WorkflowRun.stages`` and the run store both summarise stages with this."""
    if rows is None:
        with run._lock:
            rows = [dict(r) for r in run._tasks.values()]
    by_stage: dict[str, list[dict]] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    out = []
    for stage in run.definition.stages:
        mine = by_stage.get(stage.name, [])
        counts = dict.fromkeys((*TASK_STATES, "cached"), 0)
        for r in mine:
            if r["state"] in counts:
                counts[r["state"]] += 1
        starts = [r["start"] for r in mine if r["start"]]
        ends = [r["end"] for r in mine if r["end"]]
        begin, end = (min(starts) if starts else None), (max(ends) if ends else None)
        active = counts["queued"] + counts["running"]
        state = stage_state(counts, run_state=run.state, failed_stage=run.failed_stage, stage=stage.name)
        out.append(
            {
                "stage": stage.name,
                "type": stage.type,
                "state": state,
                "tasks": len(mine),
                **counts,
                "start": begin,
                "end": end,
                "duration": (end - begin) if begin and end and not active else None,
            }
        )
    return out


class WorkflowRun:
    """One run of a workflow: state, result, timings, and per-task records.

    ``state`` is one of pending, running, finished, failed, cancelled.
    """

    def __init__(self, workflow, input: dict | None, namespace: str, executor: str):
        self.uid = uuid.uuid4().hex
        self.workflow = workflow.name
        self.name = f"{workflow.name}-{self.uid[:8]}"
        self.definition = workflow
        self.input = dict(input or {})
        self.namespace = namespace
        self.executor = executor
        self.state = "pending"
        self.result: Any = None
        # ex.history keeps results up to its byte budget (history_bytes): an older run's record
        # there may have its result dropped (result None, result_dropped True, result_note says why)
        self.result_dropped = False
        self.result_note: str | None = None
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.failed_stage: str | None = None
        self._started: float | None = None
        self._finished: float | None = None
        self._task_rows: dict[tuple, dict] = {}  # (stage, item) -> row; read through _tasks
        self._packed: tuple[bytes, bytes] | None = None  # the rows as a task log, once packed
        self._log_offer: tuple | None = None  # (row count, columns, times) the run store encoded
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        self._pack_lock = threading.Lock()  # taken after _lock when both are
        self._event_lock = threading.RLock()  # record + publish as one step: events stay in order

    # --- timings ---
    @property
    def started_at(self) -> datetime | None:
        return _ts(self._started)

    @property
    def finished_at(self) -> datetime | None:
        return _ts(self._finished)

    @property
    def duration(self) -> float | None:
        if self._started is None:
            return None
        return (self._finished or time.time()) - self._started

    @property
    def done(self) -> bool:
        return self.state in RUN_TERMINAL

    # --- task rows ---
    @property
    def _tasks(self) -> dict[tuple, dict]:
        """The task rows by (stage, item); a packed run's rows come back from their log first.
        Read before the check: ``_pack`` sets ``_packed`` before it empties ``_task_rows``, so a
        reader racing it gets the full rows either way."""
        rows = self._task_rows
        return rows if self._packed is None else self._unpack()

    def _unpack(self) -> dict[tuple, dict]:
        from .task_log import decode_task_log

        with self._pack_lock:
            if self._packed is not None:
                rows = decode_task_log(*self._packed)
                self._task_rows = {(r["stage"], r["item"]): r for r in rows}
                # the log still matches the rows: a later _pack reuses it unless a row changes
                self._log_offer = (len(rows), *self._packed)
                self._packed = None
            return self._task_rows

    def _pack(self) -> bool:
        """Keep an ended run's task rows as their task log (``task_log``): two byte strings
        instead of a dict per task, which every full pass of the garbage collector looked
        through for as long as the run stayed in ``ex.history`` (100 runs of 5,000 tasks: ~20 ms
        a pass, a third of a later tiny run's time, and ~250 MB). Reading ``tasks`` unpacks
        them. Uses the log the run store encoded when it has one. True if packed now."""
        from .task_log import encode_task_log

        with self._lock, self._pack_lock:
            rows = self._task_rows
            if self._packed is not None or not self.done or len(rows) < PACK_OVER:
                return False
            offer, self._log_offer = self._log_offer, None
            if offer is not None and offer[0] == len(rows):
                log = offer[1], offer[2]
            else:
                try:
                    log = encode_task_log(list(rows.values()))
                except Exception:  # rows the log can't hold (an item that isn't an int): kept
                    return False
            self._packed, self._task_rows = log, {}
            return True

    def _offer_log(self, n_rows: int, columns: bytes, times: bytes) -> None:
        """The run store encoded this ended run's rows (under ``_lock``): ``_pack`` takes that
        log instead of encoding them again, unless a row changed since (a late worker report:
        every update drops the offer)."""
        if n_rows >= PACK_OVER and self.done:
            self._log_offer = (n_rows, columns, times)

    def _rows_to_change(self) -> dict[tuple, dict]:
        """The task rows, for an update under ``_lock``. The log offered for packing no longer
        matches them, so the offer goes, after the read: an unpack (which offers its own log)
        can't happen once the rows are read, so no stale offer is left behind."""
        tasks = self._task_rows if self._packed is None else self._unpack()
        self._log_offer = None
        return tasks

    # --- updates from the engine ---
    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        if state == "running" and self._started is None:
            self._started = time.time()
        if state in RUN_TERMINAL:
            self._finished = time.time()
        if error:
            self.error = error

    def _queue_tasks(self, stage: str, items: list, time_: float) -> list:
        """Rows for a stage's new tasks, all queued at ``time_``; returns the items that were new."""
        new = []
        with self._lock:
            tasks = self._rows_to_change()
            for item in items:
                if (stage, item) not in tasks:
                    tasks[(stage, item)] = _new_row(stage, item, state="queued", queued=time_)
                    new.append(item)
        return new

    def _finish_tasks(self, stage: str, done: list) -> list:
        """Mark (item, Outcome) pairs finished, with their workers' timings; returns (item,
        outcome, ran) for each row that became finished now, ``ran`` when it went straight from
        queued (its 'running' is implied)."""
        reached = []
        with self._lock:
            tasks = self._rows_to_change()
            for item, outcome in done:
                row = tasks.get((stage, item))
                if row is not None and row["state"] == "queued":
                    row["state"], row["worker"] = "finished", outcome.worker
                    row["start"], row["end"] = outcome.start or outcome.end, outcome.end
                    reached.append((item, outcome, True))
                elif self._record_locked(
                    stage, item, "finished", outcome.end, outcome.worker, start=outcome.start, end=outcome.end
                ):
                    reached.append((item, outcome, False))
        return reached

    def _advance(
        self,
        stage: str,
        item: int | None,
        state: str,
        time_: float,
        worker=None,
        error=None,
        start=None,
        end=None,
    ) -> tuple:
        """A task ended (or started): the states it newly reached, in order. A task that ends while
        still queued (its worker's 'running' report not in yet, or never sent) reaches 'running'
        first, at its worker's start time."""
        with self._lock:
            row = (self._task_rows if self._packed is None else self._tasks).get((stage, item))
            ran = (
                state in ("finished", "failed")
                and row is not None
                and row["state"] == "queued"
                and self._record_locked(stage, item, "running", start or time_, worker)
            )
            now = self._record_locked(stage, item, state, time_, worker, error, start, end)
        return ("running", state) if ran and now else ("running",) if ran else (state,) if now else ()

    def _record(
        self,
        stage: str,
        item: int | None,
        state: str | None,
        time_: float,
        worker=None,
        error=None,
        start=None,
        end=None,
    ) -> bool:
        """Update a task's row; ``state=None`` updates timings only. True if the state advanced."""
        with self._lock:
            return self._record_locked(stage, item, state, time_, worker, error, start, end)

    def _record_locked(
        self, stage, item, state, time_, worker=None, error=None, start=None, end=None
    ) -> bool:
        tasks = self._rows_to_change()
        row = tasks.get((stage, item))
        if row is None:
            row = tasks[(stage, item)] = _new_row(stage, item)
        if state == "queued" and row["queued"] is None:
            row["queued"] = time_
        if state == "running" and row["start"] is None:
            row["start"] = time_
        if start is not None:
            row["start"] = start
        if end is not None:
            row["end"] = end
        elif state in TERMINAL and row["end"] is None:
            row["end"] = time_
        if worker:
            row["worker"] = worker
        if error:
            row["error"] = error
        if state is not None and state != row["state"] and advances(row["state"], state):
            row["state"] = state
            return True
        return False

    def _task_worker(self, stage: str, item: int | None) -> str | None:
        with self._lock:
            row = self._tasks.get((stage, item))
            return row["worker"] if row else None

    def _add_failure(self, stage: str, item: int | None, exc: BaseException) -> None:
        self._failures.append(
            Failure(
                stage=stage,
                item=item,
                error=f"{type(exc).__name__}: {exc}",
                error_type=type(exc).__name__,
                traceback=getattr(exc, "remote_traceback", None),
                exception=exc,
            )
        )

    # --- tables ---
    @property
    def failures(self) -> list[Failure]:
        """Items dropped under allow_partial_failure (never silently)."""
        return list(self._failures)

    @property
    def tasks(self):
        """pandas DataFrame, one row per task: stage, item, state, worker, queued, start, end
        (UTC datetimes to the millisecond), duration (seconds), error."""
        import pandas as pd

        with self._lock:
            rows = [dict(r) for r in self._tasks.values()]
        for r in rows:
            r["duration"] = _seconds(r["end"] - r["start"]) if r["start"] and r["end"] else None
            for k in ("queued", "start", "end"):
                r[k] = _ts(r[k])
        frame = pd.DataFrame(rows, columns=TASK_COLUMNS)
        frame["item"] = frame["item"].astype("Int64")
        return frame

    @property
    def stages(self):
        """pandas DataFrame, one row per stage: state (``states.stage_state``), task counts, started and
        finished_at (UTC datetimes), duration (seconds), throughput (finished tasks per second)."""
        import pandas as pd

        out = []
        for s in stage_summaries(self):
            begin, finish, duration = s.pop("start"), s.pop("end"), _seconds(s.pop("duration"))
            active = s["queued"] + s["running"]
            out.append(
                {
                    **s,
                    "started": _ts(begin),
                    "finished_at": _ts(finish) if not active else None,
                    "duration": duration,
                    "throughput": (s["finished"] / duration) if duration else None,
                }
            )
        return pd.DataFrame(out)

    # --- display ---
    def summary(self) -> dict:
        return {
            "uid": self.uid,
            "name": self.name,
            "workflow": self.workflow,
            "state": self.state,
            "executor": self.executor,
            "namespace": self.namespace,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration": self.duration,
            "error": self.error,
            "failures": len(self._failures),
        }

    def __repr__(self) -> str:
        dur = f"{self.duration:.2f}s" if self.duration is not None else "-"
        extra = f", error={self.error!r}" if self.error else ""
        fails = f", {len(self._failures)} dropped item(s)" if self._failures else ""
        return f"<WorkflowRun {self.name} {self.state} on {self.executor} in {dur}{fails}{extra}>"

    def _repr_html_(self) -> str:
        from .render import run_html

        return run_html(self)


class RunHandle:
    """A run in progress, returned by ``ex.submit``: ``wait``, ``cancel``, ``done``, ``run``."""

    def __init__(self, run: WorkflowRun, executor):
        self.run = run
        self._executor = executor
        self._finished = threading.Event()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> bool:
        """Ask the run to stop; its remote tasks are cancelled. True if it was still going."""
        if self.done():
            return False
        self._cancel.set()
        return True

    def wait(self, timeout: float | None = None) -> WorkflowRun:
        """Block until the run ends; raise StageError if a stage failed, ExecutorClosedError if
        the executor was closed under it, TimeoutError if ``timeout`` passes first (the run
        goes on)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"run {self.run.name} still {self.run.state} after {timeout} s")
        run = self.run
        # a failed run, or one cancelled by close() (a user's cancel leaves no exception)
        if run.state in ("failed", "cancelled") and run.exception is not None:
            raise run.exception
        return run

    def __repr__(self) -> str:
        return f"<RunHandle {self.run.name} {self.run.state}>"

    def _repr_html_(self) -> str:
        return self.run._repr_html_()
