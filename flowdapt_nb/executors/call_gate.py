"""Keeps threads' Ray calls clear of ``ray.shutdown()``.

Ray ends the whole process when a thread calls into a core worker that ``ray.shutdown()`` has just
shut down ("The core worker has already been shutdown ... The process will exit"): exit status 1,
no Python exception, the reason only in the driver's core-worker log. A check such as
``ray.is_initialized()`` before the call doesn't help: shutdown can come between the check and the
call. The suite saw it as pytest vanishing in the middle of a Ray test (a cancel thread still
waiting on its tasks while the executor closed); a kernel would die the same way.

Every Ray call made off the closing thread (the event poller, cancel threads, the head monitor,
the engine's thread, dashboards reading resources or cluster memory) goes through the executor's
``CallGate``; closing shuts the gate and waits for the calls inside to return before Ray is shut
down. Those calls are short (each carries a timeout of a few seconds at most).

>>> gate = CallGate()
>>> with gate:
...     pass  # a Ray call
>>> gate.close(timeout=1)
True
"""

from __future__ import annotations

import threading


class GateClosed(RuntimeError):
    """A Ray call refused because its executor is closing (Ray is being shut down)."""


class CallGate:
    """Lets calls in while open; ``close`` shuts it and waits for the calls inside to end."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self.closed = False

    def __enter__(self) -> CallGate:
        with self._cond:
            if self.closed:
                raise GateClosed("the executor is closing: Ray is being shut down")
            self._inside += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._inside -= 1
            if self._inside == 0:
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Refuse new calls; True once none is inside (waits at most ``timeout`` s for them).
        Never call it from inside a call (it would wait for itself)."""
        with self._cond:
            self.closed = True
            return self._cond.wait_for(lambda: self._inside == 0, timeout)
