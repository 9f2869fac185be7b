"""A small live progress view of one run: a display handle redrawn from the executor's event
stream (at most ~10 times a second), HTML for notebooks and one text line for everything else.

It needs no ipywidgets: ``update_display`` messages land in place from any thread.
"""

from __future__ import annotations

import html
import threading

from ..render import STATE_COLOURS

_COUNTED = ("queued", "running", "finished", "failed", "cancelled")


def stage_counts(run) -> list[tuple[str, str, dict]]:
    """(stage, type, {state: count}) per stage, from the run's stage table."""
    return [(row["stage"], row["type"], {s: int(row[s]) for s in _COUNTED})
            for row in run.stages.to_dict("records")]


def progress_text(run) -> str:
    """One line: run name, state, and done/total tasks per stage."""
    dur = f" {run.duration:.1f}s" if run.duration is not None else ""
    parts = []
    for name, _, c in stage_counts(run):
        total = sum(c.values())
        extra = "".join(f" {c[s]} {s}" for s in ("running", "failed", "cancelled") if c[s])
        parts.append(f"{name} {c['finished']}/{total}{extra}")
    return f"{run.name} [{run.state}{dur}] " + ", ".join(parts)


def progress_html(run) -> str:
    """One bar per stage, coloured by task state, with the run's state and time."""
    dur = f"{run.duration:.1f} s" if run.duration is not None else ""
    colour = STATE_COLOURS.get(run.state, "#757575")
    rows = []
    for name, kind, c in stage_counts(run):
        total = sum(c.values())
        segs = "".join(f'<div title="{s}: {c[s]}" style="width:{100 * c[s] / total:.1f}%;'
                       f'background:{STATE_COLOURS[s]}"></div>' for s in _COUNTED if total and c[s])
        rows.append(f'<tr><td style="padding:0 8px 0 0">{html.escape(name)}{" [*]" if kind == "parameterized" else ""}'
                    f'</td><td><div style="display:flex;width:220px;height:10px;background:#eceff1;'
                    f'border-radius:2px;overflow:hidden">{segs}</div></td>'
                    f'<td style="padding:0 0 0 8px">{c["finished"]}/{total}'
                    + "".join(f" &middot; {c[s]} {s}" for s in ("running", "failed", "cancelled") if c[s])
                    + "</td></tr>")
    error = f'<div style="color:#e53935">{html.escape(run.error)}</div>' if run.error else ""
    return (f'<div class="flowdapt-progress"><b>{html.escape(run.name)}</b> '
            f'<span style="color:{colour}">{html.escape(run.state)}</span> {dur}'
            f'<table style="border-collapse:collapse">{"".join(rows)}</table>{error}</div>')


class RunProgress:
    """Shows a run's progress under the cell and keeps it current until the run ends.

    >>> p = RunProgress(executor, handle); ...; p.finish()     # doctest: +SKIP
    """

    def __init__(self, executor, handle):
        from IPython.display import display
        self.run = handle.run
        self._events = executor.events
        self._lock = threading.Lock()
        self._done = False
        self._display = display(self._bundle(), raw=True, display_id=True)
        self._token = executor.events.subscribe(self._on_events, kinds={"task", "run"}, throttle=0.1)

    def _bundle(self) -> dict:
        return {"text/plain": progress_text(self.run), "text/html": progress_html(self.run)}

    def _on_events(self, batch) -> None:
        uid = self.run.uid
        mine = [e for e in batch if e.run == uid]
        if not mine:
            return
        ended = any(e.kind == "run" and e.state in ("finished", "failed", "cancelled") for e in mine)
        self._redraw(final=ended)

    def _redraw(self, final: bool = False) -> None:
        with self._lock:
            if self._done:
                return
            if final:
                self._done = True
                self._events.unsubscribe(self._token)
            self._display.update(self._bundle(), raw=True)

    def finish(self) -> None:
        """Draw the final state and stop listening (safe to call more than once)."""
        self._redraw(final=True)
