"""What runs on the worker for every task, on every executor: arguments in, context set,
the stage called, and its outcome (value or portable error, timings, worker) out."""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from .context import RunContext, reset_context, set_context
from .errors import RemoteError, attach_remote_traceback


@dataclass
class TaskInfo:
    """Small, picklable description of one task."""

    run: str
    stage: str
    item: int | None
    layout: tuple  # how flat arguments regroup: ("v",) one value, ("g", k) k values as a list, ("i", n)
    kwargs: dict = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return f"{self.stage}[{self.item}]" if self.item is not None else self.stage


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def regroup(layout: tuple, flat: tuple | list) -> list:
    """Turn flat arguments (each resolved by the engine) back into the stage's positional args."""
    args, pos = [], 0
    for entry in layout:
        tag = entry[0]
        if tag == "v":
            args.append(flat[pos])
            pos += 1
        elif tag == "g":
            args.append(list(flat[pos : pos + entry[1]]))
            pos += entry[1]
        elif tag == "i":
            args.append(flat[pos][entry[1]])
            pos += 1
        elif tag == "c":  # a constant carried in the layout (a root item already known)
            args.append(entry[1])
        else:  # pragma: no cover
            raise ValueError(f"bad layout entry {entry!r}")
    return args


def portable_error(exc: BaseException, tb_text: str) -> BaseException:
    """The exception itself when it pickles (type and message kept), else a RemoteError;
    either way with ``remote_traceback`` holding the worker's traceback."""
    attach_remote_traceback(exc, tb_text)
    try:
        restored = cloudpickle.loads(cloudpickle.dumps(exc))
        if type(restored) is type(exc):
            return exc
    except Exception:
        pass
    return RemoteError.standing_in_for(exc, tb_text)


def execute(
    ctx: RunContext,
    fn: Callable,
    info: TaskInfo,
    flat_args,
    report: Callable | None = None,
    worker: str | None = None,
    portable: bool = True,
) -> tuple[dict, Any]:
    """Run one task. Never raises for a stage's error: the error travels in the returned meta.

    ``portable=False`` where the error never leaves this process (local threads): the stage's
    own exception object is kept even when it can't be pickled."""
    worker = worker or default_worker_name()
    start = time.time()
    if report is not None:
        try:
            report(
                {
                    "run": info.run,
                    "stage": info.stage,
                    "item": info.item,
                    "state": "running",
                    "time": start,
                    "worker": worker,
                }
            )
        except Exception:  # telemetry must never fail a task
            pass
    token = set_context(ctx.for_task(info.stage, info.item))
    value, error = None, None
    try:
        args = regroup(info.layout, flat_args)
        value = fn(*args, **info.kwargs)
    except (Exception, SystemExit) as exc:
        tb_text = traceback.format_exc()
        if portable:
            error = portable_error(exc, tb_text)
        else:
            error = exc
            attach_remote_traceback(exc, tb_text)
    finally:
        reset_context(token)
    meta = {"ok": error is None, "start": start, "end": time.time(), "worker": worker, "error": error}
    return meta, value
