"""Live progress of a ``flowdapt-nb run`` on stderr, from the executor's event feed.

The numbers come from ``RunTracker``, the model the notebook's task dashboard draws: the run's
task events (never polling the cluster). Three views:

- ``BarView`` (a terminal): a table redrawn in place by ``rich`` (one row per stage: a bar,
  done/total, running, failed, throughput, elapsed, ETA, state), the executor's kind and
  dashboard URL above it, and the stages' output printed above the table.
- ``PlainView`` (a log file, CI): one line each time a stage changes state, and one summary line
  at most every ``SUMMARY_EVERY`` seconds while the run goes.
- ``QuietView`` (``--progress none``): only the stages' output.

The CLI's main thread calls ``tick()`` a few times a second; the feed only collects events in
the publishing thread, so drawing never slows the engine.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.live import Live

SUMMARY_EVERY = 5.0  # seconds between plain summary lines
TICK = 0.1  # seconds between the main thread's redraws


def seconds_text(value: float | None) -> str:
    """12.3s, 4m05s, 1h02m: short and fixed in meaning."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def rate_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}/s" if value >= 100 else f"{value:.3g}/s"


def executor_line(executor) -> str:
    """The executor's kind, where it is, and its dashboard: the progress view's first line."""
    kind = executor.kind
    try:
        info = executor.info()
    except Exception:  # a line of text is never worth failing the run over
        info = {}
    parts = [f"{kind} executor"]
    config = executor.config
    if kind == "local":
        mode = "processes" if getattr(config, "use_processes", False) else "threads"
        parts.append(f"({mode}, {getattr(config, 'cpus', '?')} CPUs)")
    elif info.get("address"):
        parts.append(f"at {info['address']}")
    url = info.get("dashboard_url")
    parts.append(f"- dashboard: {url}" if url else "- no dashboard")
    return " ".join(parts)


class RunFeed:
    """A run's task events collected from the executor's event bus and applied, when asked, to a
    ``RunTracker``: the per-stage counts, throughput and ETA the task dashboard shows."""

    def __init__(self, executor):
        self._events = executor.events
        self._lock = threading.Lock()
        self._pending: list = []
        self.tracker = None
        self._token = executor.events.subscribe(self._collect, kinds={"task", "run"})

    def _collect(self, event) -> None:
        with self._lock:
            self._pending.append(event)

    def follow(self, run) -> None:
        """Track ``run`` (seeded from its record, so nothing before this is lost)."""
        from .widgets._tracker import RunTracker

        self.tracker = RunTracker(run)
        self.update()

    def update(self) -> bool:
        """Apply the events that came in; True if a task changed."""
        with self._lock:
            batch, self._pending = self._pending, []
        if self.tracker is None:
            with self._lock:
                self._pending[:0] = batch
            return False
        changed = False
        for event in batch:
            changed = self.tracker.apply(event) or changed
        return changed

    def close(self) -> None:
        self._events.unsubscribe(self._token)

    def rows(self, now: float | None = None) -> list[dict]:
        """One row per stage: name, state, done, total, running, failed, rate, elapsed, eta."""
        t = self.tracker
        now = now or time.time()
        counts = t.stage_counts()
        out = []
        for stage in t.stage_names:
            c = counts[stage]
            out.append(
                {
                    "stage": stage,
                    "state": t.stage_state(stage),
                    "done": c["done"],
                    "total": c["total"],
                    "running": c["running"],
                    "failed": c["failed"],
                    "cancelled": c["cancelled"],
                    "rate": t.throughput(stage, now) if c["total"] > 1 else None,
                    "elapsed": t.elapsed(stage, now),
                    "eta": t.eta(stage, now),
                }
            )
        return out


def stage_line(row: dict) -> str:
    """``square: running 3/10 done, 2 running, 0 failed, 1.5/s, elapsed 2.0s, ETA 4.7s``"""
    total = row["total"] if row["total"] else "-"
    text = (
        f"{row['stage']}: {row['state']} {row['done']}/{total} done, {row['running']} running, "
        f"{row['failed']} failed"
    )
    if row["cancelled"]:
        text += f", {row['cancelled']} cancelled"
    if row["rate"] is not None:
        text += f", {rate_text(row['rate'])}"
    if row["elapsed"] is not None:
        text += f", elapsed {seconds_text(row['elapsed'])}"
        if row["state"] in ("running", "queued"):
            text += f", ETA {seconds_text(row['eta'])}"
    return text


def header_line(executor, workflow) -> str:
    return f"flowdapt-nb: workflow '{workflow.name}' on the {executor_line(executor)}"


def end_line(run) -> str:
    """``run squares-1a2b3c4d finished in 2.1s: 8 tasks, 8 done``"""
    totals = {"finished": 0, "failed": 0, "cancelled": 0}
    with run._lock:
        for row in run._tasks.values():
            if row["state"] in totals:
                totals[row["state"]] += 1
    counted = ", ".join(
        f"{n} {name}"
        for name, n in (
            ("done", totals["finished"]),
            ("failed", totals["failed"]),
            ("cancelled", totals["cancelled"]),
        )
        if n or name == "done"
    )
    took = f" in {seconds_text(run.duration)}" if run.duration is not None else ""
    return f"run {run.name} {run.state}{took}: {counted}"


class QuietView:
    """``--progress none``: no progress, only what the stages print."""

    def __init__(self):
        self.stream = None
        self.feed: RunFeed | None = None
        self._waiting: list[str] = []
        self._out_lock = threading.Lock()

    # --- lifecycle, called by the CLI ---
    def open(self, stream, executor, workflow) -> None:
        """Start showing: ``stream`` is the real stderr, ``executor`` is started."""
        with self._out_lock:
            self.stream = stream
            waiting, self._waiting = self._waiting, []
        for line in waiting:
            self.output_line(line)
        self.executor = executor
        self.workflow = workflow
        self.feed = RunFeed(executor)
        self.started = time.monotonic()

    def follow(self, run) -> None:
        self.run = run
        assert self.feed is not None, "open() comes before follow()"
        self.feed.follow(run)
        self.opened()

    def opened(self) -> None:
        """The run is known: draw the first state."""

    def tick(self) -> None:
        """Redraw from the events that came in (the main thread, a few times a second)."""

    def wait_quiet(self, quiet: float, limit: float) -> None:
        """Wait until no output line came for ``quiet`` seconds (at most ``limit`` seconds): Ray
        forwards what workers print from their log files a moment later, and stopping the
        cluster at once would lose a run's last lines."""
        end = time.monotonic() + limit
        first = time.monotonic()
        while time.monotonic() < end:
            since = time.monotonic() - max(self.last_output, first)
            if since >= quiet:
                return
            time.sleep(min(quiet - since, 0.05) + 0.001)

    def close(self) -> None:
        """The run ended: draw the last state and stop listening."""
        if self.feed is not None:
            self.feed.close()

    # --- text ---
    last_output = 0.0  # time.monotonic() of the last line printed through output_line

    def output_line(self, line: str) -> None:
        """A line a stage (or anything in the run) printed."""
        self.last_output = time.monotonic()
        with self._out_lock:
            if self.stream is None:
                self._waiting.append(line)
                return
            self._write(line)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message of ours (interrupted, stopping...)."""
        self.output_line(text)


class PlainView(QuietView):
    """Not a terminal: a line per stage change, a summary line at most every SUMMARY_EVERY s."""

    def open(self, stream, executor, workflow) -> None:
        super().open(stream, executor, workflow)
        self.note(header_line(executor, workflow))

    def opened(self) -> None:
        self._states: dict[str, str] = {}
        self._last_summary = time.monotonic()
        self.tick()

    def _stamp(self) -> str:
        return f"[{seconds_text(time.monotonic() - self.started):>6}]"

    def tick(self) -> None:
        if self.feed is None or self.feed.tracker is None:
            return
        self.feed.update()
        rows = self.feed.rows()
        for row in rows:
            if self._states.get(row["stage"]) != row["state"]:
                self._states[row["stage"]] = row["state"]
                if row["state"] != "pending":
                    self.note(f"{self._stamp()} {stage_line(row)}")
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_EVERY and not self.run.done:
            self._last_summary = now
            parts = []
            for row in rows:
                total = row["total"] or "-"
                extra = (
                    f" ({row['running']} running"
                    + (f", {row['failed']} failed" if row["failed"] else "")
                    + (
                        f", {rate_text(row['rate'])}, ETA {seconds_text(row['eta'])}"
                        if row["state"] == "running"
                        else ""
                    )
                    + ")"
                )
                parts.append(
                    f"{row['stage']} {row['done']}/{total}" + (extra if row["state"] == "running" else "")
                )
            self.note(f"{self._stamp()} {self.run.name} running: " + ", ".join(parts))

    def close(self) -> None:
        if self.feed is not None and self.feed.tracker is not None:
            self.tick()
            self.note(f"{self._stamp()} {end_line(self.run)}")
        super().close()


class BarView(QuietView):
    """A terminal: a table redrawn in place by rich, the stages' output printed above it."""

    def open(self, stream, executor, workflow) -> None:
        from rich.console import Console

        self.console = Console(file=stream, stderr=True, highlight=False, soft_wrap=False)
        self.live: Live | None = None
        super().open(stream, executor, workflow)

    def opened(self) -> None:
        from rich.live import Live

        self.header = header_line(self.executor, self.workflow)
        # our own redraws (tick) only; what the stages print comes through the console above it
        self.live = Live(
            self._render(),
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def _render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        from .states import colour

        table = Table(box=None, padding=(0, 1), show_header=True, header_style="bold", pad_edge=False)
        for name, justify in (
            ("stage", "left"),
            ("", "left"),
            ("done", "right"),
            ("running", "right"),
            ("failed", "right"),
            ("rate", "right"),
            ("elapsed", "right"),
            ("ETA", "right"),
            ("state", "left"),
        ):
            table.add_column(name, justify=justify, no_wrap=True)
        for row in self.feed.rows():
            total = row["total"]
            bar = ProgressBar(
                total=max(total, 1),
                completed=row["done"] + row["failed"],
                width=24,
                pulse=row["state"] == "running" and not row["done"] and not row["failed"],
                complete_style=colour("failed" if row["failed"] else "running"),
                finished_style=colour(row["state"]),
                pulse_style=colour("running"),
            )
            eta = seconds_text(row["eta"]) if row["state"] in ("running", "queued") else ""
            table.add_row(
                row["stage"],
                bar,
                f"{row['done']}/{total or '-'}",
                str(row["running"]),
                Text(str(row["failed"]), style="red" if row["failed"] else ""),
                rate_text(row["rate"]),
                seconds_text(row["elapsed"]),
                eta,
                Text(row["state"], style=colour(row["state"])),
            )
        if self.run.done:
            footer = end_line(self.run)
        else:
            footer = f"run {self.run.name} {self.run.state} - {seconds_text(time.monotonic() - self.started)}"
        return Group(Text(self.header, style="bold"), table, Text(footer))

    def tick(self) -> None:
        if self.live is None or self.feed is None:
            return
        self.feed.update()
        with self._out_lock:
            self.live.update(self._render(), refresh=True)

    def _write(self, line: str) -> None:
        from rich.text import Text

        if getattr(self, "live", None) is not None:
            self.console.print(Text(line), soft_wrap=True)  # above the live table
        else:
            super()._write(line)

    def close(self) -> None:
        if self.live is not None:
            self.tick()
            with self._out_lock:
                self.live.stop()
                self.live = None
        super().close()


def make_view(mode: str, stream) -> QuietView:
    """The view for ``--progress``: auto means a bar on a terminal, plain lines otherwise."""
    if mode == "auto":
        try:
            mode = "bar" if stream.isatty() else "plain"
        except (AttributeError, ValueError):
            mode = "plain"
    if mode == "bar":
        try:
            import rich  # noqa: F401
        except ImportError:  # the bar needs rich; progress still shows, as plain lines
            view = PlainView()
            view.output_line("note: the progress bar needs the 'rich' package; showing plain progress lines")
            return view
    return {"bar": BarView, "plain": PlainView, "none": QuietView}[mode]()
