"""TaskDashboard: per stage a progress bar (done / running / failed / queued), throughput and ETA,
the most recent tasks, and the failed ones with their tracebacks."""

from __future__ import annotations

import time

import ipywidgets as widgets
from traitlets import Dict, Int, List, Unicode

from ._common import (
    FeedWidget,
    ago,
    badge,
    clock,
    esc,
    fmt_duration,
    fmt_rate,
    html_widget,
    legend,
    stacked_bar,
    style_widget,
)
from ._tracker import RunTracker, task_label, traceback_of

_FOLLOW = "__follow__"
_NO_TRACEBACK = "__none__"


class TaskDashboard(FeedWidget):
    """Live progress of the executor's runs: the newest active run, or the one given.

    >>> dash = TaskDashboard(ex)            # doctest: +SKIP
    >>> handle = ex.submit(wf, input=...)   # the dashboard follows it as it runs
    >>> dash.stage_counts["square"]         # doctest: +SKIP
    {'done': 12, 'running': 2, 'failed': 1, 'queued': 25, 'cancelled': 0, 'total': 40}

    Traits (read them from code and tests): ``run_id``, ``run_name``, ``run_state``,
    ``stage_counts``, ``stage_states``, ``throughput``, ``eta``, ``recent_tasks``,
    ``failed_tasks``, ``traceback_text``, ``redraws``.
    """

    run_id = Unicode("")
    run_name = Unicode("")
    run_state = Unicode("")
    stage_counts = Dict()
    stage_states = Dict()
    throughput = Dict()
    eta = Dict()
    recent_tasks: List[dict] = List()
    failed_tasks: List[dict] = List()
    traceback_text = Unicode("")
    redraws = Int(0)

    def __init__(self, executor, run=None, recent: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.executor = executor
        self.recent_limit = recent
        self._pinned = run is not None
        self._tracker: RunTracker | None = None
        self._body = html_widget()
        self._picker = widgets.Dropdown(
            description="run", layout=widgets.Layout(width="340px"), style={"description_width": "28px"}
        )
        self._picker_row = widgets.HBox(
            [self._picker], layout=widgets.Layout(justify_content="flex-end", display="none")
        )
        self._failed_pick = widgets.Dropdown(
            description="traceback of",
            layout=widgets.Layout(width="auto", min_width="420px"),
            style={"description_width": "82px"},
        )
        self._traceback = html_widget()
        self._failed_box = widgets.VBox(
            [self._failed_pick, self._traceback], layout=widgets.Layout(display="none")
        )
        self.children = [style_widget(), self._picker_row, self._body, self._failed_box]
        self.add_class("fnb-box")
        self.add_class("fnb-task-dashboard")
        self._updating_picker = False
        self._subscribe(executor, kinds=("task", "run", "sample"))
        with self._draw_lock:
            self._follow(run if run is not None else self._newest_run())
            self._refresh_picker()
            self._redraw()
        self._picker.observe(self._on_pick, names="value")
        self._failed_pick.observe(self._on_failed_pick, names="value")

    # --- which run ---
    def _newest_run(self):
        active = getattr(self.executor, "_active", {})
        history = self.executor.history
        for run in reversed(history):
            if run.uid in active:
                return run
        return history[-1] if history else None

    def _find_run(self, uid: str):
        entry = getattr(self.executor, "_active", {}).get(uid)
        if entry is not None:
            return entry[0].run
        for run in self.executor.history:
            if run.uid == uid:
                return run
        return None

    def _follow(self, run) -> None:
        if run is None:
            self._tracker = None
            return
        if self._tracker is not None and self._tracker.uid == run.uid:
            return
        self._tracker = RunTracker(run)
        self._failed_pick.value = None
        self.traceback_text = ""

    @property
    def run(self):
        """The run on display (None before the first run)."""
        return self._tracker.run if self._tracker else None

    def follow(self, run=None) -> None:
        """Show ``run``; with None, follow the newest active run again."""
        with self._draw_lock:
            self._pinned = run is not None
            self._follow(run if run is not None else self._newest_run())
            self._refresh_picker()
            self._redraw()

    # --- feed ---
    def _on_events(self, batch: list) -> None:
        changed = False
        runs_changed = False
        for event in batch:
            kind = event.kind
            if kind == "run":
                runs_changed = True
                if (
                    not self._pinned
                    and event.state == "running"
                    and (self._tracker is None or self._tracker.uid != event.run)
                ):
                    run = self._find_run(event.run)
                    if run is not None and (
                        self._tracker is None
                        or self._tracker.run.done
                        or self._is_newer(run, self._tracker.run)
                    ):
                        self._follow(run)
                changed = changed or (self._tracker is not None and event.run == self._tracker.uid)
            elif kind == "task" and self._tracker is not None:
                changed = self._tracker.apply(event) or changed
            elif kind == "sample" and self._tracker is not None and not self._tracker.run.done:
                changed = True  # a clock tick: elapsed time and ETA move on
        if not self._pinned and self._tracker is not None and self._tracker.run.done:
            newest = self._newest_run()  # the followed run ended: move on to one still going
            if newest is not None and newest.uid in getattr(self.executor, "_active", {}):
                self._follow(newest)
                changed = True
        if runs_changed:
            self._refresh_picker()
        if changed or runs_changed:
            self._redraw()

    def _is_newer(self, run, than) -> bool:
        history = [r.uid for r in self.executor.history]
        try:
            return history.index(run.uid) > history.index(than.uid)
        except ValueError:
            return True

    # --- drawing ---
    def _refresh_picker(self) -> None:
        options = [("follow the newest run", _FOLLOW)]
        for run in reversed(self.executor.history[-30:]):
            options.append((f"{run.name} · {run.state}", run.uid))
        value = _FOLLOW if not self._pinned or self._tracker is None else self._tracker.uid
        self._updating_picker = True
        try:
            if list(self._picker.options) != options:
                self._picker.options = options
            self._picker.value = value
        finally:
            self._updating_picker = False
        self._picker_row.layout.display = "" if len(options) > 2 else "none"

    def _on_pick(self, change) -> None:
        if self._updating_picker:
            return
        value = change["new"]
        if value in (None, _FOLLOW):
            self.follow(None)
        else:
            run = self._find_run(value)
            if run is not None:
                self.follow(run)

    def _on_failed_pick(self, change) -> None:
        value = change["new"]
        if value in (None, _NO_TRACEBACK):
            self.traceback_text = ""
            self._traceback.value = ""
            return
        stage, item = value
        self.show_traceback(stage, item)

    def show_traceback(self, stage: str, item=None) -> str:
        """Open a failed task to its worker traceback (also shown below the dashboard)."""
        run = self.run
        text = (traceback_of(run, stage, item) if run is not None else None) or "no traceback recorded"
        self.traceback_text = text
        self._traceback.value = f'<div class="fnb"><div class="fnb-pre">{esc(_user_frames(text))}</div></div>'
        return text

    def _redraw(self) -> None:
        tracker = self._tracker
        now = time.time()
        if tracker is None:
            self.run_id = self.run_name = self.run_state = ""
            self.stage_counts, self.stage_states, self.throughput, self.eta = {}, {}, {}, {}
            self.recent_tasks, self.failed_tasks = [], []
        else:
            run = tracker.run
            self.stage_counts = tracker.stage_counts()
            self.stage_states = tracker.stage_states()
            self.throughput = {s: tracker.throughput(s, now) for s in tracker.stage_names}
            self.eta = {s: tracker.eta(s, now) for s in tracker.stage_names}
            self.recent_tasks = tracker.recent_tasks(self.recent_limit)
            self.failed_tasks = tracker.failed_tasks()
            self.run_id, self.run_name, self.run_state = run.uid, run.name, run.state
        self._body.value = '<div class="fnb">' + self._inner_html(now) + "</div>"
        self._draw_failed()
        self.redraws += 1

    def _draw_failed(self) -> None:
        failed = self.failed_tasks
        if not failed:
            self._failed_box.layout.display = "none"
            return
        options: list[tuple[str, object]] = [("pick a failed task to see its traceback", _NO_TRACEBACK)]
        for f in failed[:200]:  # the first 200: a dropdown is no place for thousands
            err = (f["error"] or "failed").splitlines()[0][:80]
            options.append((f"{task_label(f['stage'], f['item'])} · {err}", (f["stage"], f["item"])))
        if list(self._failed_pick.options) != options:
            current = self._failed_pick.value
            self._failed_pick.options = options
            self._failed_pick.value = current if current in [v for _, v in options] else _NO_TRACEBACK
        self._failed_box.layout.display = ""

    def _inner_html(self, now: float | None = None) -> str:
        now = now or time.time()
        tracker = self._tracker
        if tracker is None:
            return (
                '<div class="fnb-tasks"><div class="fnb-head"><span class="fnb-title">Tasks</span>'
                f'{badge("pending", "idle")}</div><div class="fnb-empty">No runs yet on this '
                f"{esc(self.executor.kind)} executor: submit one (<code>ex.submit(wf, input)</code>) "
                "and it shows up here.</div></div>"
            )
        run = tracker.run
        totals = tracker.totals()
        expected = tracker.expected_tasks()  # None until every fan-out's size is known
        error = (
            f'<div class="fnb-err fnb-run-error" style="margin:0 0 6px">{esc(run.error)}</div>'
            if run.error
            else ""
        )
        head = (
            f'<div class="fnb-head"><span class="fnb-title">{esc(run.workflow)}</span>'
            f'{badge(run.state)}<span class="fnb-muted fnb-mono">{esc(run.name)}</span>'
            f'<span class="fnb-spacer"></span><span class="fnb-muted">{esc(run.executor)} executor'
            f"{' · namespace ' + esc(run.namespace) if run.namespace != 'default' else ''}</span></div>"
        )
        failed_colour = "#e53935" if totals["failed"] else "inherit"
        stats = (
            '<div class="fnb-stats">'
            f'<div class="fnb-stat"><b class="fnb-run-done">{totals["done"]}'
            f"{'' if expected is None else f'/{expected}'}</b>"
            f"<span>tasks done{' (total not known yet)' if expected is None else ''}</span></div>"
            f'<div class="fnb-stat"><b class="fnb-run-running" style="color:#1e88e5">{totals["running"]}</b>'
            "<span>running</span></div>"
            f'<div class="fnb-stat"><b class="fnb-run-queued">{totals["queued"]}</b><span>queued</span></div>'
            f'<div class="fnb-stat"><b class="fnb-run-failed" style="color:{failed_colour}">{totals["failed"]}'
            "</b><span>failed</span></div>"
            f'<div class="fnb-stat"><b class="fnb-run-elapsed">{fmt_duration(run.duration)}</b>'
            "<span>elapsed</span></div></div>"
        )
        rows = []
        for stage in tracker.stage_names:
            c = self._counts_row(tracker, stage)
            state = tracker.stage_state(stage)
            if state in ("running", "queued"):
                eta = tracker.eta(stage, now)
                time_text = f"~{fmt_duration(eta)} left" if eta is not None else "–"
            elif state == "pending":
                waiting = [d for d in tracker.deps[stage] if tracker.stage_state(d) != "finished"]
                time_text = (
                    f'<span class="fnb-muted">after {esc(", ".join(waiting))}</span>' if waiting else "–"
                )
            else:
                time_text = fmt_duration(tracker.elapsed(stage, now))
            param = tracker.types[stage] == "parameterized"
            kind = (
                " <span class='fnb-muted' title='parameterized: one task per item'>[*]</span>"
                if param
                else ""
            )
            extra = []
            if c["running"]:
                extra.append(f'<span style="color:#1e88e5">{c["running"]} running</span>')
            if c["failed"]:
                extra.append(f'<span class="fnb-err">{c["failed"]} failed</span>')
            if c["cancelled"]:
                extra.append(f'<span style="color:#fb8c00">{c["cancelled"]} cancelled</span>')
            if c.get("cached"):
                extra.append(f'<span style="color:#43a047">{c["cached"]} cached</span>')
            rate = fmt_rate(tracker.throughput(stage, now)) if param else "–"
            rows.append(
                f'<tr data-stage="{esc(stage)}"><td><b>{esc(stage)}</b>{kind}</td><td>{badge(state)}</td>'
                f'<td style="width:45%;min-width:180px">{stacked_bar(c, c["total"])}</td>'
                f'<td class="fnb-num fnb-count">{c["done"]}/{c["total"] if c["total"] else "?"}</td>'
                f"<td>{' · '.join(extra)}</td>"
                f'<td class="fnb-num">{rate}</td><td class="fnb-num">{time_text}</td></tr>'
            )
        stages = (
            '<table class="fnb-table fnb-stages"><tr><th>stage</th><th>state</th><th>progress</th>'
            '<th class="fnb-num">done</th><th></th><th class="fnb-num">throughput</th>'
            '<th class="fnb-num">time</th></tr>' + "".join(rows) + "</table>" + legend()
        )
        recent = tracker.recent_tasks(self.recent_limit)
        if recent:
            trs = []
            # relative while the run is redrawn; clock times once it ended (nothing redraws it)
            when = clock if run.done else (lambda t: ago(t, now))
            for r in recent:
                err = (r["error"] or "").splitlines()[0][:140] if r["error"] else ""
                trs.append(
                    f'<tr><td class="fnb-muted">{when(r["changed"])}</td>'
                    f'<td class="fnb-mono">{esc(task_label(r["stage"], r["item"]))}</td>'
                    f'<td>{badge(r["state"])}</td><td class="fnb-mono fnb-muted">{esc(r["worker"] or "–")}</td>'
                    f'<td class="fnb-num">{fmt_duration(r["duration"])}</td>'
                    f'<td class="fnb-err fnb-mono" style="white-space:normal">{esc(err)}</td></tr>'
                )
            recent_html = (
                '<div class="fnb-sub">Recent tasks</div><table class="fnb-table fnb-recent"><tr>'
                '<th>when</th><th>task</th><th>state</th><th>worker</th><th class="fnb-num">duration</th>'
                "<th>error</th></tr>" + "".join(trs) + "</table>"
            )
        else:
            recent_html = '<div class="fnb-empty">No tasks yet.</div>'
        failures = ""
        if tracker.failed:
            dropped = len(run.failures)
            note = f" · {dropped} dropped under allow_partial_failure" if dropped else ""
            failures = (
                f'<div class="fnb-sub fnb-err">Failed tasks ({len(tracker.failed)}){note}</div>'
                '<table class="fnb-table fnb-failed">'
                + "".join(
                    f'<tr><td class="fnb-mono" style="width:1%">{esc(task_label(s, i))}</td>'
                    f'<td class="fnb-mono fnb-err" style="white-space:normal">'
                    f"{esc((e or 'failed').splitlines()[0])}</td></tr>"
                    for (s, i), e in list(tracker.failed.items())[:20]
                )
                + "</table>"
            )
        return f'<div class="fnb-tasks">{head}{error}{stats}{stages}{failures}{recent_html}</div>'

    @staticmethod
    def _counts_row(tracker, stage) -> dict:
        return tracker.stage_counts_of(stage)

    def __repr__(self) -> str:
        tracker = self._tracker
        if tracker is None:
            return f"TaskDashboard({self.executor.kind}): no runs yet"
        run = tracker.run
        lines = [f"TaskDashboard: {run.name} {run.state} on {run.executor} in {fmt_duration(run.duration)}"]
        width = max((len(s) for s in tracker.stage_names), default=5)
        for stage in tracker.stage_names:
            c = self._counts_row(tracker, stage)
            filled = int(20 * c["done"] / c["total"]) if c["total"] else 0
            bar = "#" * filled + "." * (20 - filled)
            extra = "".join(f", {c[k]} {k}" for k in ("running", "failed", "queued", "cancelled") if c[k])
            lines.append(f"  {stage:<{width}} [{bar}] {c['done']}/{c['total'] or '?'} done{extra}")
        for (s, i), e in list(tracker.failed.items())[:5]:
            lines.append(f"  failed {task_label(s, i)}: {(e or 'failed').splitlines()[0]}")
        if run.error:
            lines.append(f"  error: {run.error}")
        return "\n".join(lines)


def _user_frames(text: str) -> str:
    """A worker traceback without the frame of flowdapt_nb's own task wrapper."""
    lines = text.splitlines()
    out, skip = [], False
    for line in lines:
        if line.startswith('  File "') and (
            "flowdapt_nb/worker.py" in line or "flowdapt_nb\\worker.py" in line
        ):
            skip = True
            continue
        if skip and (line.startswith("    ") and not line.startswith('  File "')):
            continue
        skip = False
        out.append(line)
    return "\n".join(out)
