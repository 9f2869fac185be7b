"""In a worker process: tasks' 'running' reports go to the driver in batches, one message per
batch rather than per task (each backend says how a batch travels: a queue, an actor, a Dask
event topic)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class EventBatch:
    """Reports wait at most ``interval`` seconds, then go out together through the ``send`` given
    with the latest one. A report still waiting can be dropped (its task ended first). The
    sending thread sleeps while nothing waits, so an idle worker costs nothing.

    A task's 'running' report so reaches the driver about ``interval`` after the task started
    (plus the backend's transport): short enough that a task of 100 ms or more is seen running,
    long enough that many tiny tasks share one message. With ``leading``, a report that comes
    after a quiet spell goes at once and only the ones after it wait (still one message per
    ``interval`` at most): for a transport that is slow itself (Ray: an actor call the driver
    polls), where the wait would otherwise add up.

    >>> batch = EventBatch(0.05)
    >>> batch.add({"run": "r", "stage": "a", "item": 0, "state": "running"}, print)  # doctest: +SKIP
    """

    def __init__(self, interval: float, leading: bool = False):
        self.interval = interval
        self.leading = leading
        self.lock = threading.Lock()
        self.pending: dict = {}  # (run, stage, item) -> its report
        self.send: Callable[[list], None] | None = None
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def start(self) -> None:
        """Start the sending thread now if it isn't running (``add`` would at its first call)."""
        if self.thread is None:
            with self.lock:
                if self.thread is None:
                    thread = threading.Thread(target=self._flush_loop, name="flowdapt-nb-events", daemon=True)
                    thread.start()
                    self.thread = thread

    def add(self, event: dict, send: Callable[[list], None]) -> None:
        self.start()
        with self.lock:
            self.pending[_task_key(event)] = event
            self.send = send
        self.wake.set()

    def drop(self, event: dict) -> None:
        """Forget the waiting report of ``event``'s task, if any."""
        with self.lock:
            self.pending.pop(_task_key(event), None)

    def _flush_loop(self) -> None:
        while True:
            self.wake.wait()
            if not self.leading:
                time.sleep(self.interval)  # the first report waits this long; later ones join it
            with self.lock:
                self.wake.clear()
                batch, self.pending = list(self.pending.values()), {}
                send = self.send
            if batch and send is not None:
                try:
                    send(batch)
                except Exception:  # telemetry must never fail a task
                    pass
            if self.leading:
                time.sleep(self.interval)  # what comes meanwhile waits for the next message


class ChunkWatch:
    """Tasks run together in a chunk send no 'running' report each (a message per tiny item is
    what chunks avoid). Each only notes its report in its chunk's slot, which costs no message;
    a thread looks every ``interval`` seconds while chunks run and sends the report of an item
    it finds running at two looks in a row, so an item that runs long inside a chunk is still
    seen running, like a task of its own.

    >>> watch = ChunkWatch(0.05)
    >>> report = watch.open(send)                            # doctest: +SKIP
    >>> outcomes = [execute(ctx, fn, info, flat, report) for info, flat in tasks]  # doctest: +SKIP
    >>> watch.close(report)                                  # doctest: +SKIP
    """

    def __init__(self, interval: float):
        self.interval = interval
        self.lock = threading.Lock()
        self.slots: set = set()
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def open(self, send: Callable[[list], None]) -> _Slot:
        """A slot for one chunk: call it with each item's report; ``send`` takes a list of them."""
        slot = _Slot(send)
        with self.lock:
            self.slots.add(slot)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="flowdapt-nb-chunks", daemon=True)
                self.thread.start()
        self.wake.set()
        return slot

    def close(self, slot: _Slot | None) -> None:
        """The chunk ended: its slot is looked at no more (None: there was none)."""
        if slot is not None:
            with self.lock:
                self.slots.discard(slot)

    def _loop(self) -> None:
        while True:
            self.wake.wait()
            time.sleep(self.interval)
            with self.lock:
                slots = list(self.slots)
                if not slots:
                    self.wake.clear()
            for slot in slots:
                event = slot.current
                if event is not None and event is slot.seen and event is not slot.sent:
                    slot.sent = event  # running since the last look at least
                    try:
                        slot.send([event])
                    except Exception:  # telemetry must never fail a task
                        pass
                slot.seen = event


class _Slot:
    __slots__ = ("send", "current", "seen", "sent")

    def __init__(self, send):
        self.send = send
        self.current = self.seen = self.sent = None

    def __call__(self, event: dict) -> None:
        self.current = event


def _task_key(event: dict) -> tuple:
    return event["run"], event["stage"], event["item"]
