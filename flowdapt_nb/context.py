"""The run context a stage sees through ``get_run_context()``."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any


class RunInfo(str):
    """The current run as seen from a stage: compares equal to the run's uid, and has
    ``.uid``, ``.name`` and ``.workflow``."""

    uid: str
    name: str
    workflow: str

    def __new__(cls, uid: str, name: str = "", workflow: str = ""):
        obj = super().__new__(cls, uid)
        obj.uid, obj.name, obj.workflow = uid, name, workflow
        return obj

    def __reduce__(self):
        return (RunInfo, (self.uid, self.name, self.workflow))


@dataclass
class RunContext:
    """What a stage may know about the run it belongs to."""

    input: dict
    namespace: str
    executor: str  # "local" | "dask" | "ray"
    run: RunInfo
    definition: dict  # the workflow resource
    config: dict  # the executor config
    memory: Any = field(default=None, repr=False)  # cluster memory store handle
    artifacts: Any = field(default=None, repr=False)  # storage settings for object_store
    stage: str | None = None
    item: int | None = None

    def for_task(self, stage: str, item: int | None) -> RunContext:
        """This context as one task sees it: a shallow copy with its stage and item (cheaper
        than ``dataclasses.replace``, which matters when tasks take microseconds)."""
        task = object.__new__(RunContext)
        task.__dict__.update(self.__dict__)
        task.stage, task.item = stage, item
        return task


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("flowdapt_nb_run", default=None)


def get_run_context() -> RunContext:
    """The context of the stage running now.

    >>> def stage():  # in a workflow stage
    ...     ctx = get_run_context()
    ...     return ctx.namespace, ctx.input
    """
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            "get_run_context() works only inside a running workflow stage; outside one there is no run"
        )
    return ctx


def current_context() -> RunContext | None:
    return _current.get()


def set_context(ctx: RunContext | None):
    return _current.set(ctx)


def reset_context(token) -> None:
    _current.reset(token)
