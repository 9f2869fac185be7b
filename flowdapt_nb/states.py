"""The one model of task, stage and run states: the names, which are terminal, the order they move
in, their colours, and the rule that decides a stage's state from its tasks.

The run record (``run.py``), the dashboards' tracker, the progress line and the DAG all read this
module, so they can never disagree about what "running" or "failed" means.
"""

from __future__ import annotations

from enum import Enum


class TaskState(str, Enum):
    """A task's state. Tasks only move forward: queued -> running -> one terminal state."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CACHED = "cached"  # a result reused without running (counted as done)

    def __str__(self) -> str:
        return self.value


TASK_STATES = ("queued", "running", "finished", "failed", "cancelled")  # what tables count, in order
TERMINAL = frozenset({"finished", "failed", "cancelled", "cached"})
ACTIVE = frozenset({"queued", "running"})
# A stage is also "pending" (no task yet) or "skipped" (the run ended before it was reached).
STAGE_STATES = ("pending", "queued", "running", "finished", "failed", "cancelled", "skipped")
RUN_STATES = ("pending", "running", "finished", "failed", "cancelled")
RUN_TERMINAL = frozenset({"finished", "failed", "cancelled"})

_RANK = {"queued": 0, "running": 1, "finished": 2, "cached": 2, "failed": 3, "cancelled": 4}

COLOURS = {
    "pending": "#9e9e9e",
    "queued": "#b0bec5",
    "running": "#1e88e5",
    "finished": "#43a047",
    "cached": "#43a047",
    "done": "#43a047",
    "failed": "#e53935",
    "cancelled": "#fb8c00",
    "skipped": "#bdbdbd",
    "stopping": "#fb8c00",
    "stopped": "#757575",
    "starting": "#1e88e5",
}
UNKNOWN_COLOUR = "#757575"


def colour(state) -> str:
    """The colour every view uses for ``state`` (a task, stage, run or executor state)."""
    return COLOURS.get(str(state) if state is not None else "pending", UNKNOWN_COLOUR)


def text_colour(state) -> str:
    """Readable text on ``colour(state)``: dark on the pale greys, white on the rest."""
    return "#263238" if str(state) in ("pending", "queued", "skipped") or state is None else "#ffffff"


def advances(old, new) -> bool:
    """True if a task in state ``old`` may move to ``new``: events arrive out of order (worker vs
    driver), and states only move forward."""
    return old is None or _RANK[str(new)] >= _RANK[str(old)]


def is_terminal(state) -> bool:
    return str(state) in TERMINAL


def stage_state(
    counts: dict, *, run_state: str, failed_stage: str | None = None, stage: str | None = None
) -> str:
    """A stage's state from its tasks' counts (``{task state: n}``) and its run's state.

    No task yet: pending while the run goes, skipped (or cancelled) once it ended. Any task queued
    or running: running once one has started or finished, else queued. Otherwise failed (when
    this stage failed the run, or no task finished), cancelled, or finished.
    """
    n = {s: int(counts.get(s, 0) or 0) for s in (*TASK_STATES, "cached")}
    finished = n["finished"] + n["cached"]
    if not sum(n.values()):
        if run_state in RUN_TERMINAL:
            return "cancelled" if run_state == "cancelled" else "skipped"
        return "pending"
    if n["queued"] or n["running"]:
        return "running" if n["running"] or finished else "queued"
    if n["failed"] and ((stage is not None and failed_stage == stage) or not finished):
        return "failed"
    if n["cancelled"]:
        return "cancelled"
    return "finished"
