"""A run's progress as the task dashboard and the stage mapper draw it, kept up to date from the
event stream (never by polling the cluster, never by computing anything of the workflow)."""

from __future__ import annotations

import time
from collections import OrderedDict

from ..states import TASK_STATES, TERMINAL, advances, stage_state

COUNT_KEYS = ("done", "running", "failed", "queued", "cancelled")
_KEY_OF = {
    "finished": "done",
    "running": "running",
    "failed": "failed",
    "queued": "queued",
    "cancelled": "cancelled",
}


class RunTracker:
    """Per-task states of one run, and per-stage counts, timings, throughput and ETA.

    Seeded from the run's record when created (so a dashboard opened mid-run is right), then fed
    the run's task events; states only move forward, so out-of-order and repeated events are
    harmless.
    """

    def __init__(self, run, recent: int = 200):
        self.run = run
        self.uid = run.uid
        wf = run.definition
        self.stage_names = [s.name for s in wf.stages]
        self.types = {s.name: s.type for s in wf.stages}
        self.deps = {s.name: list(s.depends_on) for s in wf.stages}
        self.tasks: dict[tuple, dict] = {}
        self.counts = {s: dict.fromkeys(TASK_STATES, 0) for s in self.stage_names}
        self.first_start: dict[str, float] = {}
        self.last_end: dict[str, float] = {}
        self.recent: OrderedDict[tuple, float] = OrderedDict()
        self.recent_limit = recent
        self.failed: OrderedDict[tuple, str | None] = OrderedDict()
        self.cached: set[tuple] = set()  # tasks whose output the stage cache reused (counted as done)
        self._seed()

    def _seed(self) -> None:
        lock = getattr(self.run, "_lock", None)
        records = getattr(self.run, "_tasks", {})
        if lock is not None:
            with lock:
                rows = [dict(r) for r in records.values()]
        else:  # pragma: no cover
            rows = [dict(r) for r in records.values()]
        rows.sort(key=lambda r: r.get("end") or r.get("start") or r.get("queued") or 0)
        for r in rows:
            if r.get("state") is None:
                continue
            self._update(
                r["stage"],
                r["item"],
                r["state"],
                r.get("end") or r.get("start") or r.get("queued"),
                worker=r.get("worker"),
                error=r.get("error"),
                queued=r.get("queued"),
                start=r.get("start"),
                end=r.get("end"),
            )

    # --- feeding ---
    def apply(self, event) -> bool:
        """Take one TaskEvent of this run; True if anything changed."""
        if getattr(event, "kind", None) != "task" or event.run != self.uid:
            return False
        start = event.time if event.state == "running" else None
        end = event.time if event.state in TERMINAL else None
        queued = event.time if event.state == "queued" else None
        return self._update(
            event.stage,
            event.item,
            event.state,
            event.time,
            worker=event.worker,
            error=event.error,
            queued=queued,
            start=start,
            end=end,
        )

    def _update(
        self, stage, item, state, t, worker=None, error=None, queued=None, start=None, end=None
    ) -> bool:
        if stage not in self.counts:
            return False
        key = (stage, item)
        if state == "cached":  # an output the stage cache reused: done, like a finished task,
            state = "finished"  # and shown as cached (stage_counts' 'cached', the task's state)
            self.cached.add(key)
        row = self.tasks.get(key)
        if row is None:
            row = self.tasks[key] = {
                "stage": stage,
                "item": item,
                "state": None,
                "worker": None,
                "queued": None,
                "start": None,
                "end": None,
                "error": None,
            }
        changed = self._advance_state(stage, row, state)
        changed = _merge_details(row, worker, error, queued, start, end) or changed
        self._note_stage_span(stage, row)
        if row["state"] == "failed":
            self.failed[key] = row["error"]
        if changed:
            self.recent[key] = t or time.time()
            self.recent.move_to_end(key)
            while len(self.recent) > self.recent_limit:
                self.recent.popitem(last=False)
        return changed

    def _advance_state(self, stage, row: dict, state) -> bool:
        """Move the task to ``state`` if that is forward (counts follow); whether it moved."""
        old = row["state"]
        if state not in _KEY_OF or not advances(old, state) or old == state:
            return False
        if old is not None:
            self.counts[stage][old] -= 1
        self.counts[stage][state] += 1
        row["state"] = state
        return True

    def _note_stage_span(self, stage, row: dict) -> None:
        """The stage's first task start and last task end, as far as this task moves them."""
        if row["start"] is not None:
            first = self.first_start.get(stage)
            if first is None or row["start"] < first:
                self.first_start[stage] = row["start"]
        if (
            row["end"] is not None
            and row["state"] in ("finished", "failed")
            and row["end"] > self.last_end.get(stage, 0)
        ):
            self.last_end[stage] = row["end"]

    # --- reading ---
    @property
    def state(self) -> str:
        return self.run.state

    def stage_counts(self) -> dict:
        """{stage: {done, running, failed, queued, cancelled, total}} (the bars' values)."""
        return {stage: self.stage_counts_of(stage) for stage in self.counts}

    def stage_counts_of(self, stage: str) -> dict:
        """One stage's counts: done (cached included), running, failed, queued, cancelled, total,
        and cached (reused by the stage cache) when there are any."""
        c = self.counts[stage]
        row = {_KEY_OF[k]: v for k, v in c.items()}
        row["total"] = sum(c.values())
        cached = sum(1 for s, _ in self.cached if s == stage)
        if cached:  # only when the stage cache was used: the usual counts keep their shape
            row["cached"] = cached
        return row

    def stage_state(self, stage: str) -> str:
        """The stage's state by the one rule every view uses (``flowdapt_nb.states.stage_state``)."""
        return stage_state(
            self.counts[stage], run_state=self.run.state, failed_stage=self.run.failed_stage, stage=stage
        )

    def stage_states(self) -> dict:
        return {s: self.stage_state(s) for s in self.stage_names}

    def throughput(self, stage: str, now: float | None = None) -> float | None:
        """Finished tasks per second since the stage's first task started."""
        done = self.counts[stage]["finished"]
        first = self.first_start.get(stage)
        if not done or first is None:
            return None
        active = self.counts[stage]["queued"] + self.counts[stage]["running"]
        until = (now or time.time()) if active else self.last_end.get(stage, now or time.time())
        span = until - first
        return done / span if span > 0 else None

    def eta(self, stage: str, now: float | None = None) -> float | None:
        """Seconds until the stage's remaining tasks are done at its current throughput."""
        c = self.counts[stage]
        remaining = c["queued"] + c["running"]
        if not remaining:
            return 0.0 if c["finished"] + c["failed"] else None
        rate = self.throughput(stage, now)
        return remaining / rate if rate else None

    def elapsed(self, stage: str, now: float | None = None) -> float | None:
        first = self.first_start.get(stage)
        if first is None:
            return None
        c = self.counts[stage]
        if c["queued"] or c["running"]:
            return (now or time.time()) - first
        return self.last_end.get(stage, first) - first

    def mean_duration(self, stage: str) -> float | None:
        durations = [
            r["end"] - r["start"]
            for (s, _), r in self.tasks.items()
            if s == stage and r["state"] == "finished" and r["start"] and r["end"]
        ]
        return sum(durations) / len(durations) if durations else None

    def recent_tasks(self, limit: int = 10) -> list[dict]:
        """The tasks that changed most recently, newest first."""
        keys = list(self.recent)[-limit:][::-1]
        return [self._row(k) for k in keys]

    def failed_tasks(self) -> list[dict]:
        return [self._row(k) for k in self.failed]

    def _row(self, key) -> dict:
        r = self.tasks[key]
        duration = (r["end"] - r["start"]) if r["start"] and r["end"] else None
        state = "cached" if key in self.cached and r["state"] == "finished" else r["state"]
        return {
            "stage": r["stage"],
            "item": r["item"],
            "state": state,
            "worker": r["worker"],
            "start": r["start"],
            "end": r["end"],
            "duration": duration,
            "error": r["error"],
            "changed": self.recent.get(key),
        }

    def expected_tasks(self) -> int | None:
        """How many tasks the run will have, or None while a fan-out that hasn't started could
        still add any number (a stage not started yet counts one task if it is simple)."""
        expected = self.totals()["total"]
        for stage in self.stage_names:
            if not sum(self.counts[stage].values()) and not self.run.done:
                if self.types[stage] != "simple":
                    return None
                expected += 1
        return expected

    def totals(self) -> dict:
        out = dict.fromkeys(COUNT_KEYS, 0)
        for c in self.counts.values():
            for k, v in c.items():
                out[_KEY_OF[k]] += v
        out["total"] = sum(out[k] for k in COUNT_KEYS)
        return out


def _merge_details(row: dict, worker, error, queued, start, end) -> bool:
    """Fill in a task's worker, error and times from a report; whether anything shown changed
    (queued and end times alone do not count)."""
    changed = False
    if queued is not None and row["queued"] is None:
        row["queued"] = queued
    if start is not None and (row["start"] is None or start < row["start"]):
        row["start"] = start
        changed = True
    if end is not None and row["end"] is None:
        row["end"] = end
    if worker and row["worker"] != worker:
        row["worker"] = worker
        changed = True
    if error and row["error"] != error:
        row["error"] = error
        changed = True
    return changed


def task_label(stage: str, item) -> str:
    return f"{stage}[{item}]" if item is not None else stage


def traceback_of(run, stage: str, item) -> str | None:
    """The worker's traceback of a failed task: from ``run.failures`` (items dropped under
    allow_partial_failure), the run's StageError, or at least its error text from ``run.tasks``."""
    for f in run.failures:
        if f.get("stage") == stage and f.get("item") == item:
            return f.get("traceback") or f.get("error")
    exc = getattr(run, "exception", None)
    if exc is not None and getattr(exc, "stage", None) == stage and getattr(exc, "item", None) == item:
        cause = exc.__cause__ or exc
        tb = getattr(cause, "remote_traceback", None)
        if tb:
            return tb
        import traceback

        return "".join(traceback.format_exception(cause)).rstrip()
    lock = getattr(run, "_lock", None)
    records = getattr(run, "_tasks", {})
    if lock is not None:
        with lock:
            rec = dict(records.get((stage, item)) or {})
        if rec.get("error"):
            return rec["error"]
    return None
