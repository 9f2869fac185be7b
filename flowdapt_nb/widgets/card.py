"""ExecutorCard: what an executor is and where, its workers and resource totals, and a Stop
button. It is what ``%flowdapt executor`` shows."""

from __future__ import annotations

import threading

import ipywidgets as widgets
from traitlets import Dict, Int, Unicode

from ._common import FeedWidget, badge, esc, fmt_amount, html_widget, style_widget


class ExecutorCard(FeedWidget):
    """A card for one executor.

    >>> ExecutorCard(ex)   # doctest: +SKIP

    Traits: ``kind``, ``state`` (running / stopping / stopped), ``address``, ``dashboard_url``,
    ``n_workers``, ``resources`` (totals), ``active_runs``, ``runs``. ``stop()`` (the Stop
    button) closes the executor.
    """

    kind = Unicode("")
    state = Unicode("")
    address = Unicode("")
    dashboard_url = Unicode("")
    n_workers = Int(0)
    resources = Dict()
    active_runs = Int(0)
    runs = Int(0)
    error = Unicode("")

    def __init__(self, executor, **kwargs):
        kwargs.setdefault("layout", widgets.Layout(max_width="640px"))
        super().__init__(**kwargs)
        self.executor = executor
        self._body = html_widget()
        self.stop_button = widgets.Button(
            description="Stop",
            icon="stop",
            button_style="",
            tooltip="Close the executor (and the cluster it started)",
            layout=widgets.Layout(width="90px"),
        )
        self.stop_button.on_click(lambda _: self.stop())
        self.refresh_button = widgets.Button(
            description="Refresh", icon="refresh", layout=widgets.Layout(width="100px")
        )
        self.refresh_button.on_click(lambda _: self.refresh())
        self.children = [style_widget(), self._body, widgets.HBox([self.stop_button, self.refresh_button])]
        self.add_class("fnb-executor-card")
        self.add_class("fnb-box")
        self._info: dict = {}
        self.refresh()
        if executor.running:
            self._subscribe(executor, kinds=("run", "sample", "executor"), throttle=1.0)

    def refresh(self) -> None:
        """Read the executor's info again (kind, address, workers, resources)."""
        with self._draw_lock:
            try:
                self._info = self.executor.info()
                self.error = ""
            except Exception as exc:  # a cluster gone away: say so on the card
                self._info = {
                    "kind": self.executor.kind,
                    "state": "stopped" if not self.executor.running else "unreachable",
                    "workers": [],
                    "resources": {},
                }
                self.error = f"{type(exc).__name__}: {exc}"
            self._apply_info()
            self._redraw()

    def _apply_info(self) -> None:
        info = self._info
        self.kind = info.get("kind") or self.executor.kind
        if self.state != "stopping":
            self.state = info.get("state") or ("running" if self.executor.running else "stopped")
        self.address = str(info.get("address") or "")
        self.dashboard_url = str(info.get("dashboard_url") or "")
        self.n_workers = len(info.get("workers") or [])
        self.resources = dict(info.get("resources") or {})
        self.active_runs = int(info.get("active_runs") or 0)
        self.runs = int(info.get("runs") or 0)

    def _on_events(self, batch: list) -> None:
        changed = False
        workers = {e.worker: e for e in batch if e.kind == "sample"}
        if workers:
            totals: dict[str, float] = {}
            for s in workers.values():
                for name, amount in s.resources_total.items():
                    totals[name] = totals.get(name, 0) + amount
            shown = {k: v for k, v in self.resources.items() if k in totals}
            if len(workers) != self.n_workers or (totals and totals != shown):
                self.n_workers = len(workers)
                if totals:
                    self.resources = {**self.resources, **totals}
                changed = True
        if any(e.kind == "run" for e in batch):
            self.active_runs = len(getattr(self.executor, "_active", {}))
            self.runs = len(self.executor.history)
            changed = True
        if not self.executor.running and self.state == "running":
            self._show_stopped()
            changed = True
        if changed:
            self._redraw()

    def stop(self) -> None:
        """Close the executor (cancelling its runs; a cluster it started is shut down)."""
        with self._draw_lock:
            if not self.executor.running:
                self._show_stopped()
                self._redraw()
                return
            self.state = "stopping"
            self.stop_button.disabled = True
            self._redraw()
        self._unsubscribe_all()
        try:
            self.executor.close()
        except Exception as exc:
            self.error = f"stopping failed: {type(exc).__name__}: {exc}"
        with self._draw_lock:
            if self.executor.running:  # closing failed: still running
                self.state = "running"
            else:
                self._show_stopped()
            self._redraw()  # sets the buttons from the state

    def _show_stopped(self) -> None:
        """A stopped executor has no workers or runs here any more, and a cluster it started is
        gone with its dashboard (the card said 'workers 2' and linked a dead dashboard). An
        attached cluster's address and dashboard stay: that cluster is still up."""
        self.state = "stopped"
        self.n_workers = 0
        self.resources = {}
        self.active_runs = 0
        if self.executor.owns_cluster:
            self.dashboard_url = ""

    def stop_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.stop, name="flowdapt-nb-card-stop", daemon=True)
        thread.start()
        return thread

    def _redraw(self) -> None:
        self._body.value = '<div class="fnb">' + self._inner_html() + "</div>"
        self.stop_button.disabled = self.state != "running"
        self.refresh_button.disabled = self.state == "stopping"

    def _inner_html(self) -> str:
        title = getattr(type(self.executor), "title", "") or f"{self.kind} executor"  # the class says
        state_colour = {"running": "finished", "stopping": "cancelled", "stopped": "skipped"}.get(
            self.state, "failed"
        )
        dash = (
            f'<a class="fnb-link" href="{esc(self.dashboard_url)}" target="_blank" rel="noopener">'
            f"{esc(self.dashboard_url)} ↗</a>"
            if self.dashboard_url
            else '<span class="fnb-muted">none</span>'
        )
        owner = self._info.get("owns_cluster")
        where = ("started here" if owner else "attached") if owner is not None else ""
        totals = (
            " ".join(
                f'<span class="fnb-res"><span class="fnb-mono">{esc(k)}</span> <b>{fmt_amount(k, v)}</b></span>'
                for k, v in sorted(self.resources.items())
                if k != "object_store_memory"
            )
            or '<span class="fnb-muted">–</span>'
        )
        err = f'<div class="fnb-err" style="margin-top:6px">{esc(self.error)}</div>' if self.error else ""
        return (
            f'<div class="fnb-card"><div class="fnb-head"><span class="fnb-title">{esc(title)}</span>'
            f'{badge(state_colour, self.state)}<span class="fnb-muted">{esc(type(self.executor).__name__)}'
            f"{' · ' + where if where and self.state == 'running' else ''}</span></div>"
            '<div class="fnb-kv">'
            f'<span>address</span><span class="fnb-mono">{esc(self.address or "–")}</span>'
            f"<span>dashboard</span><span>{dash}</span>"
            f'<span>workers</span><span><b class="fnb-card-workers">{self.n_workers}</b>{esc(self._pool_note())}'
            "</span>"
            f"<span>resources</span><span>{totals}</span>"
            f"<span>runs</span><span>{self.runs} ({self.active_runs} active)</span>"
            f"</div>{err}</div>"
        )

    def _pool_note(self) -> str:
        """What a local executor's workers are, so '1' next to 'threads x2' reads right: one
        process (this kernel) running a pool of 2 threads, or 2 worker processes."""
        if self.kind != "local":
            return ""
        pool, _, size = self.address.rpartition(" x")
        if not size.isdigit():
            return ""
        if pool.endswith("threads"):
            return f" (this kernel's process, {size} threads)"
        return f" worker process{'es' if self.n_workers != 1 else ''}"

    def __repr__(self) -> str:
        totals = (
            ", ".join(
                f"{k} {fmt_amount(k, v)}"
                for k, v in sorted(self.resources.items())
                if k != "object_store_memory"
            )
            or "-"
        )
        return (
            f"{type(self.executor).__name__} ({self.kind}) {self.state}\n"
            f"  address:   {self.address or '-'}\n"
            f"  dashboard: {self.dashboard_url or '-'}\n"
            f"  workers:   {self.n_workers}{self._pool_note()}\n"
            f"  resources: {totals}\n"
            f"  runs:      {self.runs} ({self.active_runs} active)"
        )
