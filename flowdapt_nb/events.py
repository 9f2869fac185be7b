"""One stream of task events and resource samples, with thread-safe subscriptions.

The feed is kept apart from drawing: the engine and the samplers publish here, widgets subscribe.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .states import TASK_STATES  # noqa: E402,F401  (the one state model; re-exported)
from .states import advances as _advances  # noqa: E402


@dataclass
class TaskEvent:
    """A task changed state. ``item`` is the index in a parameterized stage, else None."""

    run: str
    stage: str
    item: int | None
    state: str
    time: float = field(default_factory=time.time)
    worker: str | None = None
    error: str | None = None
    kind: str = "task"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunEvent:
    """A run changed state (running, finished, failed, cancelled)."""

    run: str
    workflow: str
    state: str
    time: float = field(default_factory=time.time)
    error: str | None = None
    kind: str = "run"


@dataclass
class ExecutorEvent:
    """The executor itself changed state: 'stopped' is the last event a closing executor sends."""

    executor: str  # its kind: local, dask or ray
    state: str
    time: float = field(default_factory=time.time)
    kind: str = "executor"


@dataclass
class ResourceSample:
    """One worker's resources at one time."""

    worker: str
    time: float
    cpu_percent: float | None = None
    memory_used: int | None = None
    memory_limit: int | None = None
    gpu_percent: float | None = None
    gpu_memory_used: int | None = None
    gpu_memory_limit: int | None = None
    resources_total: dict = field(default_factory=dict)
    resources_available: dict = field(default_factory=dict)
    kind: str = "sample"

    def to_row(self) -> dict:
        row = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("resources_total", "resources_available", "kind")
        }
        for name, amount in self.resources_total.items():
            row[f"{name}_total"] = amount
            row[f"{name}_available"] = self.resources_available.get(name)
        return row


class _Subscription:
    def __init__(self, callback: Callable, kinds, throttle: float | None):
        self.callback = callback
        self.kinds = set(kinds) if kinds else None
        self.throttle = throttle
        self.pending: list = []
        self.last_flush = 0.0
        self.lock = threading.Lock()

    def wants(self, event) -> bool:
        return self.kinds is None or event.kind in self.kinds


class EventBus:
    """Publish events to subscribers, from any thread.

    ``subscribe(cb)`` calls ``cb(event)`` for each event in the publishing thread. With
    ``throttle=0.1`` the callback instead gets lists of events, at most every 0.1 s, from one
    dispatcher thread (so a slow widget never slows the engine).

    >>> bus = EventBus(); seen = []
    >>> token = bus.subscribe(seen.append)
    >>> bus.publish(TaskEvent("r1", "a", None, "queued")); len(seen)
    1
    >>> bus.unsubscribe(token); bus.close()
    """

    def __init__(self):
        self._subs: dict[int, _Subscription] = {}
        self._snapshot: tuple[_Subscription, ...] = ()
        # kinds some subscription wants, or None when one wants every kind (see listening_for)
        self._wanted: frozenset[str] | None = frozenset()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._dispatcher: threading.Thread | None = None

    def subscribe(self, callback: Callable, kinds=None, throttle: float | None = None) -> int:
        """Register ``callback``; ``kinds`` limits to 'task', 'run' or 'sample' events."""
        token = next(self._ids)
        with self._lock:
            self._subs[token] = _Subscription(callback, kinds, throttle)
            self._swap_snapshot()
            if throttle and self._dispatcher is None and not self._closed:
                self._start_dispatcher()
        return token

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._subs.pop(token, None)
            self._swap_snapshot()

    def _swap_snapshot(self) -> None:
        """(Under the lock.) What ``publish`` and ``listening_for`` read, replaced whole."""
        subs = tuple(self._subs.values())
        wanted: set[str] = set()
        for sub in subs:
            if sub.kinds is None:
                self._wanted, self._snapshot = None, subs
                return
            wanted |= sub.kinds
        self._wanted, self._snapshot = frozenset(wanted), subs

    @property
    def listening(self) -> bool:
        """Whether anyone subscribes now (publishers may skip building events when not)."""
        return bool(self._snapshot)

    def listening_for(self, kind: str) -> bool:
        """Whether a subscription wants events of ``kind`` ('task', 'run', ...) now: a publisher
        skips building events nobody would get (the run store listens to runs only)."""
        wanted = self._wanted
        return wanted is None or kind in wanted

    def publish(self, event) -> None:
        for sub in self._snapshot:  # a tuple swapped whole on (un)subscribe: no lock per event
            if not sub.wants(event):
                continue
            if sub.throttle:
                with sub.lock:
                    sub.pending.append(event)
                self._wake.set()
            else:
                _call(sub.callback, event)

    def _start_dispatcher(self) -> None:
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="flowdapt-nb-events", daemon=True
        )
        self._dispatcher.start()

    def _dispatch_loop(self) -> None:
        while not self._closed:
            self._wake.wait(0.05)
            self._wake.clear()
            self.flush(respect_throttle=True)
            time.sleep(0.01)

    def flush(self, respect_throttle: bool = False) -> None:
        """Deliver pending throttled batches now (or, with respect_throttle, when due)."""
        with self._lock:
            subs = list(self._subs.values())
        now = time.monotonic()
        for sub in subs:
            if not sub.throttle:
                continue
            with sub.lock:
                if not sub.pending or (respect_throttle and now - sub.last_flush < sub.throttle):
                    if sub.pending:
                        self._wake.set()
                    continue
                batch, sub.pending = sub.pending, []
                sub.last_flush = now
            _call(sub.callback, batch)

    def reopen(self) -> None:
        """Deliver events again after ``close`` (an executor started anew)."""
        with self._lock:
            self._closed = False
            if self._dispatcher is None and any(sub.throttle for sub in self._subs.values()):
                self._start_dispatcher()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(timeout=2)
        self.flush()
        with self._lock:
            self._subs.clear()
            self._snapshot, self._wanted = (), frozenset()
        self._dispatcher = None

    @property
    def threads(self) -> list[threading.Thread]:
        return [self._dispatcher] if self._dispatcher is not None else []


def _call(callback, payload) -> None:
    try:
        callback(payload)
    except Exception:  # a broken subscriber must not break the run
        import logging

        logging.getLogger("flowdapt_nb").exception("event subscriber failed")


def state_advances(old: str | None, new: str) -> bool:
    """Events can arrive out of order (worker vs driver); states only move forward."""
    return _advances(old, new)
