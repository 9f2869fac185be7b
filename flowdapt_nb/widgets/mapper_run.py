"""The StageMapper's run controls: Run (Cancel while a run goes) and the run input box, the
executor a run goes to, and the run in progress (its handle, and the tracker that turns its task
events into stage states)."""

from __future__ import annotations

import ipywidgets as widgets

from ._stage_row import _PLACEHOLDER_INPUT
from ._tracker import RunTracker


class RunControls:
    """``executor``: the one runs go to when none is given (None: the current one, else a local
    thread pool this mapper starts, and closes with it)."""

    def __init__(self, executor=None):
        self.executor = executor
        self.own_executor = None
        self.tracker: RunTracker | None = None
        self.handle = None
        self.started_from: list | None = None  # the stages as they were when the last run started
        self.run_w = widgets.Button(
            description="Run", icon="play", button_style="success", layout=widgets.Layout(width="90px")
        )
        self.input_w = widgets.Text(
            placeholder=_PLACEHOLDER_INPUT,
            continuous_update=False,
            layout=widgets.Layout(flex="1 1 160px", width="auto"),
        )

    def executor_for(self, executor):
        if executor is not None:
            return executor
        if self.executor is not None and self.executor.running:
            return self.executor
        from ..executors.base import current_executor

        ex = current_executor()
        if ex is not None:
            return ex
        if self.own_executor is None or not self.own_executor.running:
            from ..executors.local import LocalExecutor

            self.own_executor = LocalExecutor(use_processes=False).start()
        return self.own_executor

    def start(self, ex, workflow, input, namespace, stages: list):
        """Submit ``workflow`` to ``ex``; ``stages`` (the rows as edited) tell later whether the
        mapping changed since."""
        self.executor = ex
        self.started_from = stages
        self.handle = ex.submit(workflow, input=input, namespace=namespace)
        self.tracker = RunTracker(self.handle.run)
        return self.handle

    def cancel(self) -> bool:
        """Cancel the run in progress; False when none is."""
        if self.handle is None or self.handle.done():
            return False
        self.handle.cancel()
        return True

    def apply(self, batch: list) -> bool:
        """Task and run events into the tracker; whether anything it shows changed."""
        tracker = self.tracker
        if tracker is None:
            return False
        changed = False
        for event in batch:
            if event.kind == "task":
                changed = tracker.apply(event) or changed
            elif event.kind == "run" and event.run == tracker.uid:
                changed = True
        return changed

    @property
    def finished(self) -> bool:
        return self.tracker is not None and self.tracker.run.done

    def stale(self, stages: list) -> bool:
        """A finished run whose stages were edited since (its colours no longer fit)."""
        return self.finished and stages != self.started_from

    def reset(self) -> None:
        self.tracker = None
        self.handle = None

    def states(self) -> tuple[dict, str]:
        """The stage states and the run's state ({} and "" with no run)."""
        if self.tracker is None:
            return {}, ""
        return self.tracker.stage_states(), self.tracker.run.state

    def draw_button(self) -> None:
        running = self.tracker is not None and not self.tracker.run.done
        self.run_w.description = "Cancel" if running else "Run"
        self.run_w.icon = "stop" if running else "play"
        self.run_w.button_style = "warning" if running else "success"

    def close(self) -> None:
        if self.own_executor is not None:
            self.own_executor.close()
            self.own_executor = None
