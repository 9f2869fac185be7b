"""ResourceDashboard: per worker CPU, memory, GPU and logical resources, as gauges and sparklines
over the last minutes, drawn from the executor's resource samples."""

from __future__ import annotations

import threading
import time
from collections import deque

from traitlets import Dict, Float, Int, List, Unicode

from ._common import (
    FeedWidget,
    ago,
    badge,
    clock,
    esc,
    fmt_amount,
    fmt_bytes,
    gauge,
    html_widget,
    sparkline,
    style_widget,
)

_HIDDEN = ("object_store_memory",)


def _is_gpu(name: str) -> bool:
    return name.lower() in ("gpu", "gpus")


def _used(sample, name: str) -> float | None:
    total = sample.resources_total.get(name)
    if total is None:
        return None
    available = sample.resources_available.get(name)
    return None if available is None else max(0.0, total - available)


class ResourceDashboard(FeedWidget):
    """Live resources of each worker over the last ``window`` seconds.

    >>> ResourceDashboard(ex, window=300)   # doctest: +SKIP

    Traits: ``workers`` (names), ``latest`` ({worker: newest sample as a dict}),
    ``samples`` (samples in the window), ``window``, ``redraws``, ``executor_state`` (running /
    stopped), ``last_sample`` (time of the newest sample, 0 before one), ``in_use`` and
    ``totals`` ({resource: amount over all workers}; in use is all 0 once the executor stopped).
    """

    workers: List[str] = List()
    latest = Dict()
    samples = Int(0)
    window = Float(300.0)
    redraws = Int(0)
    executor_state = Unicode("running")
    last_sample = Float(0.0)
    in_use = Dict()
    totals = Dict()

    def __init__(self, executor, window: float = 300, **kwargs):
        super().__init__(**kwargs)
        self.executor = executor
        self.window = float(window)
        self._series: dict[str, deque] = {}
        self._body = html_widget()
        self.children = [style_widget(), self._body]
        self.add_class("fnb-resource-dashboard")
        self.add_class("fnb-box")
        self.executor_state = "running" if executor.running else "stopped"
        if executor.running:
            self._subscribe(executor, kinds=("sample", "executor"))
        with self._draw_lock:
            self._seed()
            self._redraw()

    def _seed(self) -> None:
        sampler = getattr(self.executor, "_sampler", None)
        if sampler is None:
            return
        lock = getattr(sampler, "_lock", None) or threading.Lock()
        with lock:
            history = {w: list(q) for w, q in getattr(sampler, "_history", {}).items()}
        for samples in history.values():
            for s in samples:
                self._add(s)

    def _add(self, sample) -> None:
        q = self._series.setdefault(sample.worker, deque())
        if q and sample.time <= q[-1].time:
            return
        q.append(sample)

    def _trim(self, now: float) -> None:
        cutoff = now - self.window
        for worker in list(self._series):
            q = self._series[worker]
            while q and q[0].time < cutoff:
                q.popleft()
            if not q:
                del self._series[worker]

    def _on_events(self, batch: list) -> None:
        for event in batch:
            if event.kind == "sample":
                self._add(event)
            elif event.kind == "executor" and event.state == "stopped":
                self.executor_state = "stopped"  # the last samples stay, marked as the last
        self._redraw()

    @property
    def stopped(self) -> bool:
        return self.executor_state == "stopped"

    def _redraw(self) -> None:
        now = time.time()
        if not self.stopped:  # a stopped executor's last samples stay on show
            self._trim(now)
        self.workers = sorted(self._series)
        self.latest = {w: self._row(q[-1]) for w, q in self._series.items()}
        self.samples = sum(len(q) for q in self._series.values())
        self.last_sample = max((q[-1].time for q in self._series.values()), default=0.0)
        totals, used = _add_up({w: q[-1] for w, q in self._series.items()})
        self.totals = totals
        self.in_use = {name: 0.0 for name in totals} if self.stopped else used
        self._body.value = '<div class="fnb">' + self._inner_html(now) + "</div>"
        self.redraws += 1

    @staticmethod
    def _row(sample) -> dict:
        row = {
            "time": sample.time,
            "cpu_percent": sample.cpu_percent,
            "memory_used": sample.memory_used,
            "memory_limit": sample.memory_limit,
            "gpu_percent": sample.gpu_percent,
            "gpu_memory_used": sample.gpu_memory_used,
            "gpu_memory_limit": sample.gpu_memory_limit,
        }
        for name, total in sample.resources_total.items():
            row[f"{name}_total"] = total
            row[f"{name}_used"] = _used(sample, name)
        return row

    # --- drawing ---
    def _inner_html(self, now: float | None = None) -> str:
        now = now or time.time()
        stopped = self.stopped
        state = (
            f'<span class="fnb-executor-state" data-state="{self.executor_state}">'
            f"{badge('skipped' if stopped else 'finished', self.executor_state)}</span>"
        )
        title = (
            f'<div class="fnb-head"><span class="fnb-title">Resources</span>{state}'
            f'<span class="fnb-muted">{len(self._series)} worker{"s" if len(self._series) != 1 else ""}'
            f' · last {self._window_text()}</span><span class="fnb-spacer"></span>'
        )
        if not self._series:
            waiting = (
                "The executor stopped before a resource sample."
                if stopped
                else "Waiting for the first resource sample…"
            )
            return f'<div class="fnb-resources">{title}</div><div class="fnb-empty">{waiting}</div></div>'
        newest = max(q[-1].time for q in self._series.values())
        oldest = min(q[0].time for q in self._series.values())
        if stopped:  # the time axis ends at the last sample: nothing came after it
            now = newest
            sampled = f"last sample {clock(newest)}, executor stopped"
        else:
            sampled = f"sampled {ago(newest, now)}"
        t0 = max(now - self.window, min(oldest, now - 2))  # young series fill the width as they grow
        title += f'<span class="fnb-muted fnb-sampled">{esc(sampled)}</span></div>'
        latest = {w: q[-1] for w, q in self._series.items()}
        summary = self._summary(latest)
        muted = ' style="opacity:.45"' if stopped else ""  # greyed: the last figures, not live ones
        has_gpu = any(
            s.gpu_percent is not None or any(_is_gpu(k) for k in s.resources_total) for s in latest.values()
        )
        head = (
            "<tr><th>worker</th><th>cpu</th><th>memory</th>"
            + ("<th>gpu</th>" if has_gpu else "")
            + "<th>logical resources in use</th></tr>"
        )
        rows = []
        for worker in sorted(self._series):
            q = self._series[worker]
            s = q[-1]
            if s.cpu_percent is not None:
                pts = [(x.time, x.cpu_percent) for x in q]
                top = max(100.0, max(v or 0 for _, v in pts))
                cpu_cell = gauge(s.cpu_percent / top, f"{s.cpu_percent:.0f}%") + sparkline(
                    pts, t0, now, vmax=top, width=170, height=24, colour="#1e88e5"
                )
            else:
                cpu_cell = '<span class="fnb-muted">not measured here</span>'
            if s.memory_used is not None:
                frac = s.memory_used / s.memory_limit if s.memory_limit else None
                text = fmt_bytes(s.memory_used) + (
                    f" of {fmt_bytes(s.memory_limit)}" if s.memory_limit else ""
                )
                used = [(x.time, x.memory_used) for x in q]
                top = (
                    max(v or 0 for _, v in used) * 1.25 or None
                )  # the trend, not the limit, fills the height
                mem_cell = gauge(frac, text) + sparkline(
                    used, t0, now, vmax=top, width=170, height=24, colour="#8e24aa"
                )
            else:
                mem_cell = '<span class="fnb-muted">not measured here</span>'
            gpu_cell = (
                f'<td><div class="fnb-cell">{self._gpu_cell(s, q, t0, now)}</div></td>' if has_gpu else ""
            )
            res = []
            for name in sorted(s.resources_total):
                if name in _HIDDEN or (has_gpu and _is_gpu(name)):
                    continue
                total = s.resources_total[name]
                used_now = 0.0 if stopped else _used(s, name)
                frac = (used_now / total) if total and used_now is not None else None
                pts = [(x.time, _used(x, name)) for x in q]
                res.append(
                    f'<div class="fnb-res" data-resource="{esc(name)}" title="{esc(name)}: '
                    f"{fmt_amount(name, used_now)} of "
                    f'{fmt_amount(name, total)} in use"><span class="fnb-mono" style="min-width:90px">'
                    f"{esc(name)}</span>"
                    f"{gauge(frac, f'{fmt_amount(name, used_now)} / {fmt_amount(name, total)}', '#00897b')}"
                    f"{sparkline(pts, t0, now, vmax=total or None, width=70, height=16, colour='#00897b')}"
                    f"</div>"
                )
            rows.append(
                f'<tr data-worker="{esc(worker)}"{muted}><td class="fnb-mono" title="{esc(worker)}" '
                f'style="vertical-align:top">{esc(_short(worker))}</td>'
                f'<td><div class="fnb-cell">{cpu_cell}</div></td><td><div class="fnb-cell">{mem_cell}</div></td>'
                f'{gpu_cell}<td style="white-space:normal"><div class="fnb-cell">'
                f"{''.join(res) or '<span class=fnb-muted>none declared</span>'}</div></td></tr>"
            )
        table = f'<table class="fnb-table fnb-workers">{head}{"".join(rows)}</table>'
        return f'<div class="fnb-resources">{title}{summary}{table}</div>'

    def _summary(self, latest: dict) -> str:
        cpus = [s.cpu_percent for s in latest.values() if s.cpu_percent is not None]
        mem_used = sum(s.memory_used or 0 for s in latest.values())
        mem_limit = sum(s.memory_limit or 0 for s in latest.values())
        totals, used = self.totals, self.in_use
        stats = [
            f'<div class="fnb-stat"><b class="fnb-workers-count">{len(latest)}</b><span>workers</span></div>'
        ]
        if cpus:
            stats.append(
                f'<div class="fnb-stat"><b class="fnb-cpu-total">{sum(cpus) / len(cpus):.0f}%</b>'
                f"<span>mean cpu</span></div>"
            )
        if mem_limit:
            stats.append(
                f'<div class="fnb-stat"><b>{fmt_bytes(mem_used)}</b><span>of {fmt_bytes(mem_limit)} '
                f"memory</span></div>"
            )
        muted = ' style="opacity:.45"' if self.stopped else ""
        for name in sorted(totals, key=lambda n: ("memory" in n.lower(), n))[:6]:
            what = "reserved" if "memory" in name.lower() else "in use"  # beside the memory measured
            stats.append(
                f'<div class="fnb-stat fnb-in-use" data-resource="{esc(name)}"{muted}><b>'
                f"{fmt_amount(name, used.get(name, 0.0))}/{fmt_amount(name, totals[name])}"
                f"</b><span>{esc(name)} {what}</span></div>"
            )
        return '<div class="fnb-stats">' + "".join(stats) + "</div>"

    @staticmethod
    def _gpu_cell(s, q, t0, now) -> str:
        if s.gpu_percent is not None:
            text = f"{s.gpu_percent:.0f}%"
            if s.gpu_memory_used is not None and s.gpu_memory_limit:
                text += f" · {fmt_bytes(s.gpu_memory_used)}"
            return gauge(s.gpu_percent / 100, text) + sparkline(
                [(x.time, x.gpu_percent) for x in q],
                t0,
                now,
                vmax=100,
                width=150,
                height=24,
                colour="#f4511e",
            )
        for name, total in s.resources_total.items():
            if _is_gpu(name):
                used = _used(s, name)
                frac = used / total if total and used is not None else None
                return gauge(frac, f"{fmt_amount(name, used)} / {fmt_amount(name, total)} {name}")
        return '<span class="fnb-muted">none</span>'

    def _window_text(self) -> str:
        w = self.window
        return f"{w / 60:g} min" if w >= 60 else f"{w:g} s"

    def __repr__(self) -> str:
        if not self._series:
            return f"ResourceDashboard({self.executor.kind}): no samples yet"
        lines = [f"ResourceDashboard: {len(self._series)} worker(s), last {self._window_text()}"]
        if self.stopped:
            lines[0] += (
                f"; executor stopped, last sample "
                f"{time.strftime('%H:%M:%S', time.localtime(self.last_sample))}, nothing in use"
            )
        for worker in sorted(self._series):
            s = self._series[worker][-1]
            parts = []
            if s.cpu_percent is not None:
                parts.append(f"cpu {s.cpu_percent:.0f}%")
            if s.memory_used is not None:
                parts.append(
                    f"mem {fmt_bytes(s.memory_used)}"
                    + (f"/{fmt_bytes(s.memory_limit)}" if s.memory_limit else "")
                )
            if s.gpu_percent is not None:
                parts.append(f"gpu {s.gpu_percent:.0f}%")
            for name in sorted(s.resources_total):
                if name not in _HIDDEN:
                    used = 0.0 if self.stopped else _used(s, name)
                    parts.append(
                        f"{name} {fmt_amount(name, used)}/{fmt_amount(name, s.resources_total[name])}"
                    )
            lines.append(f"  {_short(worker)}: " + ", ".join(parts))
        return "\n".join(lines)


def _add_up(latest: dict) -> tuple[dict, dict]:
    """Totals and amounts in use of each logical resource over all workers' newest samples."""
    totals: dict[str, float] = {}
    used: dict[str, float] = {}
    for s in latest.values():
        for name, amount in s.resources_total.items():
            if name in _HIDDEN:
                continue
            totals[name] = totals.get(name, 0) + amount
            used[name] = used.get(name, 0) + (_used(s, name) or 0)
    return totals, used


def _short(worker: str) -> str:
    return worker if len(worker) <= 28 else worker[:12] + "…" + worker[-12:]
