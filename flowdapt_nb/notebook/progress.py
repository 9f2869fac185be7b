"""A small live progress view of one run: a display handle redrawn from the executor's event
stream (at most ~10 times a second), HTML for notebooks and one text line for everything else.

It needs no ipywidgets: ``update_display`` messages land in place from any thread.
"""

from __future__ import annotations

import html
import sys
import threading
import time

from ..states import COLOURS as STATE_COLOURS  # the one state model

_COUNTED = ("queued", "running", "finished", "failed", "cancelled")


def stage_counts(run) -> list[tuple[str, str, dict]]:
    """(stage, type, {state: count}) per stage, from the run's stage table."""
    return [
        (row["stage"], row["type"], {s: int(row[s]) for s in _COUNTED})
        for row in run.stages.to_dict("records")
    ]


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
        segs = "".join(
            f'<div title="{s}: {c[s]}" style="width:{100 * c[s] / total:.1f}%;'
            f'background:{STATE_COLOURS[s]}"></div>'
            for s in _COUNTED
            if total and c[s]
        )
        rows.append(
            f'<tr><td style="padding:0 8px 0 0">{html.escape(name)}{" [*]" if kind == "parameterized" else ""}'
            f'</td><td><div style="display:flex;width:220px;height:10px;background:#eceff1;'
            f'border-radius:2px;overflow:hidden">{segs}</div></td>'
            f'<td style="padding:0 0 0 8px">{c["finished"]}/{total}'
            + "".join(f" &middot; {c[s]} {s}" for s in ("running", "failed", "cancelled") if c[s])
            + "</td></tr>"
        )
    error = f'<div style="color:#e53935">{html.escape(run.error)}</div>' if run.error else ""
    return (
        f'<div class="flowdapt-progress" data-state="{html.escape(run.state)}"><b>{html.escape(run.name)}'
        f'</b> <span class="fnb-progress-state" style="color:{colour}">{html.escape(run.state)}</span> '
        f'<span class="fnb-progress-elapsed">{dur}</span>'
        f'<table style="border-collapse:collapse">{"".join(rows)}</table>{error}</div>'
    )


class RunProgress:
    """Shows a run's progress under the cell and keeps it current until the run ends: redrawn
    on the run's task events, and every ``tick`` seconds so its elapsed time moves while no
    task changes (a cold Ray start, one long task). A thread does the redrawing, so it stays
    live after the cell returns (a ``--background`` run).

    >>> p = RunProgress(executor, handle); ...; p.finish()     # doctest: +SKIP
    """

    def __init__(self, executor, handle, tick: float = 0.5):
        from IPython.display import display

        self.run = handle.run
        self._events = executor.events
        self._lock = threading.Lock()
        self._done = False
        self._token = None
        self.redraws = 0
        self._display = display(self._bundle(), raw=True, display_id=True)
        if self.run.done:  # ended already: the drawing above is the final one
            self._done = True
            return
        self._token = executor.events.subscribe(self._on_events, kinds={"task", "run"}, throttle=0.1)
        self._stop = threading.Event()
        self._ticker = threading.Thread(
            target=self._tick, args=(tick,), name="flowdapt-nb-progress", daemon=True
        )
        self._ticker.start()

    def _bundle(self) -> dict:
        return {"text/plain": progress_text(self.run), "text/html": progress_html(self.run)}

    def _on_events(self, batch) -> None:
        uid = self.run.uid
        mine = [e for e in batch if e.run == uid]
        if not mine:
            return
        ended = any(e.kind == "run" and e.state in ("finished", "failed", "cancelled") for e in mine)
        self._redraw(final=ended)

    def _tick(self, tick: float) -> None:
        while not self._stop.wait(tick):
            self._redraw(final=self.run.done)  # also the last drawing if the end event was missed
            if self._done:
                return

    def _redraw(self, final: bool = False, again: bool = False) -> None:
        with self._lock:
            if self._done and not again:
                return
            if final and not self._done:
                self._done = True
                self._stop.set()
                if self._token is not None:
                    self._events.unsubscribe(self._token)
            try:
                self._display.update(self._bundle(), raw=True)
                self.redraws += 1
            except Exception:  # the front end went away: the run goes on regardless
                pass

    @property
    def live(self) -> bool:
        """True while it still redraws (the run has not ended)."""
        return not self._done

    def finish(self) -> None:
        """Draw the final state and stop listening (safe to call more than once). Drawn again
        even when a listening thread drew it already: the kernel may send a thread's update
        under another cell's header (ipykernel 7 keeps a parent per context), and a blocking
        run's cell must end with its own final drawing."""
        self._redraw(final=True, again=True)


def show_live_handle(handle) -> None:
    """How a RunHandle shows in a kernel: its progress, live until the run ends (a
    ``--background`` run's cell output moves with the run, not a snapshot of its start)."""
    RunProgress(handle._executor, handle)


def register_live_handles(shell) -> None:
    """Make RunHandles display as live progress in this kernel (idempotent)."""
    from ..run import RunHandle

    shell.display_formatter.ipython_display_formatter.for_type(RunHandle, show_live_handle)


# --- an executor starting ----------------------------------------------------------------------


def start_phase(executor) -> str:
    """What a starting executor is doing now, read from what it has set up so far."""
    told = getattr(executor, "start_phase", None)  # an executor may say so itself
    if told:
        return str(told)
    kind = executor.kind
    address = getattr(executor.config, "cluster_address", None)
    if kind == "ray":
        ray = sys.modules.get("ray")
        up = ray is not None and ray.is_initialized()
        if not up:
            if not executor.owns_cluster:
                return f"connecting to the Ray cluster at {address}"
            dashboard = ", dashboard" if getattr(executor.config, "include_dashboard", False) else ""
            return f"starting the Ray node (GCS, raylet{dashboard})"
        return "starting cluster memory and the event sink (Ray actors)"
    if kind == "dask":
        if getattr(executor, "client", None) is None:
            if not executor.owns_cluster:
                return f"connecting to the Dask scheduler at {address}"
            if getattr(executor, "cluster", None) is None:
                return "starting the Dask scheduler, its dashboard and the workers"
            return "connecting the client to the new cluster"
        return "starting cluster memory (a Dask actor)"
    if getattr(executor.config, "use_processes", False):
        return "starting the cluster memory process and the worker pool"
    return "starting the worker pool"


class StartProgress:
    """While ``executor.start()`` runs: what is happening and how long it has taken, redrawn by
    a thread every ``tick`` seconds; ``finish(replacement)`` then puts the executor's card in
    its place (or says the start failed).

    >>> feedback = StartProgress(ex); ex.start(); feedback.finish(card)   # doctest: +SKIP
    """

    def __init__(self, executor, tick: float = 0.25):
        from IPython.display import display

        self.executor = executor
        self.started = time.monotonic()
        self.steps: list[list] = []  # [phase, seconds since start when it began]
        self._lock = threading.Lock()
        self._done = False
        self.redraws = 0
        self._note_phase()
        self._display = display(self._bundle(), raw=True, display_id=True)
        self._stop = threading.Event()
        self._ticker = threading.Thread(
            target=self._tick, args=(tick,), name="flowdapt-nb-starting", daemon=True
        )
        self._ticker.start()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _note_phase(self) -> None:
        try:
            phase = start_phase(self.executor)
        except Exception:  # a half-made executor: keep the last phase
            return
        if not self.steps or self.steps[-1][0] != phase:
            self.steps.append([phase, self.elapsed])

    def _tick(self, tick: float) -> None:
        while not self._stop.wait(tick):
            with self._lock:
                if self._done:
                    return
                self._note_phase()
                try:
                    self._display.update(self._bundle(), raw=True)
                    self.redraws += 1
                except Exception:
                    pass

    def text(self) -> str:
        kind = self.executor.kind.capitalize()
        now = self.elapsed
        lines = [f"Starting the {kind} executor… {now:.1f} s"]
        for i, (phase, began) in enumerate(self.steps):
            ended = self.steps[i + 1][1] if i + 1 < len(self.steps) else None
            lines.append(
                f"  {'✓' if ended is not None else '…'} {phase} "
                f"({(ended if ended is not None else now) - began:.1f} s)"
            )
        return "\n".join(lines)

    def html(self) -> str:
        kind = self.executor.kind.capitalize()
        now = self.elapsed
        rows = []
        for i, (phase, began) in enumerate(self.steps):
            ended = self.steps[i + 1][1] if i + 1 < len(self.steps) else None
            mark, colour = ("✓", "#43a047") if ended is not None else ("…", "#1e88e5")
            rows.append(
                f'<div class="fnb-start-step" style="color:{colour}">{mark} {html.escape(phase)} '
                f'<span style="color:#6a737d">{(ended if ended is not None else now) - began:.1f} s'
                f"</span></div>"
            )
        return (
            f'<div class="fnb-start" data-kind="{html.escape(self.executor.kind)}" style="border:1px solid '
            f'#e0e3e7;border-radius:8px;padding:8px 12px;max-width:640px"><b>Starting the {kind} executor…'
            f'</b> <span class="fnb-start-elapsed" style="font-variant-numeric:tabular-nums">{now:.1f} s'
            f"</span>{''.join(rows)}</div>"
        )

    def _bundle(self) -> dict:
        return {"text/plain": self.text(), "text/html": self.html()}

    def finish(self, replacement=None, error: str | None = None) -> None:
        """Stop ticking; show ``replacement`` (the executor's card) in its place, or the error."""
        with self._lock:
            if self._done:
                return
            self._done = True
            self._stop.set()
            took = self.elapsed
            try:
                if error is not None:
                    kind = self.executor.kind.capitalize()
                    self._display.update(
                        {
                            "text/plain": f"The {kind} executor did not start ({took:.1f} s): {error}",
                            "text/html": f'<div class="fnb-start fnb-start-failed" style="color:#c62828">'
                            f"The {kind} executor did not start ({took:.1f} s): "
                            f"{html.escape(error)}</div>",
                        },
                        raw=True,
                    )
                elif replacement is not None:
                    self._display.update(replacement)
                else:
                    self._display.update({"text/plain": ""}, raw=True)
            except Exception:
                pass
        self.took = took
