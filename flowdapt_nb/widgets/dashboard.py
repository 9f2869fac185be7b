"""Dashboard: tasks and resources of one executor together, with the native Ray/Dask dashboard link."""

from __future__ import annotations

from traitlets import Unicode

from ._common import FeedWidget, badge, esc, html_widget, style_widget
from .resources import ResourceDashboard
from .tasks import TaskDashboard


class Dashboard(FeedWidget):
    """TaskDashboard and ResourceDashboard of one executor, under a header that links the
    engine's own dashboard.

    >>> fnb.widgets.Dashboard(ex)   # doctest: +SKIP

    ``dash.tasks`` and ``dash.resources`` are the two parts; ``dashboard_url`` the native link;
    ``executor_state`` is running or stopped (it turns stopped when the executor is closed
    anywhere: ``%flowdapt stop``, ``ex.close()``, the card's Stop button).
    """

    dashboard_url = Unicode("")
    executor_state = Unicode("running")

    def __init__(self, executor, run=None, window: float = 300, **kwargs):
        super().__init__(**kwargs)
        self.executor = executor
        self._header = html_widget()
        self.tasks = TaskDashboard(executor, run=run)
        self.resources = ResourceDashboard(executor, window=window)
        self.children = [style_widget(), self._header, self.tasks, self.resources]
        self.add_class("fnb-dashboard")
        self._address = ""
        try:
            info = executor.info()
            self.dashboard_url = str(info.get("dashboard_url") or "")
            self._address = str(info.get("address") or "")
        except Exception:
            pass
        self.executor_state = self.resources.executor_state
        # the resource part hears the executor stop; the header follows it
        self.resources.observe(self._on_state, names="executor_state")
        self._header.value = '<div class="fnb">' + self._header_html() + "</div>"

    def _on_state(self, change) -> None:
        self.executor_state = change["new"]
        self._header.value = '<div class="fnb">' + self._header_html() + "</div>"

    def _on_events(self, batch: list) -> None:  # the parts subscribe themselves
        pass

    def _header_html(self) -> str:
        kind = self.executor.kind
        native = getattr(type(self.executor), "native_dashboard", None)  # e.g. "Ray dashboard"
        link = (
            f'<a class="fnb-link fnb-native-link" href="{esc(self.dashboard_url)}" target="_blank" '
            f'rel="noopener">Open {native} ↗</a>'
            if self.dashboard_url and native
            else ""
        )
        state = self.executor_state
        return (
            f'<div class="fnb-head" style="margin:2px 2px 0"><span class="fnb-title">flowdapt · {esc(kind)}'
            f'</span><span class="fnb-executor-state" data-state="{state}">'
            f"{badge('finished' if state == 'running' else 'skipped', state)}</span>"
            f'<span class="fnb-muted fnb-mono">{esc(self._address)}</span><span class="fnb-spacer"></span>'
            f"{link}</div>"
        )

    def close(self) -> None:
        self.tasks.close()
        self.resources.close()
        super().close()

    def _static_html(self) -> str:
        return self._header_html() + self.tasks._static_html() + self.resources._static_html()

    def __repr__(self) -> str:
        head = f"Dashboard ({self.executor.kind}, {self.executor_state})" + (
            f" · {self.dashboard_url}" if self.dashboard_url else ""
        )
        return "\n".join([head, repr(self.tasks), repr(self.resources)])
